"""Throughput of many sequences at once: infinikv's engine (continuous batching of decode
steps), the same engine with `max_batch=1` (one sequence per forward), and transformers'
continuous batching (`generate_batch`), same weights (float32), same prompts, one process.

    python benchmarks/bench_batching.py [--sequences 1 4 8] [--new-tokens 64] [--quantize bf16]

N distinct short chat prompts, all submitted at once, greedy, `--new-tokens` each (EOS
ignored); generated tokens per second of wall time, prefill included. infinikv runs its
default settings with `slots` = N (`--quantize`: infinikv's weights; transformers' stay
float32). Writes benchmarks/results/batching.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402

from infinikv.engine.requests import Turn, run_turn  # noqa: E402
from infinikv.engine.sampling import SamplingParams  # noqa: E402
from infinikv.engine.scheduler import Engine  # noqa: E402
from infinikv.engine.tasks import Failed, Finished, TaskHandle  # noqa: E402
from infinikv.memory.store import InProcessBlockStore  # noqa: E402
from infinikv.model.default import default_gguf  # noqa: E402
from infinikv.model.linear import QUANTIZATIONS  # noqa: E402
from infinikv.model.loader import convert_gguf  # noqa: E402
from infinikv.service.runtime import build_generator  # noqa: E402
from infinikv.service.settings import Settings  # noqa: E402

TOPICS = ["a lighthouse keeper", "a lost kite", "the first snow", "a clockmaker", "a desert well",
          "a night train", "an old violin", "a city garden", "a paper boat", "a mountain hut",
          "a quiet library", "a fishing village", "a broken compass", "a summer storm",
          "a market at dawn", "a winter fox"]  # fmt: skip


def messages(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]
        for i in range(n)
    ]


def run_infinikv(n: int, new_tokens: int, max_batch: int, quantize: str) -> float:
    """Generated tokens per second of n chat requests submitted at once."""
    gen = build_generator(Settings(slots=n, quantize=quantize), slots=n)
    engine = Engine(gen, InProcessBlockStore(), max_queue=max(64, n), max_batch=max_batch)
    engine.start()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    try:
        t0 = time.perf_counter()
        handles = [
            engine.submit(run_turn(Turn(params, messages=m)), TaskHandle(), needs_sequence=True)
            for m in messages(n)
        ]
        tokens = 0
        for handle in handles:
            while not isinstance(item := handle.next_blocking(timeout=1800), Finished):
                if isinstance(item, Failed):
                    raise item.error
            tokens += item.value.completion_tokens
        return tokens / (time.perf_counter() - t0)
    finally:
        engine.stop()


def run_transformers(n: int, new_tokens: int, model, tokenizer) -> float:
    from transformers import GenerationConfig

    chats = messages(n)
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in chats]
    inputs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs, generation_config=config, warmup=False)
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quantize", choices=QUANTIZATIONS, default="none", help="infinikv's weights")
    ap.add_argument("--out", default="benchmarks/results/batching.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = Settings()
    path = convert_gguf(default_gguf(settings.cache_dir), settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="paged|sdpa"
    ).eval()
    run_transformers(1, 4, hf, tokenizer)  # warm-up
    rows = []
    for n in args.sequences:
        row = {
            "sequences": n,
            "transformers_tok_s": run_transformers(n, args.new_tokens, hf, tokenizer),
            "quantize": args.quantize,
            "unbatched_tok_s": run_infinikv(n, args.new_tokens, 1, args.quantize),
            "batched_tok_s": run_infinikv(n, args.new_tokens, 32, args.quantize),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{result['cpu']}, {result['threads']} threads, {args.new_tokens} greedy tokens per sequence")
    header = "sequences | transformers generate_batch tok/s | infinikv max_batch=1 | infinikv batched"
    print(f"| {header} | vs transformers | vs max_batch=1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["batched_tok_s"]
        print(
            f"| {r['sequences']} | {r['transformers_tok_s']:.1f} | {r['unbatched_tok_s']:.1f} | {b:.1f} | "
            f"{b / r['transformers_tok_s']:.2f}x | {b / r['unbatched_tok_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
