"""bf16 weights against float32 ones on real prose: how often decode-sized forwards (the
few-row kernels) choose float32's next token.

    python benchmarks/bench_bf16_weights.py [--tokens 2048] [--offsets 0 40000 80000]

Windows of --tokens tokens of each haystack the recall suite reads (King James Bible, Debian
Reference), starting at --offsets, fed teacher-forced in chunks of 8 positions (at most
FEW_ROWS[bfloat16] rows: the path a decode step and a batch of decode tokens take) through the
default model with float32 weights and with `--quantize bf16`, CPU kernels both; per window
the share of positions where the two choose the same next token and the median / largest
log-probability gap of float32's choice. Prints the CPU and whether the kernel rounds x to
bfloat16 (`bf16_dot`), and appends a row to benchmarks/results/bf16_weights.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import append_record  # noqa: E402
from infinikv.engine.sequence import Sequence, feed  # noqa: E402
from infinikv.evaluation.haystack import HAYSTACKS, haystack_text  # noqa: E402
from infinikv.kernels.cpu.ops import bf16_dot  # noqa: E402
from infinikv.model.loader import LoadedModel, load_model  # noqa: E402
from infinikv.service.runtime import attach_kernels  # noqa: E402
from infinikv.service.settings import Settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bf16_weights.jsonl"
CHUNK = 8


def log_probs(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    model = loaded.model
    pool = model.new_page_pool(len(ids) + 64, 16)
    return feed(model, pool, Sequence(pool), ids, CHUNK, logits="all").log_softmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--offsets", type=int, nargs="+", default=[0, 40000, 80000])
    args = ap.parse_args()
    cache = Settings().cache_dir
    models = {q: load_model(None, cache, quantize=q) for q in ("none", "bf16")}
    for loaded in models.values():
        attach_kernels(loaded, "cpu")
    tokenizer = models["none"].tokenizer
    rows = []
    for name in HAYSTACKS:
        text_ids = tokenizer(haystack_text(name), add_special_tokens=False)["input_ids"]
        for offset in args.offsets:
            ids = text_ids[offset : offset + args.tokens]
            want, got = (log_probs(models[q], ids) for q in ("none", "bf16"))
            picked = want.argmax(-1, keepdim=True)
            gap = (want.gather(-1, picked) - got.gather(-1, picked)).abs().flatten()
            rows.append(
                {
                    "haystack": name,
                    "offset": offset,
                    "same_choice": (got.argmax(-1) == picked.squeeze(-1)).float().mean().item(),
                    "median_gap": gap.median().item(),
                    "max_gap": gap.max().item(),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    record = append_record(RESULTS, {"bf16_dot": bf16_dot(), "tokens": args.tokens, "rows": rows})
    print(f"CPU: {record['cpu']}; bf16_dot={record['bf16_dot']}; ", end="")
    print(f"{args.tokens}-token windows, chunks of {CHUNK}")
    print("| haystack | offset | same next token as float32 weights | log-prob gap, median / max |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['haystack']} | {r['offset']} | {r['same_choice']:.1%} | "
            f"{r['median_gap']:.3f} / {r['max_gap']:.2f} |"
        )


if __name__ == "__main__":
    main()
