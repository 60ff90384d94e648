"""Usage counters in Redis, fleet-wide: one batched script per flush, exactly once, buffered through outages.

A finished request is queued here (never awaited on the request path) and a supervised loop sends the
queue in order, in batches, as `scripts.USAGE_ADD`. Keys: `{ns}{project}/u/{day}/c/{client}` (a hash of
`FIELDS`), `.../c/*` for the project's own totals, `.../clients` (the set that bounds clients per day),
the same under `u/total/`, each with the retention as TTL (a total lives while it is used). The day is the
server's: an entry carries its age, so one buffered before midnight counts for its own day.

Redis down: entries wait in the queue (at most `MAX_PENDING`; past that they are dropped, counted in
`dropped` and logged once per outage). Every batch carries consecutive sequence numbers of this worker's
incarnation; the script skips those already applied, so a batch retried after a timeout that landed
is not counted twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass

import structlog
from redis.commands.core import AsyncScript

from worker.errors import StateUnavailableError
from worker.state import scripts
from worker.state.redis_link import RedisLink
from worker.state.usage import FIELDS, OTHER, PROJECT_WIDE, TOTAL, Counts, Usage, UsageRow, last_days, sorted_rows

log = structlog.get_logger(__name__)
MAX_PENDING = 100_000
"""Entries kept while Redis is down (about 200 bytes each: 20 MB at most)."""
BATCH = 256
"""Entries per script call."""


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    usage: Usage
    finished_at: float
    sent: asyncio.Future[None]
    """Resolved when the entry is in Redis (a request may wait for it: its next one sees the count)."""


class RedisUsage:
    """See the module docstring."""

    def __init__(self, link: RedisLink, namespace: str, *, max_clients: int, retention_days: int) -> None:
        self._link = link
        self._ns = namespace
        self._max_clients = max_clients
        self._retention_ms = retention_days * 86_400_000
        self._incarnation = uuid.uuid4().hex[:16]
        self._seq = 0
        self._pending: deque[_Entry] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0
        """Entries dropped because the queue was full while Redis was down."""
        self._script: AsyncScript | None = None

    def open(self) -> None:
        """Register the script (the link's client exists)."""
        self._script = self._link.r.register_script(scripts.USAGE_ADD)

    @property
    def pending(self) -> int:
        """Entries not yet in Redis."""
        return len(self._pending)

    def add(self, usage: Usage) -> asyncio.Future[None]:
        """Queue one request's counts; the loop sends them. The future resolves once they are in Redis."""
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._pending) >= MAX_PENDING:
            if not self.dropped:
                log.error("usage.dropped", reason="queue full while Redis is down", bound=MAX_PENDING)
            self.dropped += 1
            sent.set_result(None)
            return sent
        self._pending.append(_Entry(self._seq, usage, time.time(), sent))
        self._seq += 1
        self._wake.set()
        return sent

    async def run(self) -> None:
        """Send the queue forever, in order; while Redis is down, wait and try again (supervised)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                if not await self.flush_once():
                    await self._link.pause()

    async def flush_once(self) -> bool:
        """Send one batch; False when Redis could not take it (it stays queued)."""
        batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
        now = time.time()
        args: list[str | int] = [self._ns, self._incarnation, batch[-1].seq, self._retention_ms, self._max_clients]
        args.append(len(batch))
        for e in batch:
            age_ms = max(0, round((now - e.finished_at) * 1000))
            args += [e.usage.project, e.usage.client, age_ms, *(getattr(e.usage.counts, f) for f in FIELDS)]
        script = self._script
        assert script is not None  # noqa: S101 - opened before the loop runs
        try:
            await self._link.call(lambda: script(keys=[], args=args))
        except StateUnavailableError:
            return False
        for _ in batch:
            entry = self._pending.popleft()
            if not entry.sent.done():
                entry.sent.set_result(None)
        if self.dropped:
            log.warning("usage.flushed_after_drops", dropped=self.dropped)
        return True

    async def drain(self, timeout_s: float) -> None:
        """At exit: send what is queued within `timeout_s`; what is left is logged (lost with the process)."""
        give_up = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < give_up:
            if not await self.flush_once():
                await asyncio.sleep(0.1)
        if self._pending:
            log.error("usage.unsent_at_exit", entries=len(self._pending))

    async def rows(self, days: int, project: str | None, client: str | None) -> list[UsageRow]:
        """The counters of the last `days` days (by the server's clock) and the totals."""
        r = self._link.r
        seconds, _ = await self._link.call(r.time)
        scopes = [*last_days(int(seconds), days), TOTAL]
        projects = [project] if project else await self._projects()
        keys: list[tuple[str, str, str]] = []
        for p in projects:
            for scope in scopes:
                base = f"{self._ns}{p}/u/{scope}"
                members = await self._link.call(lambda base=base: r.smembers(f"{base}/clients"))  # type: ignore[misc]
                names = sorted({_text(m) for m in members} | {PROJECT_WIDE, OTHER})
                keys += [(scope, p, c) for c in names if client in (None, c) or c == PROJECT_WIDE]
        pipe = r.pipeline(transaction=False)
        for scope, p, c in keys:
            pipe.hgetall(f"{self._ns}{p}/u/{scope}/c/{c}")
        values = await self._link.call(pipe.execute)
        return sorted_rows(
            UsageRow(scope, p, c, _counts(v)) for (scope, p, c), v in zip(keys, values, strict=True) if v
        )

    async def _projects(self) -> list[str]:
        """Projects with running totals (a bounded scan: one key per project)."""
        r, head, tail = self._link.r, self._ns, f"/u/{TOTAL}/c/{PROJECT_WIDE}"
        pattern = f"{_glob_escape(head)}*{_glob_escape(tail)}"

        async def scan() -> list[bytes | str]:
            return [key async for key in r.scan_iter(match=pattern, count=1000)]

        names = (_text(key)[len(head) : -len(tail)] for key in await self._link.call(scan))
        return sorted({name for name in names if "/" not in name})


def _counts(raw: dict[bytes, bytes]) -> Counts:
    return Counts(**{f: int(raw.get(f.encode(), b"0")) for f in FIELDS})


def _glob_escape(text: str) -> str:
    """`text` matched literally in a SCAN pattern."""
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw
