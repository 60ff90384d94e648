"""Admission: decides at intake whether a request may start, so the worker's memory never grows with load.

In order: the drain flag, the bounded in-flight capacity with a fair share per project (each project is
guaranteed `max_inflight // n_projects` slots, and may borrow free slots only while that leaves every
other project its unused guarantee), then fairness inside a project (caps per session and per client,
so one session's queued turns cannot starve the others). These are this worker's own resources, so they
are decided here, synchronously. What a fleet shares (dedupe, the token buckets of `budgets`) is the
state layer's (`worker.state`), taken at the start of the request path (`serve`), with the daily
quotas (`quotas`) in the same round trip.

Validate first, mutate after: every check runs before anything is recorded, so a refused request
takes no slot.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from worker.config import WorkerSection
from worker.errors import OverloadedError, ShuttingDownError
from worker.projects import Project
from worker.protocol import FinalReply, Request
from worker.state import Budget, Quota
from worker.state.usage import PROJECT_WIDE


class Admission:
    """See the module docstring."""

    def __init__(self, cfg: WorkerSection, projects: dict[str, Project]) -> None:
        self._cfg = cfg
        self._projects = projects
        self._guaranteed = max(1, cfg.max_inflight // max(1, len(projects)))
        self._inflight: dict[str, int] = dict.fromkeys(projects, 0)
        self._per_session: Counter[tuple[str, str, str]] = Counter()
        self._per_client: Counter[tuple[str, str]] = Counter()
        self._running: set[tuple[str, str, str]] = set()
        self.draining = False

    @property
    def inflight(self) -> int:
        """Accepted, unfinished requests."""
        return sum(self._inflight.values())

    def admit(self, request: Request) -> None:
        """Take the request or raise `ShuttingDownError` / `OverloadedError`."""
        if self.draining:
            raise ShuttingDownError
        project = request.route.project
        if not self._has_room(project) or not self._fair_inside_project(request):
            raise OverloadedError(retry_after_ms=self._cfg.retry_after_ms)
        self._inflight[project] = self._inflight.get(project, 0) + 1
        if request.messages is None:
            self._per_session[request.session_key] += 1
        self._per_client[client_key(request)] += 1
        self._running.add(request.dedupe_key)

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
        return self._per_client[client_key(request)] < self._cfg.max_inflight_per_client

    def budgets(self, request: Request) -> list[Budget]:
        """The token buckets this request takes from: one per (project, client), one per project."""
        project = request.route.project
        limit = self._projects[project].rate_limit if project in self._projects else None
        if limit is None:
            return []
        out = []
        if limit.requests_per_s is not None:
            out.append(Budget((project, client_key(request)[1]), limit.requests_per_s, limit.burst))
        if limit.project_requests_per_s is not None:
            out.append(Budget((project, PROJECT_WIDE), limit.project_requests_per_s, limit.project_burst))
        return out

    def quotas(self, request: Request) -> list[Quota]:
        """The daily budgets this request is checked against: its client's and its project's (`[quota]`)."""
        project = request.route.project
        if project not in self._projects:
            return []
        q = self._projects[project].quota
        out = []
        if q.client_tokens_per_day is not None or q.client_requests_per_day is not None:
            out.append(Quota(client_key(request), q.client_tokens_per_day, q.client_requests_per_day))
        if q.project_tokens_per_day is not None or q.project_requests_per_day is not None:
            out.append(Quota((project, PROJECT_WIDE), q.project_tokens_per_day, q.project_requests_per_day))
        return out

    def release(self, request: Request, _final: FinalReply | None) -> None:
        """The request's job settled: give its slot back."""
        project = request.route.project
        key = request.dedupe_key
        if key not in self._running:
            return
        self._running.discard(key)
        self._inflight[project] = max(0, self._inflight.get(project, 0) - 1)
        if request.messages is None:
            _decrement(self._per_session, request.session_key)
        _decrement(self._per_client, client_key(request))


def client_key(request: Request) -> tuple[str, str]:
    """(project, who): the v2 clientId, else the sessionId (classic clients have no other name).

    Rate limits, quotas and usage counters all key a client this way.
    """
    return request.route.project, request.route.client_id or request.route.session_id


def _decrement(counter: Counter[Any], key: object) -> None:
    """Lower a count by one, dropping the key at zero so idle keys cost no memory."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
