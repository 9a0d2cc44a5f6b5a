"""GPU: the Triton kernels vs the PyTorch path and SDPA-flash, and end-to-end decode vs
transformers (sdpa), at 8k / 32k / 128k tokens of context.

    python benchmarks/bench_kernels.py            # on a CUDA machine, both parts
    python benchmarks/bench_kernels.py --parts kernels --lengths 8192

Part `kernels` (Llama-3-8B attention shapes: 32 query heads, 8 kv-heads, head_dim 128,
bfloat16, 16-token pages): per call, in ms,
  * Self-Extend over N resident tokens (W=1024, G=8): the kernel (`self_extend_attention`: split-K
    for one query, 64-row tiles for a 512-query chunk), the PyTorch path (`self_extend_naive`)
    and torch SDPA with the flash backend on plain attention over the same N keys (the
    chunk's SDPA call sees every key, no mask: a lower bound on a causal prefix call);
  * memory attention for one decode step (16 blocks of 16 entries per kv-head): the kernel
    (`memory_merge_`) vs the PyTorch path (gather, attend, merge).
Part `decode`: the default model (SmolLM2-135M, bfloat16; `--model DIR` for another, e.g.
its config and tokenizer with random weights where the GGUF cannot travel: decode speed does
not depend on the weights' values) on an N-token prompt, 32 new tokens: infinikv (long
context, Triton backend) vs transformers `generate` with sdpa and everything resident;
decode tokens/s.
Rows print as they are measured; benchmarks/results/kernels_gpu.json (or --out) is rewritten
after each length. With `--device cpu` (and TRITON_INTERPRET=1) the kernels run through
Triton's interpreter and the decode part on the PyTorch backend: a smoke test of this
script, not a timing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HQ, HKV, D, PAGE = 32, 8, 128, 16  # Llama-3-8B's attention
WINDOW, GROUP = 1024, 8
CHUNK = 512  # prefill chunk (the engine's default)
MEMORY_BLOCKS = 16  # the default --memory-blocks
NEW_TOKENS = 32
WARMUP_TOKENS = 6144


def timed_ms(fn, device: str, repeats: int = 20) -> float:
    """Median wall time of fn() in ms (CUDA events on the GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def or_oom(fn, device: str) -> float | None:
    try:
        return timed_ms(fn, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def kernel_rows(length: int, device: str, repeats: int) -> list[dict]:
    from infinikv.cache.pages import PageList
    from infinikv.core.config import RopeConfig
    from infinikv.core.partial import folded_partial, merge_partials
    from infinikv.core.rope import RotaryEmbedding
    from infinikv.core.self_extend import SelfExtend
    from infinikv.kernels.memory.ops import memory_merge_
    from infinikv.kernels.self_extend.naive import self_extend_naive
    from infinikv.kernels.self_extend.ops import self_extend_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    pages_n = -(-length // PAGE)
    k_pages = torch.randn(pages_n + 1, PAGE, HKV, D, dtype=dtype, device=device)
    v_pages = torch.randn_like(k_pages)
    table = PageList.of(list(range(1, pages_n + 1)), list(range(pages_n)), PAGE, torch.device(device))
    rope = RotaryEmbedding(RopeConfig(theta=500000.0), D, device=device)
    se = SelfExtend(WINDOW, GROUP)
    k_full = k_pages[1:].flatten(0, 1)[:length].transpose(0, 1)[None]  # (1, Hkv, N, d)
    v_full = v_pages[1:].flatten(0, 1)[:length].transpose(0, 1)[None]
    rows = []
    for n in (1, min(CHUNK, length)):
        q = torch.randn(n, HQ, D, dtype=dtype, device=device)
        q_pos = torch.arange(length - n, length, device=device)
        args = (q, q_pos, k_pages, v_pages, table, length, rope, se)
        qt = q.transpose(0, 1)[None]  # (1, Hq, n, d)

        def sdpa(qt=qt):
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, k_full, v_full, enable_gqa=True)

        rows.append(
            {
                "op": "self_extend " + ("decode" if n == 1 else f"chunk {n}"),
                "length": length,
                "kernel_ms": timed_ms(lambda args=args: self_extend_attention(*args), device, repeats),
                "torch_ms": or_oom(lambda args=args: self_extend_naive(*args), device),
                "sdpa_flash_ms": or_oom(sdpa, device) if device == "cuda" else None,
            }
        )
    # Memory for one decode step: each kv-head's g query rows over 16 blocks of the slab.
    g, entries = HQ // HKV, MEMORY_BLOCKS * PAGE
    slab_rows = max(length, entries) * HKV
    k_slab = torch.randn(slab_rows, D, dtype=dtype, device=device)
    v_slab = torch.randn_like(k_slab)
    sel = torch.randint(0, slab_rows, (HKV, 1, entries), device=device)
    queries = torch.randn(HKV, 1, g, D, dtype=dtype, device=device)
    out = torch.randn(1, HQ, D, dtype=dtype, device=device)
    lse = torch.randn(1, HQ, device=device)

    def torch_memory():
        k, v = k_slab[sel], v_slab[sel]  # (Hkv, 1, T, d)
        mem = folded_partial(queries, k, v)
        return merge_partials([(out, lse), (mem[0].reshape(1, HQ, D), mem[1].reshape(1, HQ))])

    def kernel_memory():
        memory_merge_(out.clone(), lse.clone(), queries, k_slab, v_slab, sel)

    rows.append(
        {
            "op": "memory decode",
            "length": length,
            "kernel_ms": timed_ms(
                lambda: memory_merge_(out.clone(), lse.clone(), queries, k_slab, v_slab, sel), device
            ),
            "torch_ms": timed_ms(torch_memory, device),
            "sdpa_flash_ms": None,
        }
    )
    return rows


def decode_rows(length: int, device: str, model: str | None) -> list[dict]:
    from bench_long_context import _model_dir, _TokenClock
    from transformers import AutoModelForCausalLM

    from infinikv.engine.sampling import SamplingParams
    from infinikv.service.runtime import build_generator
    from infinikv.service.settings import Settings

    settings = Settings(model=model, device=device, dtype="bfloat16")
    prompt = torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = build_generator(settings)  # resolves the backend: Triton on CUDA
    # Warm-up past the resident window (4096 tokens for SmolLM2), so every kernel variant
    # (chunk, decode, memory) is compiled before the timed run.
    gen.generate(prompt[:WARMUP_TOKENS], SamplingParams(max_tokens=4, ignore_eos=True))
    result = gen.generate(prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    row = {
        "op": "decode tok/s",
        "length": length,
        "infinikv": (len(result.token_ids) - 1) / result.decode_seconds,
        "infinikv_prefill_s": result.prefill_seconds,
    }
    tok_s, prefill_s = row["infinikv"], result.prefill_seconds
    print(f"  infinikv at {length}: {tok_s:.1f} tok/s, prefill {prefill_s:.1f} s", flush=True)
    del gen
    if device == "cuda":
        torch.cuda.empty_cache()
    hf = AutoModelForCausalLM.from_pretrained(
        _model_dir(settings), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    hf = hf.to(device).eval()
    clock = _TokenClock()
    with torch.no_grad():
        hf.generate(torch.tensor([prompt[:64]], device=device), max_new_tokens=4)  # warm-up
        hf.generate(
            torch.tensor([prompt], device=device),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            streamer=clock,
        )
    row["transformers_sdpa"] = clock.decode_tok_s()
    row["transformers_prefill_s"] = clock.times[1] - clock.times[0]
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--parts", nargs="+", choices=["kernels", "decode"], default=["kernels", "decode"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", help="model directory for the decode part (default: the default model)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels_gpu.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels: no CUDA device here (run it on a GPU machine, or --device cpu)")
    rows = []
    for length in args.lengths:
        measured = []
        if "kernels" in args.parts:
            measured += kernel_rows(length, args.device, args.repeats)
        if "decode" in args.parts:
            measured += decode_rows(length, args.device, args.model)
        for r in measured:
            print(
                "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                flush=True,
            )
        rows += measured
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        args.out.write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
