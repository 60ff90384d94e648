"""Session affinity: a v2 session's next turn goes straight to the worker whose KV cache holds its prefix.

Behind a shared subscription the broker hands each turn to any worker, so most turns of a conversation
land where nothing of it is cached and the whole history is prefilled again. Each worker also takes
requests on its own topic, `{project}/worker/{workerId}/user_input`, outside every shared filter, and a
final v2 answer invites the session's next turn there (`affinity` in the reply). Clients fall back to
the shared topic when that worker is not `ready`, answers `overloaded`, or is silent for a moment; a
resend carries the same requestId, so it is answered once fleet-wide. That needs shared state (Redis):
with `memory` state affinity stays off. A loaded worker stops inviting (requests waiting in its engine,
KV cache use), so hot sessions cannot pile onto one worker.
"""

from __future__ import annotations

from worker.config import WorkerSection
from worker.engine.base import Engine
from worker.protocol import Dialect, Route, Topics


class Affinity:
    """See the module docstring."""

    def __init__(self, cfg: WorkerSection, topics: Topics, worker_id: str, engine: Engine, projects: list[str]) -> None:
        self._cfg = cfg
        self._topics = topics
        self._worker_id = worker_id
        self._engine = engine
        self._projects = projects
        self.enabled = False
        """Set once the state backend is known: on only with shared (Redis) state and `worker.affinity`."""

    def enable(self, backend: str) -> None:
        """Turn affinity on where the state backend deduplicates fleet-wide."""
        self.enabled = self._cfg.affinity and backend == "redis"

    def filters(self, worker_id: str | None = None) -> list[str]:
        """The direct request topics of this worker (or of a peer, for a takeover); none while affinity is off."""
        who = worker_id or self._worker_id
        return [self._topics.direct_input(p, who) for p in self._projects] if self.enabled else []

    def inviting(self) -> bool:
        """Whether this worker invites sticky turns now (affinity on, engine not loaded)."""
        if not self.enabled:
            return False
        stats = self._engine.stats()
        return (
            stats.waiting <= self._cfg.affinity_max_waiting and stats.kv_cache_usage <= self._cfg.affinity_max_kv_usage
        )

    def invite(self, route: Route) -> dict[str, str] | None:
        """The final v2 answer's `affinity`: where the session's next turn may go; None: anywhere."""
        if route.dialect is not Dialect.V2 or not self.inviting():
            return None
        return {"worker": self._worker_id, "topic": self._topics.direct_input(route.project, self._worker_id)}
