"""Admission: decides at intake whether a request may start, so the worker's memory never grows with load.

In order: dedupe (a requestId seen in the last `dedupe_window_s` is never generated twice), the drain
flag, the bounded in-flight capacity with a fair share per project (each project is guaranteed
`max_inflight // n_projects` slots, and may borrow free slots only while that leaves every other project
its unused guarantee), fairness inside a project (caps per session and per client, so one session's
queued turns cannot starve the others), then the token buckets: one per (project, client) and one per
project (so fresh client ids do not multiply the budget).

Validate first, mutate after: every check runs before anything is recorded, so a refused request
takes no token, no slot and no dedupe entry.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from enum import Enum
from typing import Any

from worker.config import WorkerSection
from worker.errors import OverloadedError, RateLimitedError, ShuttingDownError
from worker.projects import Project
from worker.protocol import FinalReply, Request

MAX_BUCKETS = 10_000
DedupeKey = tuple[str, str, str]
"""(project, owner, requestId): see `Request.dedupe_key`."""


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


class _Buckets:
    """Token buckets by key, LRU-capped; `check` is pure, `take` commits."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def check(self, key: tuple[str, str], rate_per_s: float, burst: int) -> None:
        """Raise `RateLimitedError` when the bucket has no whole token now; changes nothing."""
        tokens = self._level(key, rate_per_s, burst, self._clock())
        if tokens < 1.0:
            raise RateLimitedError(retry_after_ms=math.ceil((1.0 - tokens) / rate_per_s * 1000))

    def take(self, key: tuple[str, str], rate_per_s: float, burst: int) -> None:
        """Spend one token (after `check` passed)."""
        now = self._clock()
        tokens = self._level(key, rate_per_s, burst, now)
        self._buckets.pop(key, None)
        self._buckets[key] = _Bucket(tokens - 1.0, now)  # most recently used last
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)

    def _level(self, key: tuple[str, str], rate_per_s: float, burst: int, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(burst)
        return min(float(burst), bucket.tokens + (now - bucket.stamp) * rate_per_s)


PROJECT_WIDE = "*"
"""Bucket key of a project's aggregate budget (never a valid client id: ids have no `*`)."""


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
        self._per_session: Counter[tuple[str, str, str]] = Counter()
        self._per_client: Counter[tuple[str, str]] = Counter()
        self._running: set[DedupeKey] = set()
        # dedupe key -> (time seen, final reply once sent); oldest first
        self._seen: OrderedDict[DedupeKey, tuple[float, FinalReply | None]] = OrderedDict()
        self._buckets = _Buckets(clock)
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
        key = request.dedupe_key
        if key not in self._seen:
            return Seen.NEW, None
        if key in self._running:
            return Seen.IN_FLIGHT, None
        return Seen.DONE, self._seen[key][1]

    # ---- admission -------------------------------------------------------------------------------------
    def admit(self, request: Request) -> None:
        """Take the request or raise `ShuttingDownError` / `OverloadedError` / `RateLimitedError`."""
        if self.draining:
            raise ShuttingDownError
        project = request.route.project
        if not self._has_room(project) or not self._fair_inside_project(request):
            raise OverloadedError(retry_after_ms=self._cfg.retry_after_ms)
        budgets = self._budgets(request)
        for key, rate, burst in budgets:
            self._buckets.check(key, rate, burst)
        # every check passed: commit
        for key, rate, burst in budgets:
            self._buckets.take(key, rate, burst)
        self._inflight[project] = self._inflight.get(project, 0) + 1
        if request.messages is None:
            self._per_session[request.session_key] += 1
        self._per_client[_client_key(request)] += 1
        self._running.add(request.dedupe_key)
        if request.client_supplied_id:
            self._seen[request.dedupe_key] = (self._clock(), None)
            self._seen.move_to_end(request.dedupe_key)

    def _has_room(self, project: str) -> bool:
        total = self.inflight
        if total >= self._cfg.max_inflight:
            return False
        if self._inflight.get(project, 0) < self._guaranteed:
            return True
        reserved = sum(max(0, self._guaranteed - n) for p, n in self._inflight.items() if p != project)
        return total + reserved < self._cfg.max_inflight

    def _fair_inside_project(self, request: Request) -> bool:
        """One session (stateful turns queue behind each other) or one client may hold only so many slots."""
        if request.messages is None and self._per_session[request.session_key] >= self._cfg.max_inflight_per_session:
            return False
        return self._per_client[_client_key(request)] < self._cfg.max_inflight_per_client

    def _budgets(self, request: Request) -> list[tuple[tuple[str, str], float, int]]:
        project = request.route.project
        limit = self._projects[project].rate_limit if project in self._projects else None
        if limit is None:
            return []
        out = []
        if limit.requests_per_s is not None:
            out.append(((project, _client_key(request)[1]), limit.requests_per_s, limit.burst))
        if limit.project_requests_per_s is not None:
            out.append(((project, PROJECT_WIDE), limit.project_requests_per_s, limit.project_burst))
        return out

    def release(self, request: Request, final: FinalReply | None) -> None:
        """The request's final reply is out (`final`: what was sent, for redeliveries)."""
        project = request.route.project
        key = request.dedupe_key
        if key not in self._running:
            return
        self._running.discard(key)
        self._inflight[project] = max(0, self._inflight.get(project, 0) - 1)
        if request.messages is None:
            _decrement(self._per_session, request.session_key)
        _decrement(self._per_client, _client_key(request))
        if request.client_supplied_id and key in self._seen:
            self._seen[key] = (self._seen[key][0], final)


def _client_key(request: Request) -> tuple[str, str]:
    """(project, who): the v2 clientId, else the sessionId (classic clients have no other name)."""
    return request.route.project, request.route.client_id or request.route.session_id


def _decrement(counter: Counter[Any], key: object) -> None:
    """Lower a count by one, dropping the key at zero so idle keys cost no memory."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
