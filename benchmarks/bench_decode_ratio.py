"""Long-context decode speed, infinikv (the `se+memory` mode of bench_long_context.py, or the
default settings with `--infinikv defaults`) vs transformers full attention, interleaved in one
process so that both see the same machine:

    python benchmarks/bench_decode_ratio.py --lengths 4096 32768 [--rounds 6] [--round-tokens 8]
        [--quantize int4-decode] [--infinikv defaults]

Both engines prefill the same passkey prompt (depth 0.5), then decode greedily in
alternating rounds of `--round-tokens` tokens (which engine goes first alternates too), so
a shared machine's drift (CPU steal here went from ~10% to 50-85% within minutes) hits
both alike; bench_long_context.py runs each engine in its own process, minutes apart.
transformers decodes in a plain loop over `model(token, past_key_values=...)`, without
`generate`'s per-step logits processing.
--quantize applies to infinikv only (transformers runs the de-quantized float32 weights).
Prints each round's tok/s and the ratio of the medians; rows replace those of the same
length, quantization and infinikv settings in benchmarks/results/decode_ratio.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_long_context import _model_dir, _tokenizer, arguments, long_context_generator

from infinikv.model.linear import QUANTIZATIONS

RESULTS = Path(__file__).parent / "results" / "decode_ratio.json"


def transformers_tokens(model, prompt: list[int]) -> Iterator[int]:
    """Greedy tokens of a transformers model: the first after the prefill, then one per step."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        while True:
            token = out.logits[0, -1].argmax()
            yield int(token)
            out = model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)


def infinikv_tokens(
    settings, prompt: list[int], length: int, max_tokens: int, quantize: str, mode: str
) -> Iterator[int]:
    """Greedy tokens of infinikv in bench_long_context.py's se+memory mode, default variant
    but for `quantize`, or (mode "defaults") the default settings with `quantize` (the model
    loads here; the prefill runs at the first token)."""
    from infinikv.engine.sampling import SamplingParams
    from infinikv.service.runtime import build_generator

    if mode == "defaults":
        gen = build_generator(settings.model_copy(update={"quantize": quantize}))
    else:
        gen = long_context_generator(
            settings, "se+memory", length, arguments().parse_args(["--quantize", quantize])
        )
    events = gen.stream(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return (e.token_id for e in events if e.token_id is not None)


def timed(tokens: Iterator[int], n: int, out: list[int]) -> float:
    """Draw n tokens into out; seconds."""
    start = time.perf_counter()
    out.extend(next(tokens) for _ in range(n))
    return time.perf_counter() - start


def measure(length: int, rounds: int, round_tokens: int, quantize: str, mode: str) -> dict:
    from transformers import AutoModelForCausalLM

    from infinikv.evaluation.passkey import found, passkey_case
    from infinikv.service.settings import Settings

    settings = Settings()
    tokenizer = _tokenizer(settings)
    case = passkey_case(tokenizer, length, 0.5, seed=0)
    model = AutoModelForCausalLM.from_pretrained(_model_dir(settings), dtype=torch.float32).eval()
    engines = {
        "transformers": transformers_tokens(model, case.prompt),
        "infinikv": infinikv_tokens(settings, case.prompt, length, 1 + rounds * round_tokens, quantize, mode),
    }
    produced: dict[str, list[int]] = {name: [] for name in engines}
    prefill = {name: timed(tokens, 1, produced[name]) for name, tokens in engines.items()}
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            speeds[name].append(round_tokens / timed(engines[name], round_tokens, produced[name]))
        print(
            f"{length:>6} round {r + 1}: "
            + "  ".join(f"{name} {speeds[name][-1]:.2f} tok/s" for name in engines),
            flush=True,
        )
    medians = {name: statistics.median(s) for name, s in speeds.items()}
    ratios = [a / b for a, b in zip(speeds["infinikv"], speeds["transformers"], strict=True)]
    return {
        "length": length,
        "quantize": quantize,
        "infinikv": mode,
        "rounds": rounds,
        "round_tokens": round_tokens,
        "prefill_s": {name: round(seconds, 1) for name, seconds in prefill.items()},
        "decode_tok_s": {name: round(m, 2) for name, m in medians.items()},
        "ratio": round(medians["infinikv"] / medians["transformers"], 2),
        "round_ratios": [round(x, 2) for x in ratios],
        "found_key": {name: found(case.key, tokenizer.decode(ids[:16])) for name, ids in produced.items()},
    }


def key(row: dict) -> tuple[int, str, str]:
    """A results row's length, quantization and infinikv settings (rows from before the
    options: none, se+memory)."""
    return row["length"], row.get("quantize", "none"), row.get("infinikv", "se+memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--round-tokens", type=int, default=8)
    ap.add_argument("--quantize", choices=QUANTIZATIONS, default="none", help="infinikv's decoder weights")
    ap.add_argument(
        "--infinikv", choices=["se+memory", "defaults"], default="se+memory", help="infinikv's settings"
    )
    args = ap.parse_args()
    rows = [measure(n, args.rounds, args.round_tokens, args.quantize, args.infinikv) for n in args.lengths]
    for row in rows:
        speeds = row["decode_tok_s"]
        print(
            f"{row['length']:>6} tokens, quantize={row['quantize']}, {row['infinikv']}: "
            f"infinikv {speeds['infinikv']:.2f} tok/s, transformers {speeds['transformers']:.2f} tok/s: "
            f"{row['ratio']:.2f}x "
            f"(rounds {row['round_ratios']}), "
            f"key found {row['found_key']}"
        )
    kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    measured = {key(row) for row in rows}
    merged = sorted([r for r in kept if key(r) not in measured] + rows, key=key)
    RESULTS.write_text(json.dumps(merged, indent=1) + "\n")


if __name__ == "__main__":
    main()
