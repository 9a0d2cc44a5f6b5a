"""The C attention kernel (`infinikv.kernels.cpu`) against the plain-PyTorch partial
attention: awkward lengths, page sizes that do not divide them, shuffled block tables,
NaN in every slot it must not read, GQA, both head sizes, causal and unmasked ranges,
float32 and bfloat16 pages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinikv.core.partial import reference_partial
from infinikv.kernels.cpu import build
from infinikv.kernels.cpu.ops import (
    amx,
    amx_projections,
    bf16_dot,
    int8_activations,
    linear,
    mlp_residual,
    norm_project,
    paged_attention,
    q4_blocks,
    q8_blocks,
)

from .conftest import kernel_rows


def paged(T: int, B: int, Hkv: int, d: int, gen: torch.Generator):
    """Keys and values of T slots in shuffled pages of size B (page 0 and the tail of the
    last page NaN), the block table, and the same slots in order."""
    n_pages = -(-T // B)
    k_pages = torch.full((n_pages + 3, B, Hkv, d), float("nan"))
    v_pages = torch.full_like(k_pages, float("nan"))
    ids = torch.randperm(n_pages + 2, generator=gen)[:n_pages] + 1
    k = torch.randn(T, Hkv, d, generator=gen)
    v = torch.randn(T, Hkv, d, generator=gen)
    k_pages.view(-1, Hkv, d)[(ids[:, None] * B + torch.arange(B)).flatten()[:T]] = k
    v_pages.view(-1, Hkv, d)[(ids[:, None] * B + torch.arange(B)).flatten()[:T]] = v
    return k_pages, v_pages, ids, k, v


@pytest.mark.parametrize(
    "T, B, n, Hq, Hkv, d",
    [
        (63, 16, 1, 9, 3, 64),  # SmolLM2's heads, a page size that does not divide T
        (1, 16, 1, 9, 3, 64),
        (200, 7, 5, 8, 2, 128),  # a 5-row verification, 4 heads per kv-head: two 4-row tiles
        (2000, 16, 1, 14, 2, 64),  # Qwen2.5-0.5B's 7 heads per kv-head; long enough for 3 threads
        (130, 32, 3, 4, 4, 128),  # no GQA
        (300, 16, 40, 9, 3, 64),  # a chunk: 120 rows per kv-head, tiles of 6, items of 48
        (517, 7, 70, 8, 2, 128),  # a chunk: 280 rows, the last tile and block partial
    ],
)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(T, B, n, Hq, Hkv, d, causal, kv_dtype) -> None:
    gen = torch.Generator().manual_seed(T + n)
    k_pages, v_pages, ids, k, v = paged(T, B, Hkv, d, gen)
    k_pages, v_pages = k_pages.to(kv_dtype), v_pages.to(kv_dtype)  # widened exactly as read
    k, v = k.to(kv_dtype).float(), v.to(kv_dtype).float()
    q = torch.randn(n, Hq, d, generator=gen)
    for start in (0, T // 3):
        visible = None
        if causal:
            visible = torch.arange(start, T)[None] <= torch.arange(T - n, T)[:, None]  # (n, T - start)
        if causal and T - start < n:
            continue
        want_out, want_lse = reference_partial(q, k[start:], v[start:], visible)
        for threads in (1, 3):  # slots split three ways where there are enough of them
            out, lse = paged_attention(q, k_pages, v_pages, ids, start, T, causal, threads)
            torch.testing.assert_close(out, want_out, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(lse, want_lse, atol=2e-6, rtol=1e-5)


def test_chunk_rows_do_not_depend_on_their_company() -> None:
    """A chunk's rows come out bit for bit the same whatever the other rows hold and however
    many threads share them: a prompt's output does not depend on what runs beside it."""
    gen = torch.Generator().manual_seed(3)
    k_pages, v_pages, ids, _, _ = paged(700, 16, 3, 64, gen)
    q = torch.randn(100, 9, 64, generator=gen)
    other = q.clone()
    other[:37] = torch.randn(37, 9, 64, generator=gen)
    want = paged_attention(q, k_pages, v_pages, ids, 0, 700, True, threads=1)
    for rows, threads in ((q, 3), (other, 1), (other, 2)):
        out, lse = paged_attention(rows, k_pages, v_pages, ids, 0, 700, True, threads=threads)
        assert torch.equal(out[37:], want[0][37:]) and torch.equal(lse[37:], want[1][37:])


@pytest.mark.skipif(not bf16_dot(), reason="bfloat16 tiles need AVX512-BF16")
@pytest.mark.parametrize("T, n, Hq, Hkv, d", [(700, 100, 9, 3, 64), (301, 37, 8, 2, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_tiles_match_reference_on_rounded_inputs(T, n, Hq, Hkv, d, causal) -> None:
    """bf16: the scaled queries, keys and values rounded to bfloat16, their products exact;
    the probabilities' rounding is the rest of the error (~2^-9 of each value)."""
    gen = torch.Generator().manual_seed(T)
    k_pages, v_pages, ids, k, v = paged(T, 16, Hkv, d, gen)
    q = torch.randn(n, Hq, d, generator=gen) * 2
    rounded = (q * d**-0.5).bfloat16().float() * d**0.5
    visible = torch.arange(T)[None] <= torch.arange(T - n, T)[:, None] if causal else None
    want_out, want_lse = reference_partial(rounded, k.bfloat16().float(), v.bfloat16().float(), visible)
    out, lse = paged_attention(q, k_pages, v_pages, ids, 0, T, causal, bf16=True)
    torch.testing.assert_close(out, want_out, atol=4e-3, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    exact = paged_attention(q, k_pages, v_pages, ids, 0, T, causal)[0]
    assert (out - exact).abs().max() > 1e-4  # it did round


def test_kernel_merges_long_ranges_exactly() -> None:
    """Scores that differ by far more than float32's exp range: the running max rescales."""
    gen = torch.Generator().manual_seed(1)
    k_pages, v_pages, ids, k, v = paged(3000, 16, 3, 64, gen)
    k[2500] *= 40  # one key dominates late in the range
    k_pages.view(-1, 3, 64)[(ids[:, None] * 16 + torch.arange(16)).flatten()[2500]] = k[2500]
    q = torch.randn(1, 9, 64, generator=gen) * 4
    want_out, want_lse = reference_partial(q, k, v)
    for threads in (1, 2, 5):  # the dominant key in the last thread's share, or the only one's
        out, lse = paged_attention(q, k_pages, v_pages, ids, 0, 3000, causal=False, threads=threads)
        torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)


def test_kernel_refuses_what_it_cannot_run() -> None:
    gen = torch.Generator().manual_seed(2)
    k_pages, v_pages, ids, _, _ = paged(40, 8, 2, 64, gen)
    q = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="float32"):
        paged_attention(q.double(), k_pages, v_pages, ids, 0, 40, True)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(
            q[..., :32], k_pages[..., :32].contiguous(), v_pages[..., :32].contiguous(), ids, 0, 40, True
        )
    with pytest.raises(ValueError, match="contiguous"):
        paged_attention(q, k_pages.transpose(0, 1), v_pages, ids, 0, 40, True)
    with pytest.raises(ValueError, match="both float32 or both bfloat16"):
        paged_attention(q, k_pages.bfloat16(), v_pages, ids, 0, 40, True)
    with pytest.raises(ValueError, match="must lie in the table"):
        paged_attention(q, k_pages, v_pages, ids, 0, 41, True)
    with pytest.raises(ValueError, match="page outside"):
        paged_attention(q, k_pages, v_pages, ids + 100, 0, 40, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "M, N, K",
    [
        *[(1, 576, 576), (3, 13, 40), (32, 960, 577), (1, 7, 16), (5, 49152 // 16, 64), (4, 8, 32)],
        (9, 20, 48),
        *[(17, 48, 64), (64, 960, 576), (70, 192, 1536)],  # whole AMX tiles: 16 x 32, 64 rows a pass
    ],
)
def test_linear_matches_torch(M, N, K, dtype) -> None:
    """Row counts of W that are not a multiple of 4, inner sizes not a multiple of 16 or 32,
    row counts of x on both sides of the 4-row tiles; bfloat16 weights multiply x rounded to
    bfloat16 where the CPU has AVX512-BF16 (else x itself; the weights widened exactly either
    way): the exact sums of those products, to float32 rounding."""
    gen = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen).to(dtype)
    xk = kernel_rows(x, dtype)
    y = linear(x, w)
    torch.testing.assert_close(y, (xk.double() @ w.double().T).float(), atol=1e-4, rtol=1e-5)
    if dtype != torch.float32:
        torch.testing.assert_close(y, linear(xk, w.float()), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K, rows", [(46, 200, 20), (48, 224, 70)])
def test_each_row_of_linear_is_its_row_alone(dtype, N, K, rows) -> None:
    """Row counts 1-20 (four rows of x against four of W; in bfloat16 five to eight against
    two of W; past eight six against four, float32 and the bfloat16 dot product; and their rests), W's
    rows not a multiple of 4, K not of 16; and 1-70 rows against whole AMX tiles (where they
    run: 16 rows a tile, 64 a pass): each row of the result equals the row alone, bit
    for bit (what batching relies on)."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(rows, K, generator=gen), torch.randn(N, K, generator=gen).to(dtype)
    alone = torch.cat([linear(x[i : i + 1], w) for i in range(rows)])
    for m in range(1, rows + 1):
        assert torch.equal(linear(x[:m], w), alone[:m]), f"{m} rows"


def test_amx_runs_only_when_asked() -> None:
    """bfloat16 weights go through AMX tiles exactly where INFINIKV_AMX=1 and the CPU has them."""
    assert amx_projections() == (os.environ.get("INFINIKV_AMX") == "1" and amx())


@pytest.mark.skipif(not amx() or os.environ.get("INFINIKV_AMX") == "1", reason="needs AMX; asked already")
def test_bf16_projections_in_amx_tiles() -> None:
    """The projection tests again in a process that asks for AMX tiles (amx.h)."""
    tests = "amx_runs_only_when_asked or linear_matches_torch or each_row_of_linear or layer_parts_match"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    subprocess.run(command, env={**os.environ, "INFINIKV_AMX": "1"}, check=True)


def test_linear_refuses_what_it_cannot_run() -> None:
    x, w = torch.randn(2, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="float32"):
        linear(x.double(), w.double())
    with pytest.raises(ValueError, match="bfloat16"):
        linear(x, w.half())
    with pytest.raises(ValueError, match="contiguous"):
        linear(x, torch.randn(32, 8).T)
    with pytest.raises(ValueError, match=r"need x \(M, K\)"):
        linear(x, torch.randn(8, 16))


def layer_weights(D: int, A: int, F_: int, N: int, dtype: torch.dtype, bias: bool, gen: torch.Generator):
    """A decoder layer's weights at scales that keep its activations O(1)."""

    def w(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) / cols**0.5).to(dtype)

    def vec(n: int) -> torch.Tensor | None:
        return torch.randn(n, generator=gen) if bias else None

    norms = 1 + 0.1 * torch.randn(2, D, generator=gen)
    return dict(
        qkv=w(N, D), qkv_bias=vec(N), input_norm=norms[0], o=w(D, A), o_bias=vec(D),
        post_norm=norms[1], gate_up=w(2 * F_, D), down=w(D, F_),
    )  # fmt: skip


# (M, D, A, F, N): SmolLM2's sizes at a decode step and at a 5-row verification; sizes that
# are not multiples of 16 or 4, with 12 and 13 rows (3 whole 4-row tiles, and one more).
LAYER_SHAPES = [(1, 576, 576, 1536, 960), (5, 576, 576, 1536, 960), (12, 40, 24, 37, 30), (13, 17, 8, 5, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M, D, A, F_, N", LAYER_SHAPES)
def test_layer_parts_match_pytorch(M, D, A, F_, N, bias, dtype) -> None:
    """norm_project and mlp_residual against the same layer in PyTorch operations, in float64
    on the float32 values of the weights (bfloat16 ones widened exactly), each projection's
    input as the kernels take it (kernel_rows; an input at a rounding tie of float32's may
    round the other way: one bfloat16 step of one input, within the looser atol)."""
    gen = torch.Generator().manual_seed(M * D + N + bias)
    p = layer_weights(D, A, F_, N, dtype, bias, gen)
    x, attn, eps = torch.randn(M, D, generator=gen), torch.randn(M, A, generator=gen), 1e-5
    d = {k: None if v is None else v.double() for k, v in p.items()}
    x64 = x.double()
    atol = 5e-4 if dtype == torch.bfloat16 and bf16_dot() else 1e-4

    def project(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(kernel_rows(t.float(), dtype).double(), w, b)

    want_qkv = project(torch.nn.functional.rms_norm(x64, (D,), d["input_norm"], eps), d["qkv"], d["qkv_bias"])
    got_qkv = norm_project(x, p["input_norm"], eps, p["qkv"], p["qkv_bias"])
    torch.testing.assert_close(got_qkv, want_qkv.float(), atol=atol, rtol=1e-4)

    h = x64 + project(attn.double(), d["o"], d["o_bias"])
    normed = torch.nn.functional.rms_norm(h, (D,), d["post_norm"], eps)
    gate, up = project(normed, d["gate_up"]).chunk(2, dim=-1)
    want = h + project(torch.nn.functional.silu(gate) * up, d["down"])
    got = x.clone()
    mlp_residual(got, attn, p["o"], p["o_bias"], p["post_norm"], eps, p["gate_up"], p["down"])
    torch.testing.assert_close(got, want.float(), atol=atol, rtol=1e-4)


def test_silu_keeps_large_negative_gates_finite() -> None:
    """A gate far below zero contributes silu(g) ~ 0, not NaN (the kernel's exp stays finite)."""
    D, F_ = 16, 4
    x, attn = torch.zeros(1, D), torch.zeros(1, D)
    gate_up = torch.zeros(2 * F_, D)
    gate_up[:F_] = -1e4  # every gate ~ -1e4 * sum(norm(x)); x = 0 + bias below
    gate_up[F_:] = 1.0
    o_bias = torch.ones(D)
    mlp_residual(x, attn, torch.zeros(D, D), o_bias, torch.ones(D), 1e-5, gate_up, torch.ones(D, F_))
    torch.testing.assert_close(x, torch.ones(1, D))


def test_layer_parts_refuse_what_they_cannot_run() -> None:
    p = layer_weights(16, 8, 4, 12, torch.float32, True, torch.Generator().manual_seed(0))
    x, attn = torch.randn(2, 16), torch.randn(2, 8)
    with pytest.raises(ValueError, match="float32, bfloat16, Q4 or Q8 blocks"):
        norm_project(x, p["input_norm"], 1e-5, p["qkv"].half(), None)
    with pytest.raises(ValueError, match=r"need x \(M, K\), norm"):
        norm_project(x, p["input_norm"][:8], 1e-5, p["qkv"], None)
    with pytest.raises(ValueError, match="everything else float32"):
        mlp_residual(x.double(), attn, p["o"], None, p["post_norm"], 1e-5, p["gate_up"], p["down"])
    with pytest.raises(ValueError, match="float32, bfloat16, Q4 or Q8 blocks"):  # the weights in one format
        mlp_residual(x, attn, p["o"].bfloat16(), None, p["post_norm"], 1e-5, p["gate_up"], p["down"])
    with pytest.raises(ValueError, match=r"need x \(M, D\)"):
        mlp_residual(x, attn[:, :4].contiguous(), p["o"], None, p["post_norm"], 1e-5, p["gate_up"], p["down"])


def test_loading_the_kernels_leaves_the_process_floating_point_alone() -> None:
    """Linked with -ffast-math, a shared library sets flush-to-zero for the whole process at
    load (gcc's crtfastmath.o): subnormals would vanish in torch and numpy too."""
    script = (
        "from infinikv.kernels.cpu.build import library; library(); "
        "x = float('2.2250738585072014e-308'); import torch; "
        "assert x / 4 > 0 and torch.tensor(1e-39).mul(1.0).item() > 0, 'flush-to-zero'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_the_built_kernels_are_cached_per_machine_and_a_damaged_copy_is_rebuilt(tmp_path) -> None:
    """The second process loads the first's build without compiling; a cached file that does
    not load (truncated, another format) is rebuilt; other sources or flags name another file."""
    calls = tmp_path / "cc-calls"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {build.compiler()} "$@"\n')
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    key = build.build_key(str(cc), "native")  # what a process with CC=cc computes
    cached = tmp_path / "cache" / "infinikv" / "kernels" / f"kernels-{key}.so"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a shared library")
    load = "from infinikv.kernels.cpu.build import library; assert library().wide_vectors() in (0, 1)"

    def compiles() -> int:
        done = [line for line in calls.read_text().splitlines() if line.startswith("-c ")]
        calls.write_text("")
        return len(done)

    subprocess.run([sys.executable, "-c", load], env=env, check=True)
    assert compiles() == len(build.SOURCES) and cached.read_bytes()[:4] == b"\x7fELF"
    subprocess.run([sys.executable, "-c", load], env=env, check=True)
    assert compiles() == 0
    assert build.build_key(str(cc), "haswell") != build.build_key(str(cc), "native")


def test_kernel_sources_decide_the_cache_name(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "src"
    shutil.copytree(build.HERE, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    cc = build.compiler()
    monkeypatch.setattr(build, "HERE", copy)
    same = build.build_key(cc, "native")
    (copy / "vec.h").write_text((copy / "vec.h").read_text() + "\n")
    assert same != build.build_key(cc, "native")
    monkeypatch.undo()
    assert build.build_key(cc, "native") == same


def block_weights(fmt: str, N: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4 or Q8 blocks of random values (float16 scales) and the float32 weight they hold."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(N, K // 32, generator=g) * 0.02 + 1e-3).half().float()
    if fmt == "q4":
        q = torch.randint(0, 16, (N, K), generator=g)
        offset = (-torch.rand(N, K // 32, generator=g) * 0.1).half().float()
        blocks = q4_blocks(q, scale, offset)
    else:
        q = torch.randint(-127, 128, (N, K), generator=g)
        blocks, offset = q8_blocks(q, scale), torch.zeros_like(scale)
    return blocks, (q.view(N, -1, 32) * scale[..., None] + offset[..., None]).view(N, K)


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantized per block of 32 as the kernel does (blocks.h): q = round(x / dx), dx = max|x| / 127."""
    M, K = x.shape
    amax = x.view(M, K // 32, 32).abs().amax(-1, keepdim=True)
    q = torch.round(x.view(M, K // 32, 32) * torch.where(amax > 0, 127 / amax, 0))
    return q.view(M, K), (amax / 127).expand(M, K // 32, 32).reshape(M, K)


@pytest.mark.parametrize("rows", [1, 3, 5, 17, 32])
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("K", [96, 224, 576, 736, 1536])
def test_block_weights_project_their_values(rows: int, fmt: str, K: int) -> None:
    """Q4 and Q8 blocks (llama.cpp's Q4_1 and Q8_0), rows of 3 to 48 blocks (whole groups of 16
    and the rests): with int8 activations, within the bound of x's rounding (each x within dx / 2
    of its int8 value) of the exact product and within one rounding step of the int8 product,
    each row's result that of the row alone; else float32 products of the weights."""
    N = 36
    blocks, w = block_weights(fmt, N, K, seed=rows + K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(K))
    got, exact = linear(x, blocks), x.double() @ w.double().T
    if not int8_activations():
        torch.testing.assert_close(got, exact.float(), rtol=1e-5, atol=1e-4)
        return
    q, dx = int8_rows(x)
    rounding = (dx.double() / 2) @ w.double().abs().T  # (M, N)
    assert ((got - exact).abs() <= rounding * (1 + 1e-4) + 1e-5).all()
    one_step = dx.double().amax(-1, keepdim=True) * w.double().abs().amax(-1)  # a tie rounded the other way
    assert ((got - (q * dx).double() @ w.double().T).abs() <= one_step + 1e-4).all()
    assert torch.equal(torch.cat([linear(x[i : i + 1], blocks) for i in range(rows)]), got)


def test_blocks_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(ValueError, match="N % 4 == 0 and K % 32 == 0"):
        q4_blocks(torch.zeros(6, 96), torch.ones(6, 3), torch.ones(6, 3))
    with pytest.raises(ValueError, match="fit float16"):
        q8_blocks(torch.zeros(4, 32), torch.full((4, 1), 1e5))


@pytest.mark.parametrize(
    "arch, flag", [("x86-64-v3", "avx2"), ("skylake-avx512", "avx512f")], ids=["avx2", "avx512-no-vnni"]
)
def test_kernels_on_cpus_without_vnni_or_bf16(arch: str, flag: str) -> None:
    """The kernels built for an older CPU (INFINIKV_CPU_ARCH) de-quantize the blocks to float32
    (the projection of the weights they hold) and widen bfloat16 weights, x unrounded (the
    path CPUs without AVX512-BF16 take), float32 and bfloat16 rows each as alone (AVX2: in
    8-float halves, tiles of three rows and their remainders); the chunk tiles in float32, and
    bfloat16 tiles refused; the AVX2 build says it lacks wide vectors (chunks go to torch's)."""
    from benchmarks.machine import cpu_features

    if flag not in cpu_features():
        pytest.skip(f"this CPU has no {flag}")
    script = (
        "import torch\n"
        "from infinikv.kernels.cpu.ops import bf16_dot, int8_activations, linear, wide_vectors\n"
        "from tests.test_kernel_cpu import block_weights\n"
        "assert not int8_activations()\n"
        f"assert wide_vectors() == {flag == 'avx512f'}\n"
        "for fmt in ('q4', 'q8'):\n"
        "    for rows, K in ((1, 576), (5, 96), (17, 736)):\n"
        "        blocks, w = block_weights(fmt, 36, K, seed=rows)\n"
        "        x = torch.randn(rows, K)\n"
        "        y = linear(x, blocks)\n"
        "        torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)\n"
        "        assert torch.equal(torch.cat([linear(x[i : i + 1], blocks) for i in range(rows)]), y)\n"
        "assert not bf16_dot()\n"
        "for dtype, rows in ((torch.float32, 10), (torch.bfloat16, 11)):\n"
        "    x, w = torch.randn(rows, 577), torch.randn(46, 577).to(dtype)\n"
        "    y = linear(x, w)\n"
        "    torch.testing.assert_close(y, (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-4)\n"
        "    assert torch.equal(torch.cat([linear(x[i : i + 1], w) for i in range(rows)]), y)\n"
        "from infinikv.core.partial import reference_partial\n"
        "from infinikv.kernels.cpu.ops import paged_attention\n"
        "from tests.test_kernel_cpu import paged\n"
        "kp, vp, ids, k, v = paged(300, 16, 3, 64, torch.Generator().manual_seed(0))\n"
        "q = torch.randn(40, 9, 64)\n"
        "out, want = paged_attention(q, kp, vp, ids, 0, 300, False)[0], reference_partial(q, k, v)[0]\n"
        "torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)\n"
        "try:\n"
        "    paged_attention(q, kp, vp, ids, 0, 300, False, bf16=True)\n"
        "    raise AssertionError('bfloat16 tiles ran without AVX512-BF16')\n"
        "except ValueError as e:\n"
        "    assert 'AVX512-BF16' in str(e)\n"
    )
    env = {**os.environ, "INFINIKV_CPU_ARCH": arch}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=Path(__file__).parents[1])


def test_released_team_leaves_the_kernels_working_on_every_thread() -> None:
    """After the calling thread's OpenMP team is freed (the engine does it before its worker
    starts), parallel regions on that thread and on another give the same results."""
    import threading

    from infinikv.kernels.cpu.threads import release_team

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 64, generator=g), torch.randn(3, 64, generator=g)
    want = linear(x, w)
    release_team()
    results = [linear(x, w)]
    worker = threading.Thread(target=lambda: results.append(linear(x, w)))
    worker.start()
    worker.join()
    assert all(torch.equal(r, want) for r in results) and len(results) == 2
