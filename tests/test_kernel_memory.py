"""The memory-attention kernel against its plain-PyTorch reference (`naive.py`): on CPU
through Triton's interpreter, on CUDA (marked gpu) at real sizes."""

from __future__ import annotations

import pytest
import torch

from infinikv.kernels.memory.naive import memory_merge_naive
from infinikv.kernels.memory.ops import memory_merge_


def memory_case(n, Hq, Hkv, d, P, m, T, row_offset, dtype, device, empty=0.2, seed=0):
    """A resident partial for n positions, P groups of m query rows per kv-head, and a
    NaN-filled slab of which only the rows named by the table are written."""
    gen = torch.Generator().manual_seed(seed)
    slab_rows = 2 * Hkv * P * T + 7
    k_slab = torch.full((slab_rows, d), float("nan"))
    v_slab = torch.full((slab_rows, d), float("nan"))
    rows = torch.randperm(slab_rows, generator=gen)[: Hkv * P * T].view(Hkv, P, T)
    rows = rows.where(torch.rand(rows.shape, generator=gen) >= empty, -1)
    used = rows[rows >= 0]
    k_slab[used] = torch.randn(used.shape[0], d, generator=gen)
    v_slab[used] = torch.randn(used.shape[0], d, generator=gen)
    # queries stored (Hkv, P, d, m) and transposed: not contiguous
    queries = torch.randn(Hkv, P, d, m, generator=gen).transpose(2, 3)
    out = torch.randn(n, Hq, d, generator=gen)
    lse = torch.randn(n, Hq, generator=gen) * 3
    to = dict(device=device)
    return (
        out.to(dtype).to(**to),
        lse.to(**to),
        queries.to(dtype).to(**to),
        k_slab.to(dtype).to(**to),
        v_slab.to(dtype).to(**to),
        rows.to(**to),
        row_offset,
    )


CASES = {
    # n, Hq, Hkv, d, P, m, T, row_offset
    "token: each query row its own entries": (5, 6, 2, 64, 15, 1, 9, 0),
    "block, own positions": (4, 6, 2, 128, 4, 3, 70, 0),
    "block, a chunk's shared set after an offset": (7, 4, 1, 64, 1, 21, 33, 7),
    "block, decode, all slots empty for one group": (1, 9, 3, 64, 1, 3, 16, 0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_fp32(case):
    args = memory_case(*case, torch.float32, "cpu")
    if case[0] == 1:
        args[5][1] = -1  # kv-head 1 retrieved nothing: its rows keep the resident result
    want_out, want_lse = memory_merge_naive(*args)
    out, lse = args[0].clone(), args[1].clone()
    memory_merge_(out, lse, *args[2:])
    assert not out.isnan().any()
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def half_budget(dtype, device, case):
    """Kernel error in `dtype` at most 2x the plain reference's in `dtype` (vs float32)."""
    args = memory_case(*case, dtype, device, seed=3)
    exact_args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    exact = memory_merge_naive(*exact_args)[0]
    low = memory_merge_naive(*args)[0]
    out, lse = args[0].clone(), args[1].clone()
    memory_merge_(out, lse, *args[2:])
    kernel_err = (out.float() - exact).abs().max().item()
    torch_err = (low.float() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-3, (kernel_err, torch_err)


def test_float16_within_budget():
    # bfloat16 is tested on CUDA only: Triton's interpreter computes bfloat16 tl.dot wrong.
    half_budget(torch.float16, "cpu", (4, 6, 2, 64, 4, 3, 70, 0))


def test_shapes_are_checked():
    args = list(memory_case(2, 4, 2, 64, 2, 2, 8, 0, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="rows"):
        memory_merge_(args[0], args[1], args[2], args[3], args[4], args[5][0])
    with pytest.raises(ValueError, match="row_offset"):
        memory_merge_(*args[:6], row_offset=3)
    with pytest.raises(ValueError, match="float32"):
        memory_merge_(args[0], args[1].double(), *args[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [(1, 32, 8, 128, 1, 4, 16 * 64, 0), (256, 32, 8, 128, 1, 1024, 4096, 0)])
def test_cuda_realistic_sizes(case):
    half_budget(torch.bfloat16, "cuda", case)
