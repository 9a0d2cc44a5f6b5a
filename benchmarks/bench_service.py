"""HTTP service throughput on loopback, beside the in-process engine as the reference.

* Streaming chat requests from 1, 2, 4, 8 and 16 concurrent `openai` clients (`--clients`):
  requests/s, time to first token (p50/p95), generated tokens/s, against a server with `--max-batch 1` (decode
  steps one sequence at a time) in the same run; and one in-process Generator.generate of
  the same request, so the HTTP + scheduling overhead shows as a ratio.
  `--transformers`: the same clients against `transformers serve --continuous-batching`
  (its paged-attention continuous batching on the CPU, the same converted weights, float32 or
  with `--quantize bf16` bfloat16). `--quantize`: the servers' weights (results kept apart).
* Ingestion of a document into a session (POST /v1/sessions/{id}/documents, polled to
  completion): tokens/s, beside prefilling the same tokens into an in-process sequence.
* Interference: the inter-token latency of 4 streaming chat clients alone, then while the
  `--ingest-tokens` document is being ingested into another session (interactive requests
  come first; an ingestion chunk runs once a second beside them), against one chunk's time.

* `--distinct`: every short request asks a different question (they share the chat
  template's system turn only; without it all ask the same one, and a prefix cache holds
  every prompt but its last page). `--server-args`: more flags for both of our servers
  (`--no-prefix-cache`), their results kept under `--tag`.

Run from the repository root (it starts `infinikv serve` through tests/server_process.py):
    python benchmarks/bench_service.py [--ingest-tokens 100000] [--parts concurrency ingestion interference]
        [--clients 1 2 4 8 16] [--prompt-tokens N] [--distinct] [--transformers] [--quantize bf16]
        [--server-args "--no-prefix-cache" --tag no-prefix-cache]
The parts measured replace theirs in benchmarks/results/service.json; the others stay. The
concurrency table is drawn to docs/service_concurrency[_long][_bf16][_distinct][_TAG].png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infinikv.engine.sampling import SamplingParams  # noqa: E402
from infinikv.engine.sequence import feed  # noqa: E402
from infinikv.evaluation.haystack import bible_text  # noqa: E402
from infinikv.evaluation.passkey import FILLER  # noqa: E402
from infinikv.model.default import default_gguf  # noqa: E402
from infinikv.model.loader import convert_gguf  # noqa: E402
from infinikv.service.runtime import build_generator  # noqa: E402
from infinikv.service.settings import Settings  # noqa: E402
from tests.redis_server import free_port  # noqa: E402
from tests.server_process import http_server, infinikv_server  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
# --distinct: a different question for each request (32, then they repeat).
QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Name three rivers of Europe and the seas they reach.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for pancakes without eggs.",
    "What is the difference between weather and climate?",
    "Explain recursion to a ten-year-old.",
    "List five uses for an old bicycle tyre.",
    "Why do cats purr?",
    "Describe the water cycle in four sentences.",
    "What should I pack for a week of hiking in the rain?",
    "Translate 'good morning, my friend' into French and Spanish.",
    "Suggest a name for a bakery by the sea.",
    "How many legs do spiders have, and why?",
    "Write a haiku about autumn leaves.",
    "What are the planets of the solar system, in order?",
    "Compare trains and planes for a 500 km trip.",
    "Summarise the plot of Little Red Riding Hood.",
    "How do I start learning to play the guitar?",
    "What causes the seasons on Earth?",
    "Invent a board game for two players.",
    "Why is the sky blue?",
    "Give three tips for a job interview.",
    "What is photosynthesis?",
    "Write a limerick about a sleepy dog.",
    "How do bees make honey?",
    "Plan a picnic for six people.",
    "What is a prime number? Give examples.",
    "Describe a busy market in the morning.",
    "How can I save energy at home?",
    "What do volcanoes and geysers have in common?",
    "Tell me about the history of chess in five sentences.",
    "What makes a good password?",
]
CHART = Path(__file__).resolve().parents[1] / "docs" / "service_concurrency.png"
RESULTS = "benchmarks/results/service.json"  # its charts are the docs'; another --out's go beside it
CHARS_PER_TOKEN = 4  # about, for English prose and SmolLM2's tokenizer


def long_messages(tokens: int, client: int) -> list[dict[str, str]]:
    """A question about a passage of the King James Bible of about `tokens` tokens, a
    different passage per client."""
    size = tokens * CHARS_PER_TOKEN
    passage = bible_text()[client * size : (client + 1) * size]
    return [{"role": "user", "content": f"{passage}\n\nWho is named first in the passage above?"}]


MAX_TOKENS = 32
CHUNK = Settings().chunk_size  # an ingestion's prefill chunk


def one_stream(
    c: openai.OpenAI, messages: list[dict[str, str]] = MESSAGES, model: str = MODEL
) -> tuple[float, float, int, list[float]]:
    """(time to first token, total seconds, tokens, the gaps between content chunks) of one
    streaming chat request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    arrivals: list[float] = []
    stream = c.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            first = first or arrivals[0]
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return (first or end) - t0, end - t0, tokens, [b - a for a, b in itertools.pairwise(arrivals)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def concurrency(
    base: str,
    clients: int,
    per_client: int,
    prompt_tokens: int = 0,
    model: str = MODEL,
    distinct: bool = False,
) -> dict:
    """`clients` threads streaming `per_client` requests each: the short request (with
    `distinct`, a question of its own per request), or with `prompt_tokens`, a question over
    a passage of about that many tokens."""
    results: list[tuple[float, float, int, list[float]]] = []
    lock = threading.Lock()

    def worker(client: int) -> None:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=600)
        for k in range(per_client):
            if prompt_tokens:
                messages = long_messages(prompt_tokens, client)
            elif distinct:
                question = QUESTIONS[(client * per_client + k) % len(QUESTIONS)]
                messages = [{"role": "user", "content": question}]
            else:
                messages = MESSAGES
            r = one_stream(c, messages, model)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    gaps = [gap for r in results for gap in r[3]]  # a chunk may carry several tokens (stop strings)
    return {
        "clients": clients,
        "prompt_tokens": prompt_tokens or None,
        "requests": len(results),
        "requests_per_s": len(results) / elapsed,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": percentile(ttft, 0.95),
        "inter_token_p50_s": percentile(gaps, 0.5),
        "inter_token_p95_s": percentile(gaps, 0.95),
        "generated_tokens_per_s": sum(r[2] for r in results) / elapsed,
    }


@contextmanager
def transformers_server(log_dir: Path, dtype: str) -> Iterator[tuple[str, str]]:
    """`transformers serve` with its continuous batching (paged attention) on the default
    model's converted weights, in `dtype` on the CPU: (base URL, the model name it answers to)."""
    settings = Settings()
    model = str(convert_gguf(default_gguf(settings.cache_dir), settings.cache_dir))
    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--continuous-batching"]
    command += ["--device", "cpu", "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port)]
    with http_server(command, port, log_dir / f"transformers-{port}.log") as base:
        yield base, model


def finished(base: str, job: dict, progress: list[tuple[float, int]] | None = None) -> dict:
    """The ingestion job's record once it succeeded (polled, bounded to ~14 hours); each poll's
    (time, tokens done) appended to `progress` if given."""
    for _ in range(100_000):
        job = requests.get(f"{base}/v1/jobs/{job['id']}", timeout=30).json()
        if progress is not None:
            progress.append((time.perf_counter(), job.get("done_tokens") or 0))
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    return job


def ingest(base: str, text: str) -> dict:
    session = requests.post(f"{base}/v1/sessions", timeout=30).json()["id"]
    t0 = time.perf_counter()
    job = requests.post(f"{base}/v1/sessions/{session}/documents", json={"text": text}, timeout=60).json()
    job = finished(base, job)
    elapsed = time.perf_counter() - t0
    requests.delete(f"{base}/v1/sessions/{session}", timeout=60)
    return {"tokens": job["total_tokens"], "seconds": elapsed, "tokens_per_s": job["total_tokens"] / elapsed}


def interference(base: str, text: str, clients: int, per_client: int) -> dict:
    """Inter-token latency of `clients` streaming chat clients alone, then beside an ingestion
    of `text` into another session (cancelled once they are done); the ingestion's seconds per
    prefill chunk, timed while it ran alone for a few seconds first."""
    alone = concurrency(base, clients, per_client)
    session = requests.post(f"{base}/v1/sessions", timeout=30).json()["id"]
    job = requests.post(f"{base}/v1/sessions/{session}/documents", json={"text": text}, timeout=60).json()
    first: tuple[float, int] | None = None  # (time, tokens done) when its first chunk was in
    for _ in range(10_000):  # bounded: four more chunks, alone
        job = requests.get(f"{base}/v1/jobs/{job['id']}", timeout=30).json()
        now, done = time.perf_counter(), job.get("done_tokens") or 0
        first = first or ((now, done) if done else None)
        if first is not None and done - first[1] >= 4 * CHUNK:
            break
        time.sleep(0.05)
    assert first is not None
    chunk_s = (now - first[0]) / ((done - first[1]) / CHUNK)
    beside = concurrency(base, clients, per_client)
    job = requests.get(f"{base}/v1/jobs/{job['id']}", timeout=30).json()
    requests.delete(f"{base}/v1/jobs/{job['id']}", timeout=60)
    requests.delete(f"{base}/v1/sessions/{session}", timeout=60)
    return {
        "ingest_tokens": job["total_tokens"],
        "ingested_meanwhile": job.get("done_tokens"),
        "ingestion_still_running_after": job["status"] == "running",
        "chunk_s": chunk_s,
        "alone": alone,
        "beside_ingestion": beside,
    }


def in_process(settings: Settings, text: str, parts: list[str]) -> dict:
    """The reference: the same chat request and the same document prefill without HTTP."""
    gen = build_generator(settings)
    prompt = gen.encode_chat(MESSAGES)
    gen.generate(prompt, SamplingParams(max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    out = gen.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS))
    request_s = time.perf_counter() - t0
    request = {
        "ttft_s": out.prefill_seconds,
        "request_s": request_s,
        "generated_tokens_per_s": len(out.token_ids) / request_s,
    }
    if "ingestion" not in parts:
        return request
    ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = gen.new_sequence("bench:")
    t0 = time.perf_counter()
    for start in range(0, len(ids), gen.chunk_size):  # the chunking ingestion uses
        feed(gen.model, gen.pool, seq, ids[start : start + gen.chunk_size], gen.chunk_size, "none")
    ingest_s = time.perf_counter() - t0
    seq.release()
    return {**request, "ingest_tokens": len(ids), "ingest_tokens_per_s": len(ids) / ingest_s}


def print_concurrency(
    pairs: list[tuple[dict, dict]], in_process: dict, transformers: list[dict] | None
) -> None:
    """The table of one prompt kind: unbatched and batched servers side by side, and
    transformers' continuous batching on the same clients where it was measured."""
    tokens = pairs[0][1].get("prompt_tokens") or "short"
    print(f"\nprompts: {tokens}; one in-process request: {in_process['generated_tokens_per_s']:.1f} tok/s")
    print(
        "| clients | req/s unbatched / batched | TTFT p50 / p95 batched | inter-token p50 / p95 batched "
        "| gen tok/s batched | x one client | transformers CB gen tok/s, TTFT p50 | x transformers |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    one = pairs[0][1]["generated_tokens_per_s"]
    theirs = {t["clients"]: t for t in transformers or []}
    for u, b in pairs:
        t = theirs.get(b["clients"])
        reference = (
            f"{t['generated_tokens_per_s']:.1f}, {t['ttft_p50_s'] * 1000:.0f} ms | "
            f"{b['generated_tokens_per_s'] / t['generated_tokens_per_s']:.2f}x"
            if t
            else "- | -"
        )
        print(
            f"| {b['clients']} | {u['requests_per_s']:.2f} / {b['requests_per_s']:.2f} | "
            f"{b['ttft_p50_s'] * 1000:.0f} / {b['ttft_p95_s'] * 1000:.0f} ms | "
            f"{b['inter_token_p50_s'] * 1000:.0f} / {b['inter_token_p95_s'] * 1000:.0f} ms | "
            f"{b['generated_tokens_per_s']:.1f} | {b['generated_tokens_per_s'] / one:.2f}x | {reference} |"
        )


def chart(rows: list[dict], path: Path) -> None:
    """Generated tokens/s and time to first token (p50, p95) against clients, batched server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(clients, [r["generated_tokens_per_s"] for r in rows], marker="o")
    left.set(xlabel="streaming clients", ylabel="generated tokens/s", xscale="log", ylim=(0, None))
    right.plot(clients, [r["ttft_p50_s"] for r in rows], marker="o", label="p50")
    right.plot(clients, [r["ttft_p95_s"] for r in rows], marker="s", label="p95")
    right.set(xlabel="streaming clients", ylabel="time to first token, s", xscale="log", ylim=(0, None))
    for ax in (left, right):
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.minorticks_off()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ingest-tokens", type=int, default=100_000)
    ap.add_argument("--per-client", type=int, default=2, help="requests per client")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--prompt-tokens", type=int, default=0, help="about this many per request (0: short)")
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=["concurrency", "ingestion", "interference"],
        default=["concurrency", "ingestion", "interference"],
    )
    ap.add_argument(
        "--transformers",
        action="store_true",
        help="the concurrency part also against `transformers serve --continuous-batching`, same prompts",
    )
    ap.add_argument("--quantize", default="none", help="the servers' weights (their --quantize)")
    ap.add_argument("--distinct", action="store_true", help="a different short question per request")
    ap.add_argument("--server-args", default="", help="more flags for our servers, e.g. --no-prefix-cache")
    ap.add_argument("--tag", default="", help="names the results of --server-args")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.transformers and args.quantize not in ("none", "bf16"):
        ap.error("--transformers compares float32 or bf16 weights (transformers has no GGUF int4 path here)")

    # ~22 tokens per FILLER repetition for the default tokenizer.
    text = FILLER * (args.ingest_tokens // 22)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    measured_in_process = {"concurrency", "ingestion"} & set(args.parts)
    settings = Settings(quantize=args.quantize)
    reference = in_process(settings, text, args.parts) if measured_in_process else {}
    print(f"in-process: {json.dumps(reference)}", flush=True)
    weights = ["--quantize", args.quantize]
    # One set of concurrency results per prompt kind and weight format.
    kind = ("_long" if args.prompt_tokens else "") + ("" if args.quantize == "none" else f"_{args.quantize}")
    kind += ("_distinct" if args.distinct else "") + (f"_{args.tag}" if args.tag else "")
    extra = args.server_args.split()
    if "concurrency" in args.parts:
        for name, flags in (("unbatched", ["--max-batch", "1"]), ("batched", [])):
            with (
                tempfile.TemporaryDirectory() as logs,
                infinikv_server(Path(logs), *flags, *weights, *extra) as base,
            ):
                one_stream(openai.OpenAI(base_url=f"{base}/v1", api_key="bench"))  # warm-up
                results[f"concurrency_{name}{kind}"] = [
                    concurrency(base, n, args.per_client, args.prompt_tokens, distinct=args.distinct)
                    for n in args.clients
                ]
        theirs = f"concurrency_transformers{kind}"
        results.pop(theirs, None)  # a reference from another run does not stand beside this one
        if args.transformers:
            dtype = {"none": "float32", "bf16": "bfloat16"}[args.quantize]
            with tempfile.TemporaryDirectory() as logs, transformers_server(Path(logs), dtype) as server:
                base, model = server
                one_stream(openai.OpenAI(base_url=f"{base}/v1", api_key="bench"), model=model)  # warm-up
                results[theirs] = [
                    concurrency(base, n, args.per_client, args.prompt_tokens, model, args.distinct)
                    for n in args.clients
                ]
        results[f"in_process{kind}"] = reference
    if {"ingestion", "interference"} & set(args.parts):
        with tempfile.TemporaryDirectory() as logs, infinikv_server(Path(logs), *weights) as base:
            if "ingestion" in args.parts:
                results["ingestion"] = ingest(base, text)
                results["ingestion_in_process"] = {
                    "tokens": reference["ingest_tokens"],
                    "tokens_per_s": reference["ingest_tokens_per_s"],
                }
            if "interference" in args.parts:
                results["interference"] = interference(base, text, 4, args.per_client)
    out.write_text(json.dumps(results, indent=2))

    batched = [key for key in results if key.startswith("concurrency_batched")]
    for suffix in [key.removeprefix("concurrency_batched") for key in batched]:
        pairs = list(
            zip(
                results.get(f"concurrency_unbatched{suffix}", []),
                results.get(f"concurrency_batched{suffix}", []),
                strict=True,
            )
        )
        if pairs:
            reference = results.get(f"in_process{suffix.removeprefix('_long')}") or results["in_process"]
            print(f"\nresults {suffix or '(short, float32)'}:", end="")
            print_concurrency(pairs, reference, results.get(f"concurrency_transformers{suffix}"))
            drawn = CHART if args.out == RESULTS else out
            chart([b for _, b in pairs], drawn.with_name(f"{drawn.stem}{suffix}.png"))
    if "interference" in results:
        r = results["interference"]
        a, b = r["alone"], r["beside_ingestion"]
        print(
            f"\n{a['clients']} chat clients, inter-token p50 / p95: {a['inter_token_p50_s'] * 1000:.0f} / "
            f"{a['inter_token_p95_s'] * 1000:.0f} ms alone, {b['inter_token_p50_s'] * 1000:.0f} / "
            f"{b['inter_token_p95_s'] * 1000:.0f} ms beside a {r['ingest_tokens']}-token ingestion "
            f"(one chunk: {r['chunk_s'] * 1000:.0f} ms; running after: {r['ingestion_still_running_after']})"
        )
    if "ingestion" in results:
        http, local = results["ingestion"], results["ingestion_in_process"]
        ratio = http["tokens_per_s"] / local["tokens_per_s"]
        print(
            f"\ningestion of {http['tokens']} tokens: {http['tokens_per_s']:.0f} tok/s over HTTP, "
            f"{local['tokens_per_s']:.0f} tok/s in-process ({ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
