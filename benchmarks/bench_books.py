"""Question answering over a whole book through the HTTP server, as a user runs it.

A window of the King James Bible (Debian's bible-kjv) of --tokens tokens with six facts
planted at depths spread over it, one in each of the recall suite's held-out phrasings (a
number, a word or a uuid, each asked by its own noun: no fact is a distractor of another's
shape; infinikv/evaluation/recall.py), uploaded
as a file to a session of `infinikv serve` (default settings), then one question per fact
with `citations: true`, streamed. Measured: accuracy (the value in the answer), citation
precision (the top citation holds the fact, among correct answers) and recall (some cited
passage holds it, among all), ingestion tokens/s, time to first token of each answer, the
server's peak RSS.

    python benchmarks/bench_books.py --tokens 131072
    python benchmarks/bench_books.py --report

Rows append to benchmarks/results/books.jsonl (one per run, with every question's answer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_service import finished  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from infinikv.evaluation.haystack import bible_text  # noqa: E402
from infinikv.evaluation.recall import MAX_NEW_TOKENS, PHRASINGS, WORDS, Phrasing  # noqa: E402
from tests.server_process import infinikv_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "books.jsonl"
MODEL = "SmolLM2-135M-Instruct"
KEYS = ["the old lighthouse", "the river ferry", "the north tower", "the village bakery", "the iron bridge"]
KEYS += ["the mountain inn", "the east gate", "the harbor office", "the stone chapel", "the winter market"]
VALUES = {
    "number": lambda rng: str(rng.randrange(1_000_000, 10_000_000)),
    "word": lambda rng: rng.choice(WORDS),
    "uuid": lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
}


@dataclass(frozen=True)
class Fact:
    phrasing: Phrasing
    key: str
    value: str

    @property
    def sentence(self) -> str:
        return self.phrasing.fact.format(key=self.key, value=self.value)

    @property
    def question(self) -> str:
        return f"\n\nQuestion: {self.phrasing.question(self.key)}\nAnswer: {self.phrasing.answer(self.key)}"


def facts(rng: random.Random) -> list[Fact]:
    """One fact in each held-out phrasing, each about a key of its own."""
    phrasings = [(kind, p) for kind, ps in PHRASINGS["heldout"].items() for p in ps]
    keys = rng.sample(KEYS, len(phrasings))
    return [Fact(p, key, VALUES[kind](rng)) for (kind, p), key in zip(phrasings, keys, strict=True)]


def book(tokens: int, seed: int, tokenizer) -> tuple[str, list[Fact]]:
    """A window of the Bible of about `tokens` tokens from a seeded verse, with the facts
    (in a seeded order) at depths (i + 0.5) / facts."""
    rng = random.Random(seed)
    verses = bible_text().splitlines()
    start = rng.randrange(len(verses) // 4)
    lines, count = [], 0
    for verse in verses[start:]:
        lines.append(verse)
        count += len(tokenizer(verse + "\n", add_special_tokens=False)["input_ids"])
        if count >= tokens:
            break
    planted = facts(rng)
    rng.shuffle(planted)
    for i, fact in reversed(list(enumerate(planted))):
        lines.insert(int(len(lines) * (i + 0.5) / len(planted)), fact.sentence)
    return "\n".join(lines) + "\n", planted


class PeakRss:
    """The largest resident set of this process's children (the server), sampled."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            rss = 0
            for child in psutil.Process().children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def ask(c: openai.OpenAI, session: str, question: str) -> tuple[str, list[dict], float]:
    """(answer, citations, seconds to the first token) of one streamed question."""
    t0 = time.perf_counter()
    first, text, citations = None, "", []
    stream = c.completions.create(
        model=MODEL,
        prompt=question,
        max_tokens=MAX_NEW_TOKENS["single"],
        temperature=0,
        stream=True,
        extra_body={"session_id": session, "citations": True},
    )
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.text:
            first = first or time.perf_counter()
            text += choice.text
        citations = (choice.model_extra or {}).get("citations", citations)
    return text, citations, (first or time.perf_counter()) - t0


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from infinikv.model.loader import resolve_model_dir
    from infinikv.service.settings import Settings

    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(settings.model, settings.cache_dir))
    text, planted = book(args.tokens, args.seed, tokenizer)
    rss = PeakRss()
    with tempfile.TemporaryDirectory() as logs, infinikv_server(Path(logs), *args.server_args) as base:
        session = requests.post(f"{base}/v1/sessions", timeout=30).json()["id"]
        t0 = time.perf_counter()
        files = {"file": ("bible.txt", text.encode())}
        job = requests.post(f"{base}/v1/sessions/{session}/documents", files=files, timeout=120).json()
        polls: list[tuple[float, int]] = []
        job = finished(base, job, polls)
        ingest_s = time.perf_counter() - t0
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=3600)
        answers = []
        for fact in planted:
            reply, cited, ttft = ask(c, session, fact.question)
            answers.append(
                {
                    "key": fact.key,
                    "value": fact.value,
                    "answer": reply,
                    "correct": fact.value in reply,
                    "top_cites": bool(cited) and fact.sentence in cited[0]["text"],
                    "any_cites": any(fact.sentence in x["text"] for x in cited),
                    "ttft_s": round(ttft, 2),
                    "citations": cited,
                }
            )
            print(f"{fact.key}: {reply!r} top citation holds it: {answers[-1]['top_cites']}", flush=True)
    correct = [a for a in answers if a["correct"]]
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "tokens": job["total_tokens"],
        "facts": len(planted),
        "seed": args.seed,
        "server_args": args.server_args,
        "accuracy": len(correct) / len(answers),
        "citation_precision": sum(a["top_cites"] for a in correct) / len(correct) if correct else None,
        "citation_recall": sum(a["any_cites"] for a in answers) / len(answers),
        "ingest_tokens_per_s": job["total_tokens"] / ingest_s,
        "ingest_tokens_per_s_past_100k": rate_past(polls, 100_000),
        "ttft_p50_s": statistics.median(a["ttft_s"] for a in answers),
        "peak_rss_mb": round(rss.stop() / 2**20),
        "answers": answers,
    }


def rate_past(polls: list[tuple[float, int]], tokens: int) -> float | None:
    """Ingestion tokens/s from the first poll at `tokens` done or more to the last (None: the
    book is shorter)."""
    past = [(t, done) for t, done in polls if done >= tokens]
    if len(past) < 2 or past[-1][1] == past[0][1]:
        return None
    return (past[-1][1] - past[0][1]) / (past[-1][0] - past[0][0])


def report() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    print(
        "| date | CPU | tokens | facts | accuracy | top citation holds the fact (correct answers) |"
        " a citation holds it | ingest tok/s (past 100k) | TTFT p50 | peak RSS | server args |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        precision = "n/a" if r["citation_precision"] is None else f"{r['citation_precision']:.0%}"
        late = r.get("ingest_tokens_per_s_past_100k")
        late = "" if late is None else f" ({late:.0f})"
        print(
            f"| {r['date']} | {r['cpu']} | {r['tokens']} | {r['facts']} | {r['accuracy']:.0%} | "
            f"{precision} | "
            f"{r['citation_recall']:.0%} | {r['ingest_tokens_per_s']:.0f}{late} | {r['ttft_p50_s']:.1f} s | "
            f"{r['peak_rss_mb']} MB | {' '.join(r['server_args']) or 'defaults'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072, help="the book's length in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true", help="print the table of the rows so far")
    ap.add_argument("server_args", nargs="*", help="after --: flags for infinikv serve")
    args = ap.parse_args()
    if not args.report:
        row = run(args)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
    report()


if __name__ == "__main__":
    main()
