"""Admission: decides at intake whether a request may start, so the worker's memory never grows with load.

In order: dedupe (a requestId seen in the last `dedupe_window_s` is never generated twice), the drain
flag, the (project, client) token bucket, then the bounded in-flight capacity with a fair share per
project: each project is guaranteed `max_inflight // n_projects` slots, and may borrow free slots only
while that leaves every other project its unused guarantee.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum

from worker.config import WorkerSection
from worker.errors import OverloadedError, RateLimitedError, ShuttingDownError
from worker.projects import Project
from worker.protocol import FinalReply, Request

MAX_BUCKETS = 10_000


class Seen(Enum):
    """Dedupe verdict."""

    NEW = "new"
    IN_FLIGHT = "in_flight"
    DONE = "done"


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Admission:
    """See the module docstring."""

    def __init__(
        self,
        cfg: WorkerSection,
        projects: dict[str, Project],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._projects = projects
        self._clock = clock
        self._guaranteed = max(1, cfg.max_inflight // max(1, len(projects)))
        self._inflight: dict[str, int] = dict.fromkeys(projects, 0)
        self._running: set[tuple[str, str]] = set()
        # (project, requestId) -> (time seen, final reply once sent); oldest first
        self._seen: OrderedDict[tuple[str, str], tuple[float, FinalReply | None]] = OrderedDict()
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self.draining = False

    @property
    def inflight(self) -> int:
        """Accepted, unfinished requests."""
        return sum(self._inflight.values())

    # ---- dedupe ----------------------------------------------------------------------------------------
    def _forget_old(self, now: float) -> None:
        cutoff = now - self._cfg.dedupe_window_s
        while self._seen:
            key, (stamp, _) = next(iter(self._seen.items()))
            if stamp >= cutoff and len(self._seen) <= self._cfg.dedupe_max_entries:
                return
            if key in self._running:  # never forget a running one (the cap is soft while it runs)
                self._seen.move_to_end(key)
                if len(self._seen) <= len(self._running):
                    return
                continue
            del self._seen[key]

    def seen(self, request: Request) -> tuple[Seen, FinalReply | None]:
        """Whether this client-supplied requestId was accepted before, and its final reply if sent."""
        if not request.client_supplied_id:
            return Seen.NEW, None
        self._forget_old(self._clock())
        key = (request.route.project, request.request_id)
        if key not in self._seen:
            return Seen.NEW, None
        if key in self._running:
            return Seen.IN_FLIGHT, None
        return Seen.DONE, self._seen[key][1]

    # ---- admission -------------------------------------------------------------------------------------
    def admit(self, request: Request) -> None:
        """Take the request or raise `ShuttingDownError` / `RateLimitedError` / `OverloadedError`."""
        if self.draining:
            raise ShuttingDownError
        project = request.route.project
        self._take_token(project, request.route.client_id or request.route.session_id)
        if not self._has_room(project):
            raise OverloadedError(retry_after_ms=self._cfg.retry_after_ms)
        self._inflight[project] = self._inflight.get(project, 0) + 1
        key = (project, request.request_id)
        self._running.add(key)
        if request.client_supplied_id:
            self._seen[key] = (self._clock(), None)
            self._seen.move_to_end(key)

    def _has_room(self, project: str) -> bool:
        total = self.inflight
        if total >= self._cfg.max_inflight:
            return False
        if self._inflight.get(project, 0) < self._guaranteed:
            return True
        reserved = sum(max(0, self._guaranteed - n) for p, n in self._inflight.items() if p != project)
        return total + reserved < self._cfg.max_inflight

    def _take_token(self, project: str, client: str) -> None:
        limit = self._projects[project].rate_limit if project in self._projects else None
        if limit is None or limit.requests_per_s is None:
            return
        now = self._clock()
        key = (project, client)
        bucket = self._buckets.pop(key, None) or _Bucket(float(limit.burst), now)
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        bucket.tokens = min(float(limit.burst), bucket.tokens + (now - bucket.stamp) * limit.requests_per_s)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            wait_ms = math.ceil((1.0 - bucket.tokens) / limit.requests_per_s * 1000)
            raise RateLimitedError(retry_after_ms=wait_ms)
        bucket.tokens -= 1.0

    def release(self, request: Request, final: FinalReply | None) -> None:
        """The request's final reply is out (`final`: what was sent, for redeliveries)."""
        project = request.route.project
        key = (project, request.request_id)
        if key not in self._running:
            return
        self._running.discard(key)
        self._inflight[project] = max(0, self._inflight.get(project, 0) - 1)
        if request.client_supplied_id and key in self._seen:
            self._seen[key] = (self._seen[key][0], final)
