"""Prometheus metrics of one server, in a registry of its own (GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 5 ms (a decode step of the default model) to a minute (a long prefill).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Counters the HTTP layer and the engine's worker (as its EngineObserver) update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "infinikv_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("infinikv_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("infinikv_generated_tokens", "tokens generated", registry=r)
        self.ingested_tokens = Counter("infinikv_ingested_tokens", "document tokens prefilled", registry=r)
        # acceptance rate = rate(accepted) / rate(drafted)
        self.drafted_tokens = Counter("infinikv_draft_tokens", "tokens proposed by the drafter", registry=r)
        self.accepted_tokens = Counter(
            "infinikv_draft_accepted_tokens", "drafted tokens accepted", registry=r
        )
        self.ttft = Histogram(
            "infinikv_time_to_first_token_seconds",
            "request arrival to first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.decode_rate = Histogram(
            "infinikv_decode_tokens_per_second",
            "decode speed of finished requests",
            buckets=(1, 2, 5, 10, 20, 30, 40, 60, 100, 200),
            registry=r,
        )
        self.step_seconds = Histogram(
            "infinikv_engine_step_seconds",
            "one forward of the engine (a prefill chunk, a speculative step, a batch of decode tokens)",
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "infinikv_engine_batch_sequences",
            "sequences in one forward of the engine (decode tokens batched; 1 for a forward of its own)",
            buckets=(1, 2, 4, 8, 12, 16, 32),
            registry=r,
        )
        self.step_tokens = Histogram(
            "infinikv_engine_step_tokens",
            "token rows in one step of the engine (prompt chunk rows, drafts verified, decode tokens)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.queue_wait = Histogram(
            "infinikv_queue_wait_seconds",
            "time a request waited before it started",
            buckets=_LATENCY,
            registry=r,
        )
        self.retrieval_seconds = Histogram(
            "infinikv_memory_retrieval_seconds",
            "kNN memory search time within one engine step (steps that searched)",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.queued = Gauge("infinikv_queued_requests", "requests waiting for the engine", registry=r)
        self.sessions = Gauge("infinikv_sessions_loaded", "sessions with pages in the KV pool", registry=r)
        self.store_up = Gauge("infinikv_store_up", "1 while the block store answers, else 0", registry=r)
        self.memory_tokens = Gauge(
            "infinikv_memory_tokens", "evicted tokens in the kNN memory of loaded sessions", registry=r
        )
        self.prefix_pages = Gauge(
            "infinikv_prefix_cache_pages", "KV pages the prefix cache holds", registry=r
        )
        self.prefix_hits = Gauge(
            "infinikv_prefix_cache_hit_tokens",
            "prompt tokens taken from the prefix cache since start",
            registry=r,
        )

    def watch(
        self,
        queued: Callable[[], float],
        sessions: Callable[[], float],
        memory_tokens: Callable[[], float],
        store_up: Callable[[], float],
        prefix: Callable[[], tuple[int, int]],
    ) -> None:
        """Gauges read at scrape time; `prefix`: the prefix cache's (pages, hit tokens)."""
        self.queued.set_function(queued)
        self.sessions.set_function(sessions)
        self.memory_tokens.set_function(memory_tokens)
        self.store_up.set_function(store_up)
        self.prefix_pages.set_function(lambda: prefix()[0])
        self.prefix_hits.set_function(lambda: prefix()[1])

    def step(self, seconds: float, retrieval_seconds: float, sequences: int, tokens: int) -> None:
        self.step_seconds.observe(seconds)
        self.batch_size.observe(sequences)
        self.step_tokens.observe(tokens)
        if retrieval_seconds > 0:
            self.retrieval_seconds.observe(retrieval_seconds)

    def waited(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
