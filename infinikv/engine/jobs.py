"""Ingestion jobs: their progress for this process's readers, and a record of each in the
store that outlives the process. A job whose process stopped beating before the job ended
reads back as `failed: interrupted`."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from infinikv.errors import InfinikvError
from infinikv.memory.store import BlockStore

log = logging.getLogger(__name__)

# Jobs kept in this process for GET /v1/jobs/{id} (the store keeps every record).
MAX_LOCAL_JOBS = 1000
FINAL = ("succeeded", "failed", "cancelled")
INTERRUPTED = "interrupted: the server running it stopped before it finished"


def job_key(job_id: str) -> str:
    return f"ikv:job:{job_id}"


def heartbeat_key(holder: str) -> str:
    return f"ikv:replica:{holder}"


@dataclass
class IngestJob:
    """A document being prefilled into a session; read by other threads for progress."""

    session_id: str
    owner: str
    name: str
    holder: str = ""  # the server process running it
    id: str = field(default_factory=lambda: f"job_{uuid.uuid4().hex}")
    document_id: str = field(default_factory=lambda: f"doc_{uuid.uuid4().hex[:16]}")
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    total_tokens: int = 0
    done_tokens: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None  # when its prefill began (absent from older records)
    finished: float | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Prefill speed so far (to the end, once finished); None before the first chunk."""
        if self.started is None or not self.done_tokens:
            return None
        return self.done_tokens / max((self.finished or time.time()) - self.started, 1e-6)

    @property
    def eta_seconds(self) -> float | None:
        """Time left at the speed so far, while it runs."""
        rate = self.tokens_per_second
        if self.status != "running" or rate is None:
            return None
        return (self.total_tokens - self.done_tokens) / rate


class JobRegistry:
    """This process's jobs, and the store's records of every process's."""

    def __init__(self, store: BlockStore, holder: str, heartbeat_ms: int):
        self.store, self.holder, self.heartbeat_ms = store, holder, heartbeat_ms
        self.local: OrderedDict[str, IngestJob] = OrderedDict()
        self._cancel: dict[str, Callable[[], None]] = {}
        self._beat_at = 0.0

    def add(self, job: IngestJob, cancel: Callable[[], None]) -> None:
        """A job submitted here; `cancel` stops it at its next step."""
        job.holder = self.holder
        self.record(job)
        self.local[job.id] = job
        self._cancel[job.id] = cancel
        while len(self.local) > MAX_LOCAL_JOBS and next(iter(self.local.values())).finished is not None:
            self._cancel.pop(self.local.popitem(last=False)[0], None)

    def cancel(self, job_id: str) -> bool:
        """Stop a job of this process that has not finished; False if it is not one."""
        job = self.local.get(job_id)
        if job is None or job.status in FINAL:
            return False
        self._cancel[job_id]()
        return True

    def record(self, job: IngestJob) -> None:
        """Write the job's record (its status changed); a store outage is logged, not raised:
        the job's own outcome decides the session, the record only reports it."""
        try:
            self.store.put_many({job_key(job.id): json.dumps(asdict(job)).encode()})
        except InfinikvError:
            log.warning("job %s: its record could not be written (status %s)", job.id, job.status)

    def get(self, job_id: str) -> IngestJob | None:
        job = self.local.get(job_id)
        if job is not None:
            return job
        (raw,) = self.store.get_many([job_key(job_id)])
        if raw is None:
            return None
        job = IngestJob(**json.loads(raw))
        if job.status not in FINAL and not self._alive(job.holder):
            job.status, job.error, job.finished = "failed", INTERRUPTED, job.finished or time.time()
            self.record(job)
        return job

    def beat(self) -> None:
        """Say this process is alive, at most every third of the heartbeat period."""
        now = time.monotonic()
        if now - self._beat_at < self.heartbeat_ms / 3000:
            return
        self._beat_at = now
        self.store.put_many({heartbeat_key(self.holder): str(self.store.time_ms()).encode()})

    def stop_beating(self) -> None:
        self.store.delete_prefix(heartbeat_key(self.holder))

    def _alive(self, holder: str) -> bool:
        if holder == self.holder:
            return True
        (raw,) = self.store.get_many([heartbeat_key(holder)])
        return raw is not None and self.store.time_ms() - int(raw) < self.heartbeat_ms
