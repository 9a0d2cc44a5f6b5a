"""Ingestion speed as the memory grows: a window of the King James Bible (Debian's bible-kjv)
added to a session through the Python API (`Session.add_document`, the engine's ingestion
job), tokens/s and the process's RSS every --every tokens, tokens/s over the whole book and
past 100k tokens.

    python benchmarks/bench_ingest.py --tokens 128000 [--set KEY=VALUE ...]

Rows append to benchmarks/results/ingest.jsonl (one per run, with the windows); the label
(--label) names the code or settings measured, for an A/B of two commits run one after the
other on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from infinikv.api import LLM  # noqa: E402
from infinikv.evaluation.haystack import bible_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.jsonl"
CHARS_PER_TOKEN = 4  # the KJV's ~3.9 characters per SmolLM2 token: a window of ~N tokens


def run(args: argparse.Namespace) -> dict:
    settings = dict(kv.split("=", 1) for kv in args.set)
    llm = LLM(**settings)
    windows: list[dict] = []
    t0 = time.perf_counter()
    last = [t0, 0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done - last[1] >= args.every or done == total:
            rate = (done - last[1]) / (now - last[0])
            rss = psutil.Process().memory_info().rss / 2**20
            windows.append(
                {"tokens": done, "seconds": round(now - t0, 1), "tokens_per_s": rate, "rss_mb": rss}
            )
            print(f"{done:7d} tokens: {rate:6.1f} tok/s, RSS {rss:.0f} MB", flush=True)
            last[:] = [now, done]

    try:
        session = llm.session()
        t0 = last[0] = time.perf_counter()
        tokens = session.add_document(bible_text()[: args.tokens * CHARS_PER_TOKEN], "bible.txt", progress)
        seconds = time.perf_counter() - t0
    finally:
        llm.close()
    late = [w for w in windows if w["tokens"] >= 100_000]  # from the first window end past 100k
    past = late[-1]["tokens"] - late[0]["tokens"] if late else 0
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "label": args.label,
        "settings": settings,
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_past_100k": past / (late[-1]["seconds"] - late[0]["seconds"]) if past else None,
        "windows": windows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128_000, help="the book's length, about")
    ap.add_argument("--every", type=int, default=4096, help="tokens per reported window")
    ap.add_argument("--label", default="", help="what this run measures (a commit, a change)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE: a Settings field (repeatable)")
    row = run(ap.parse_args())
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    late = row["tokens_per_s_past_100k"]
    print(f"{row['tokens']} tokens in {row['seconds']} s: {row['tokens_per_s']:.1f} tok/s", end="")
    print("" if late is None else f", {late:.1f} tok/s past 100k")


if __name__ == "__main__":
    main()
