"""The Self-Extend Triton kernel against its plain-PyTorch reference (`naive.py`): on CPU
through Triton's interpreter at small awkward sizes, on CUDA (marked gpu) at real ones."""

from __future__ import annotations

import pytest
import torch

from infinikv.cache.pages import PageList
from infinikv.core.config import RopeConfig
from infinikv.core.rope import RotaryEmbedding
from infinikv.core.self_extend import SelfExtend
from infinikv.kernels.self_extend.naive import self_extend_naive
from infinikv.kernels.self_extend.ops import self_extend_attention


def paged_case(T, page, Hq, Hkv, d, n, evicted, dtype, device, seed=0):
    """T resident tokens in shuffled pages of a NaN-filled pool: one sink block, then
    (after `evicted` missing blocks) a run of recent blocks; queries are the last n tokens,
    taken from a wider tensor so they are not contiguous."""
    gen = torch.Generator().manual_seed(seed)
    sink_blocks = 1
    blocks_resident = -(-T // page)
    blocks = list(range(sink_blocks)) + list(
        range(sink_blocks + evicted, sink_blocks + evicted + blocks_resident - sink_blocks)
    )
    num_pages = len(blocks) + 3
    pool_k = torch.full((num_pages, page, Hkv, d), float("nan"), dtype=dtype)
    pool_v = torch.full_like(pool_k, float("nan"))
    pages = (torch.randperm(num_pages - 1, generator=gen)[: len(blocks)] + 1).tolist()
    flat_k = torch.randn(T, Hkv, d, generator=gen).to(dtype)
    flat_v = torch.randn(T, Hkv, d, generator=gen).to(dtype)
    for idx, p in enumerate(pages):
        rows = slice(idx * page, min(T, (idx + 1) * page))
        count = rows.stop - rows.start
        pool_k[p, :count], pool_v[p, :count] = flat_k[rows], flat_v[rows]
    table = PageList.of(pages, blocks, page, torch.device("cpu"))
    wide = torch.randn(n, Hq, 2 * d, generator=gen).to(dtype)
    q = wide[..., :d]  # (n, Hq, d), row stride 2d
    q_pos = table.positions[T - n : T].clone()
    to = dict(device=device)
    table = PageList(table.ids.to(**to), None, table.positions.to(**to), table.end)
    return q.to(**to), q_pos.to(**to), pool_k.to(**to), pool_v.to(**to), table


def rope_for(d, device):
    return RotaryEmbedding(RopeConfig(theta=10000.0), d, device=device)


CASES = [
    # T, page, Hq, Hkv, d, n, evicted, W, G
    (63, 16, 6, 2, 64, 5, 0, 8, 4),  # page does not divide T, GQA 3
    (63, 12, 4, 4, 128, 1, 2, 16, 3),  # head_dim 128, MHA, decode after eviction
    (100, 7, 8, 2, 64, 17, 3, 32, 2),  # odd page size, a chunk wider than the band
    (40, 8, 2, 1, 64, 40, 0, 64, 1),  # G=1 and W beyond every distance: plain causal
]


@pytest.mark.parametrize("case", CASES)
def test_chunk_matches_reference_fp32(case):
    T, page, Hq, Hkv, d, n, evicted, W, G = case
    q, q_pos, k, v, table = paged_case(T, page, Hq, Hkv, d, n, evicted, torch.float32, "cpu")
    se, rope = SelfExtend(W, G), rope_for(d, "cpu")
    out, lse = self_extend_attention(q, q_pos, k, v, table, T, rope, se)
    ref_out, ref_lse = self_extend_naive(q, q_pos, k, v, table, T, rope, se)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_split_k_matches_reference(splits, n):
    # 300 keys: ranges are whole 64-key tiles, so 3 and 8 splits give 3 and 5 ranges.
    T, page, Hq, Hkv, d = 300, 16, 6, 2, 64
    q, q_pos, k, v, table = paged_case(T, page, Hq, Hkv, d, n, 4, torch.float32, "cpu", seed=1)
    se, rope = SelfExtend(16, 4), rope_for(d, "cpu")
    out, lse = self_extend_attention(q, q_pos, k, v, table, T, rope, se, splits=splits)
    ref_out, ref_lse = self_extend_naive(q, q_pos, k, v, table, T, rope, se)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def low_precision_budget(dtype, device, T, page, Hq, Hkv, d, n, se):
    """Kernel error in `dtype` vs 2x the error of the plain reference run in `dtype`, both
    against the float32 reference (flash-attention's budget)."""
    args = paged_case(T, page, Hq, Hkv, d, n, 1, dtype, device, seed=2)
    q, q_pos, k, v, table = args
    rope = rope_for(d, device)
    exact = self_extend_naive(q.float(), q_pos, k.float(), v.float(), table, T, rope, se)[0]
    low = self_extend_naive(q, q_pos, k, v, table, T, rope, se)[0]
    ours = self_extend_attention(q, q_pos, k, v, table, T, rope, se)[0]
    assert ours.dtype == dtype
    kernel_err = (ours.float() - exact).abs().max().item()
    torch_err = (low.float() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-3, (kernel_err, torch_err)


@pytest.mark.parametrize("n", [1, 9])
def test_half_precision_within_budget(n):
    # float16 only on CPU: Triton's interpreter gets bfloat16 tl.dot wrong (numpy has no
    # bfloat16; a 16x16 product came out ~1e10 off), so bfloat16 is tested on CUDA.
    low_precision_budget(torch.float16, "cpu", 63, 16, 4, 2, 64, n, SelfExtend(16, 4))


def test_shapes_are_checked():
    q, q_pos, k, v, table = paged_case(20, 8, 4, 2, 64, 1, 0, torch.float32, "cpu")
    rope = rope_for(64, "cpu")
    with pytest.raises(ValueError, match="k/v pages"):
        self_extend_attention(q, q_pos, k[..., :32], v, table, 20, rope, SelfExtend(8, 2))
    with pytest.raises(ValueError, match="k/v pages"):  # a flattened q is named, not unpacked
        self_extend_attention(q.flatten(1), q_pos, k, v, table, 20, rope, SelfExtend(8, 2))
    with pytest.raises(ValueError, match="one even head_dim"):
        self_extend_attention(q, q_pos, k[..., :32], v[..., :32], table, 20, rope, SelfExtend(8, 2))
    with pytest.raises(ValueError, match="num_keys"):
        self_extend_attention(q, q_pos, k, v, table, 500, rope, SelfExtend(8, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1, 200])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_realistic_sizes(n, d):
    low_precision_budget(torch.bfloat16, "cuda", 8192 + 37, 16, 32, 8, d, n, SelfExtend(1024, 8))
