"""Request state that must hold across a fleet and restarts: sessions, dedupe, rate limits, usage (see `base`)."""

from __future__ import annotations

from worker.config import WorkerConfig
from worker.state.base import Budget, Claim, Claimed, History, State, StateHealth, Turn
from worker.state.memory import MemoryLimits, MemoryState
from worker.state.usage import Counts, Quota, Usage, UsageRow

__all__ = [
    "Budget",
    "Claim",
    "Claimed",
    "Counts",
    "History",
    "MemoryState",
    "Quota",
    "State",
    "StateHealth",
    "Turn",
    "Usage",
    "UsageRow",
    "open_state",
]


def open_state(cfg: WorkerConfig) -> State:
    """The backend `state.url` names: `memory` (default) or `redis://` / `rediss://` (a fleet)."""
    limits = MemoryLimits(
        max_sessions=cfg.sessions.max_sessions,
        idle_ttl_s=cfg.sessions.idle_ttl_s,
        dedupe_window_s=cfg.worker.dedupe_window_s,
        dedupe_max_entries=cfg.worker.dedupe_max_entries,
        dedupe_max_bytes=cfg.worker.dedupe_max_bytes,
        usage_max_clients=cfg.state.usage_max_clients,
        usage_retention_days=cfg.state.usage_retention_days,
    )
    url = cfg.state.url.get_secret_value()
    if url == "memory":
        return MemoryState(limits)
    from worker.state.redis_backend import RedisState  # noqa: PLC0415 - redis is imported only when used

    namespace = f"{cfg.state.key_prefix}/{cfg.worker.topic_prefix}"
    return RedisState(url, namespace, limits, lease_s=cfg.state.lease_s, op_timeout_s=cfg.state.op_timeout_s)
