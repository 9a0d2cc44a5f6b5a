"""Decode tokens/s with and without each drafter, side by side in one run on the default model:

    qa      a ~4k-token document of reports, asked to quote one (the answer copies the context)
    chat    a free chat prompt through the chat template
    16k     a ~16k-token context with memory on (resident window + kNN memory), then 64 tokens

Drafters: lookup (n-grams of the context), self:N (the target's first N layers), model (a draft
model: no second model with SmolLM2's tokenizer is installed here, so the default model drafts
for itself at a lower cost setting: int4 weights, a 1024-token window). Greedy, so every run
emits the same tokens as the plain one (checked). Writes benchmarks/results/speculative.json.

    python benchmarks/bench_speculative.py [--cases qa chat 16k] [--self-layers 8]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinikv.engine.generator import Generator  # noqa: E402
from infinikv.engine.sampling import SamplingParams  # noqa: E402
from infinikv.engine.speculative.draft_model import DraftModelDrafter  # noqa: E402
from infinikv.engine.speculative.lookup import LookupDrafter  # noqa: E402
from infinikv.engine.speculative.self_draft import SelfDrafter  # noqa: E402
from infinikv.evaluation.passkey import QUESTION, passkey_document  # noqa: E402
from infinikv.model.loader import LoadedModel, load_model  # noqa: E402
from infinikv.service.settings import Settings  # noqa: E402

NEW_TOKENS = {"qa": 128, "chat": 128, "16k": 64}


def reports(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    colors = ["red", "blue", "green", "grey", "white", "black", "yellow"]
    goods = ["copper", "salt", "wool", "grain", "timber", "glass", "coffee", "tea"]
    cities = ["Lisbon", "Genoa", "Bergen", "Antwerp", "Cadiz", "Riga", "Naples", "Dublin"]
    lines = []
    for i in range(1, n + 1):
        lines.append(
            f"Report {i}: the {rng.choice(colors)} ship number {rng.randint(100, 999)} left "
            f"{rng.choice(cities)} on day {rng.randint(1, 365)} carrying {rng.randint(10, 500)} crates "
            f"of {rng.choice(goods)}, and reached {rng.choice(cities)} after {rng.randint(2, 40)} days."
        )
    return "\n".join(lines)


def prompt_for(case: str, gen: Generator) -> list[int]:
    if case == "qa":
        doc = reports(80)  # ~4k tokens
        return gen.encode(f"{doc}\n\nQuote reports 41 to 45 exactly as written above.\nReport 41:")
    if case == "chat":
        return gen.encode_chat(
            [{"role": "user", "content": "Write a short story about a dragon who learns to bake."}]
        )
    text, _ = passkey_document(gen.tokenizer, 16_000, 0.5, seed=1)
    return gen.encode(text + QUESTION)


def drafters(target: LoadedModel, self_layers: int, draft: LoadedModel) -> dict:
    return {
        "plain": None,
        "lookup": LookupDrafter,
        f"self:{self_layers}": lambda: SelfDrafter(target.model, self_layers),
        "model (int4 self)": lambda: DraftModelDrafter(draft.model),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["qa", "chat", "16k"])
    ap.add_argument("--self-layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest counts")
    ap.add_argument("--out", default="benchmarks/results/speculative.json")
    args = ap.parse_args()

    settings = Settings()
    target = load_model(None, settings.cache_dir)
    draft = load_model(None, settings.cache_dir, quantize="int4")
    trained = target.config.max_position_embeddings
    rows = []
    for case in args.cases:
        reference = None
        for name, factory in drafters(target, args.self_layers, draft).items():
            gen = Generator(
                target,
                settings.max_seq_len,
                long_context=settings.long_context_config(trained),
                drafter_factory=factory,
                store=None,
            )
            prompt = prompt_for(case, gen)
            # Best of `repeats` runs: run-to-run noise here (+-5%) is as large as the margins.
            runs = [
                gen.generate(prompt, SamplingParams(max_tokens=NEW_TOKENS[case], ignore_eos=True))
                for _ in range(args.repeats)
            ]
            out = min(runs, key=lambda r: r.decode_seconds)
            rate = len(out.token_ids) / out.decode_seconds
            if reference is None:
                reference = out
            same = out.token_ids == reference.token_ids
            row = {
                "case": case,
                "prompt_tokens": len(prompt),
                "drafter": name,
                "decode_tok_s": rate,
                "speedup": rate / (len(reference.token_ids) / reference.decode_seconds),
                "identical_to_plain": same,
                **(out.speculation or {}),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| case | drafter | decode tok/s | vs plain | acceptance | tokens/forward | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "-"
        tpf = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "1.00"
        print(
            f"| {r['case']} ({r['prompt_tokens']} tok) | {r['drafter']} | {r['decode_tok_s']:.1f} | "
            f"{r['speedup']:.2f}x | {acc} | {tpf} | {r['identical_to_plain']} |"
        )
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
