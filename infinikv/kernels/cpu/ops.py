"""The Python face of the CPU kernels: shape checks, then one ctypes call."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from infinikv.core.partial import Partial
from infinikv.kernels.cpu.build import library

HEAD_DIMS = (64, 128)
# The projection kernels' weight formats: bytes per weight, or the code of blocks of 32
# weights (blocks.h): Q4 blocks in uint8 tensors (`q4_blocks`), Q8 ones in int8 (`q8_blocks`).
WEIGHT_SIZES = {torch.float32: 4, torch.bfloat16: 2, torch.uint8: 1, torch.int8: 3}
BLOCK_WEIGHTS = 32
BLOCK_BYTES = {torch.uint8: 20, torch.int8: 34}  # GGUF Q4_1's and Q8_0's


def _check_blocks(q: torch.Tensor, *scales: torch.Tensor) -> tuple[int, int]:
    N, K = q.shape
    if K % BLOCK_WEIGHTS or N % 4 or any(s.shape != (N, K // BLOCK_WEIGHTS) for s in scales):
        raise ValueError(
            f"blocks need (N, K) with N % 4 == 0 and K % 32 == 0 and a scale per block, got {N}x{K}"
        )
    return N, K


def _halves(*scales: torch.Tensor) -> torch.Tensor:
    """The scales as float16 bytes (N, K/32 * 2 per scale), refusing values float16 cannot hold."""
    halves = torch.cat([s.half() for s in scales], dim=-1)
    if not torch.isfinite(halves).all():
        raise ValueError("block scales and minimums must fit float16 (|v| <= 65504)")
    return halves.contiguous().view(torch.uint8)


def q4_blocks(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The Q4 rows (N, K / 32 * 20) uint8 of the weight w = scale * q + low: q (N, K) integers
    in [0, 15], scale and low (N, K / 32) per group of 32 inputs, kept as float16: per row the
    blocks' 16 bytes (weight j low nibble, j + 16 high), then the scales, then the lows."""
    N, K = _check_blocks(q, scale, low)
    nibbles = q.to(torch.uint8).view(N, K // BLOCK_WEIGHTS, 2, BLOCK_WEIGHTS // 2)
    packed = (nibbles[:, :, 0] | nibbles[:, :, 1] << 4).view(N, -1)  # (N, K/2)
    return torch.cat([packed, _halves(scale, low)], dim=-1)


def q8_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The Q8 rows (N, K / 32 * 34) int8 of the weight w = scale * q: q (N, K) integers in
    [-127, 127], scale (N, K / 32) per group of 32 inputs, kept as float16 after the values."""
    N, K = _check_blocks(q, scale)
    return torch.cat([q.to(torch.int8), _halves(scale).view(torch.int8)], dim=-1)


def int8_activations() -> bool:
    """Whether Q4 and Q8 blocks multiply x quantized to int8 per block of 32 (CPUs with
    AVX512-VNNI), rather than float32 x (blocks.h)."""
    return bool(library().int8_activations())


def bf16_dot() -> bool:
    """Whether bfloat16 weights multiply x rounded to bfloat16 in the CPU's bfloat16 dot-product
    instruction (AVX512-BF16), rather than float32 x and the weights widened (matvec.h)."""
    return bool(library().bf16_dot())


def wide_vectors() -> bool:
    """Whether the kernels were built with 16-float registers (AVX-512). Without them the
    register tiles of a prefill chunk's attention run 12-16x slower than torch's flash kernel."""
    return bool(library().wide_vectors())


def amx_projections() -> bool:
    """Whether bfloat16 weights multiply x rounded to bfloat16 in AMX tiles (amx.h): this CPU
    has them, the build targets them and the OS granted this process their state."""
    return bool(library().amx_tiles())


def amx() -> bool:
    """Whether this CPU multiplies bfloat16 in AMX tiles (and the OS lets torch use them)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def bf16_tiles() -> bool:
    """Whether this CPU multiplies bfloat16 tiles: AMX (torch's kernel) or AVX512-BF16 (the chunk
    kernel's). A feature check, no kernel build: cpu.py takes torch's path where the build lacks them."""
    return amx() or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def q4_to_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """Q4 rows (N, K / 32 * 20) uint8 (`q4_blocks`) -> the weights (N, K) in bfloat16: each
    d q + m in float32, rounded to nearest even."""
    if (
        blocks.dtype != torch.uint8
        or blocks.dim() != 2
        or not blocks.is_contiguous()
        or blocks.device.type != "cpu"
    ):
        raise ValueError(
            f"need contiguous CPU Q4 rows (N, K / 32 * 20) uint8, got {tuple(blocks.shape)} {blocks.dtype}"
        )
    N, K = weight_shape(blocks)
    out = torch.empty(N, K, dtype=torch.bfloat16)
    library().q4_to_bf16(blocks.data_ptr(), out.data_ptr(), N, K, torch.get_num_threads())
    return out


def weight_shape(w: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a projection's weight in any of WEIGHT_SIZES' formats."""
    if w.dtype in BLOCK_BYTES:
        return w.shape[0], w.shape[1] // BLOCK_BYTES[w.dtype] * BLOCK_WEIGHTS
    return w.shape[0], w.shape[1]


# Query rows per kv-head up to which attention folds four rows at a time over the keys, split
# among the threads; beyond, register tiles of rows over the keys are ~2x torch's flash kernel
# (benchmarks/bench_kernels_cpu.py --queries 512).
FOLD_ROWS = 32
# The KV caches' formats the attention kernels read: bytes per value.
KV_SIZES = {torch.float32: 4, torch.bfloat16: 2}


def tiled(n: int, Hq: int, Hkv: int) -> bool:
    """Whether `paged_attention` runs n query rows in the chunk kernel's register tiles (more
    than FOLD_ROWS rows per kv-head) rather than folding them over the keys."""
    return n * Hq // Hkv > FOLD_ROWS


def _kv_size(*caches: torch.Tensor) -> int:
    """Bytes per value of caches the kernels read, or 0 where they cannot (mixed formats)."""
    sizes = {KV_SIZES.get(c.dtype, 0) for c in caches}
    return sizes.pop() if len(sizes) == 1 else 0


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_ids: torch.Tensor,
    start: int,
    stop: int,
    causal: bool,
    threads: int | None = None,
    bf16: bool = False,
) -> Partial:
    """Attention of rotated queries q (n, Hq, d) over the block table's slots [start, stop)
    of k_pages, v_pages (P, B, Hkv, d) float32 or both bfloat16 (keys already rotated as q
    expects), page_ids (n_pages,) int64. causal: the queries are the last n slots (query i
    sees slots < stop - n + 1 + i); else every query sees every slot. threads: at most this
    many (default: torch's). Up to FOLD_ROWS query rows per kv-head the keys are split
    among the threads (paged_attention.c), beyond them the rows (chunk_attention.c); bf16:
    the rows' kernel with everything rounded to bfloat16 and the CPU's bfloat16 dot product
    (`bf16_dot()`). Returns out (n, Hq, d) and lse (n, Hq), float32."""
    n, Hq, d = q.shape
    P, B, Hkv, _ = k_pages.shape
    tensors = (q, k_pages, v_pages)
    kv_size = _kv_size(k_pages, v_pages)
    if not (
        q.dtype == torch.float32
        and kv_size
        and d in HEAD_DIMS
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    ):
        raise ValueError(
            f"the CPU kernel takes contiguous CPU tensors with head_dim in {HEAD_DIMS}, q float32 "
            "and the pages both float32 or both bfloat16, got "
            + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in tensors)
        )
    if v_pages.shape != k_pages.shape or k_pages.shape[-1] != d or Hq % Hkv:
        raise ValueError(
            f"need q (n, g*Hkv, d), k and v pages (P, B, Hkv, d), got {q.shape}, {k_pages.shape}"
        )
    if page_ids.dtype != torch.long or page_ids.device.type != "cpu" or not page_ids.is_contiguous():
        raise ValueError(
            f"page_ids must be contiguous int64 on the CPU, got {page_ids.dtype} {page_ids.device}"
        )
    if not 0 <= start < stop <= page_ids.shape[0] * B or (causal and stop - start < n):
        raise ValueError(
            f"slots [{start}, {stop}) must lie in the table's {page_ids.shape[0] * B}"
            + (f" and hold the {n} queries" if causal else "")
        )
    if bf16 and not bf16_dot():
        raise ValueError("bfloat16 attention needs a CPU with AVX512-BF16")
    limit = stop - n + 1 if causal else stop + n  # row i sees slots < limit + i
    out = torch.empty_like(q)
    lse = torch.empty(n, Hq)
    inputs = (q.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr())
    shape = (kv_size, P, page_ids.data_ptr(), start, stop, limit, n, Hq, Hkv, d, B, d**-0.5)
    results = (out.data_ptr(), lse.data_ptr(), threads or torch.get_num_threads())
    if bf16 or tiled(n, Hq, Hkv):
        status = library().chunk_attention(*inputs, *shape, int(bf16), *results)
    else:
        status = library().paged_attention(*inputs, *shape, *results)
    if status == 2:
        raise ValueError(f"the block table names a page outside the {P} pages")
    if status:
        raise MemoryError("the CPU attention kernel could not allocate its scratch")
    return out, lse


def _check_projection(x: torch.Tensor, *weights: torch.Tensor, floats: tuple[torch.Tensor, ...] = ()) -> int:
    """Refuse what the projection kernels cannot run; the weights' bytes per value."""
    tensors = (x, *weights, *floats)
    if not (
        all(t.dtype == torch.float32 for t in (x, *floats))
        and weights[0].dtype in WEIGHT_SIZES
        and all(w.dtype == weights[0].dtype for w in weights)
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and all(
            w.dtype not in BLOCK_BYTES or w.shape[0] % 4 == 0 == w.shape[1] % BLOCK_BYTES[w.dtype]
            for w in weights
        )
    ):
        raise ValueError(
            "the CPU kernel takes contiguous CPU tensors, the weights float32, bfloat16, Q4 or Q8 "
            "blocks (of whole groups of four rows) and everything else float32, got "
            + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in tensors)
        )
    return WEIGHT_SIZES[weights[0].dtype]


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N) float32, contiguous CPU tensors, x float32 and the
    weight float32, bfloat16, Q4 or Q8 blocks (widened exactly, or de-quantized; products
    and sums in float32): the kernel for few rows (it streams the weights once; M rows each
    reread them from L1)."""
    size = _check_projection(x, weight)
    if x.dim() != 2 or weight.dim() != 2 or weight_shape(weight)[1] != x.shape[1]:
        raise ValueError(f"need x (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    (M, K), N = x.shape, weight.shape[0]
    y = torch.empty(M, N)
    library().linear_rows(
        x.data_ptr(), weight.data_ptr(), size, y.data_ptr(), M, N, K, torch.get_num_threads()
    )
    return y


def norm_project(
    x: torch.Tensor, norm: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """rms_norm(x (M, K)) * norm (K,), then @ weight (N, K)^T (+ bias (N,)) -> (M, N) float32,
    in one call (a decoder layer's q, k, v projections on its input)."""
    vectors = (norm,) if bias is None else (norm, bias)
    size = _check_projection(x, weight, floats=vectors)
    M, K, N = x.shape[0], x.shape[-1], weight.shape[0]
    if (
        x.dim() != 2
        or weight.dim() != 2
        or weight_shape(weight)[1] != K
        or norm.shape != (K,)
        or (bias is not None and bias.shape != (N,))
    ):
        raise ValueError(
            f"need x (M, K), norm (K,), weight (N, K), bias (N,), got {tuple(x.shape)}, "
            f"{tuple(norm.shape)}, {tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}"
        )
    h, y = torch.empty(M, K), torch.empty(M, N)
    # fmt: off
    library().norm_project(
        x.data_ptr(), norm.data_ptr(), eps, weight.data_ptr(), size, 0 if bias is None else bias.data_ptr(),
        h.data_ptr(), y.data_ptr(), M, N, K, torch.get_num_threads(),
    )
    # fmt: on
    return y


def mlp_residual(
    x: torch.Tensor,
    attn: torch.Tensor,
    o: torch.Tensor,
    o_bias: torch.Tensor | None,
    norm: torch.Tensor,
    eps: float,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> None:
    """The rest of a decoder layer after attention, on x (M, D) in place, in one call:
    x += attn (M, A) @ o (D, A)^T (+ o_bias); then with [gate | up] = rms_norm(x) * norm @
    gate_up (2F, D)^T, x += (silu(gate) * up) @ down (D, F)^T."""
    vectors = (norm,) if o_bias is None else (norm, o_bias)
    size = _check_projection(x, o, gate_up, down, floats=(attn, *vectors))
    M, D, A, F = x.shape[0], x.shape[-1], attn.shape[-1], weight_shape(down)[-1]
    if not (
        x.dim() == 2
        and attn.shape == (M, A)
        and weight_shape(o) == (D, A)
        and norm.shape == (D,)
        and weight_shape(gate_up) == (2 * F, D)
        and weight_shape(down) == (D, F)
        and (o_bias is None or o_bias.shape == (D,))
    ):
        raise ValueError(
            "need x (M, D), attn (M, A), o (D, A), norm (D,), gate_up (2F, D), down (D, F), got "
            + ", ".join(str(tuple(t.shape)) for t in (x, attn, o, norm, gate_up, down))
        )
    scratch = torch.empty(M * (D + 3 * F))
    # fmt: off
    library().mlp_residual(
        x.data_ptr(), attn.data_ptr(), o.data_ptr(), 0 if o_bias is None else o_bias.data_ptr(), A,
        norm.data_ptr(), eps, gate_up.data_ptr(), down.data_ptr(), size,
        scratch.data_ptr(), M, D, F, torch.get_num_threads(),
    )
    # fmt: on


class LayerWeights(ctypes.Structure):
    """One decoder layer's tensors as stack.c reads them (layer_t)."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("input_norm", "qkv", "qkv_bias", "o", "o_bias", "post_norm", "gate_up", "down")
    ]


def layer_table(layers: Sequence[Sequence[torch.Tensor | None]]) -> tuple[ctypes.Array, int]:
    """The weights of every decoder layer, each (input_norm, qkv, qkv_bias, o, o_bias,
    post_norm, gate_up, down) (a bias may be None), checked once for `decoder_stack`: the
    projections contiguous CPU tensors of one of WEIGHT_SIZES' formats, the rest float32.
    Returns the table and the projections' format code."""
    projections = [w for layer in layers for w in (layer[1], layer[3], layer[6], layer[7])]
    vectors = [w for layer in layers for w in (layer[0], layer[2], layer[4], layer[5]) if w is not None]
    size = _check_projection(vectors[0], *projections, floats=tuple(vectors[1:]))
    table = (LayerWeights * len(layers))()
    for entry, tensors in zip(table, layers, strict=True):
        for (name, _), t in zip(LayerWeights._fields_, tensors, strict=True):
            setattr(entry, name, None if t is None else t.data_ptr())
    return table, size


def decoder_stack(
    x: torch.Tensor,
    layers: tuple[ctypes.Array, int],
    num_layers: int,
    eps: float,
    dims: tuple[int, int, int, int, int],
    phases: torch.Tensor,
    group_phases: torch.Tensor | None,
    caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    slots: torch.Tensor,
    seqs: Sequence[tuple[int, int, torch.Tensor, int]],
) -> None:
    """The first `num_layers` layers of `layers` (`layer_table`'s) on x (M, D) in place, in
    one call (stack.c): dims (D, F, Hq, Hkv, d); phases, group_phases (M, d/2, 2)
    float32 at each row's own and grouped position (None: the pool keeps no k_group); caches
    k, k_rope, v, k_group (L, P, B, Hkv, d), all float32 or all bfloat16 (k_group None: it is
    k_rope); slots (M,) int64;
    seqs: (first row, rows, block table ids, resident slots), its rows the last of them."""
    D, F, Hq, Hkv, d = dims
    k, k_rope, v, k_group = caches
    floats = [x, phases, *(() if group_phases is None else (group_phases,))]
    caches_in = [k, k_rope, v, *(() if k_group is None else (k_group,))]
    kv_size = _kv_size(*caches_in)
    if not (
        kv_size
        and all(t.dtype == torch.float32 for t in floats)
        and all(t.device.type == "cpu" and t.is_contiguous() for t in floats + caches_in)
    ):
        raise ValueError(
            "the decoder stack takes contiguous CPU tensors: activations and phases float32, "
            "the caches all float32 or all bfloat16"
        )
    if (group_phases is None) != (k_group is None) or d not in HEAD_DIMS:
        raise ValueError(f"need grouped phases with a k_group cache and head_dim in {HEAD_DIMS}")
    M = x.shape[0]
    if (
        phases.shape != (M, d // 2, 2)
        or slots.shape != (M,)
        or slots.dtype != torch.long
        or not slots.is_contiguous()
    ):
        raise ValueError(f"need phases ({M}, {d // 2}, 2) and contiguous int64 slots ({M},) for x's {M} rows")
    (table, weight_size), (L, P, B) = layers, k.shape[:3]
    if not 0 < num_layers <= min(L, len(table)):
        raise ValueError(f"num_layers must be in [1, {min(L, len(table))}], got {num_layers}")
    for first, rows, ids, kv_len in seqs:
        if ids.dtype != torch.long or not ids.is_contiguous() or not rows <= kv_len <= ids.shape[0] * B:
            raise ValueError(
                f"rows [{first}, {first + rows}) need {kv_len} >= {rows} slots in their block table"
            )
    if [0, *(first + rows for first, rows, *_ in seqs)] != [first for first, *_ in seqs] + [M]:
        raise ValueError(
            f"the sequences' rows must run over x's {M} rows in order, got {[s[:2] for s in seqs]}"
        )
    S = len(seqs)
    columns = [
        (ctypes.c_int64 * S)(*values) for values in zip(*((s[0], s[1], s[3]) for s in seqs), strict=True)
    ]
    tables = (ctypes.c_void_p * S)(*(s[2].data_ptr() for s in seqs))
    # fmt: off
    status = library().decoder_stack(
        x.data_ptr(), M, num_layers, table, weight_size, eps, D, F, Hq, Hkv, d,
        phases.data_ptr(), None if group_phases is None else group_phases.data_ptr(),
        k.data_ptr(), k_rope.data_ptr(), v.data_ptr(), None if k_group is None else k_group.data_ptr(),
        kv_size, P, B,
        slots.data_ptr(), S, columns[0], columns[1], tables, columns[2], d**-0.5, torch.get_num_threads(),
    )
    # fmt: on
    if status == 2:
        raise ValueError(f"a block table names a page outside the {P} pages")
    if status:
        raise MemoryError("the CPU decoder stack could not allocate its scratch")
