"""Fleet samples for the console: one row per worker, taken once a second, the last 15 minutes kept.

Sampling on a fixed clock (not per telemetry message) gives every worker a point at the same times, so a
chart's series line up, and bounds the history: `HISTORY_S / SAMPLE_S` samples of at most `MAX_WORKERS`
rows, whatever the broker sends. Values are plain data; the browser renders them as text only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from worker.fleet import FleetState, WorkerView

SAMPLE_S = 1.0
HISTORY_S = 15 * 60
MAX_WORKERS = 256
"""Rows per sample: a flood of made-up worker ids cannot grow the console's memory without bound."""


class Samples:
    """Folds `FleetState` into timestamped samples (see the module docstring)."""

    def __init__(self, fleet: FleetState, clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self._clock = clock
        self.history: deque[dict[str, Any]] = deque(maxlen=round(HISTORY_S / SAMPLE_S))

    def take(self) -> dict[str, Any]:
        """One sample now; also appended to the history."""
        now = self._clock()
        views = sorted(self._fleet.workers.values(), key=lambda v: v.worker)[:MAX_WORKERS]
        sample = {"t": round(now, 3), "workers": [_row(v, now, self._fleet.stale_after_s) for v in views]}
        self.history.append(sample)
        return sample

    def projects(self) -> list[str]:
        """Projects served by ready workers (the playground's choices)."""
        now = self._clock()
        names = {
            p
            for v in self._fleet.workers.values()
            if v.status is not None and v.state(now, self._fleet.stale_after_s) == "ready"
            for p in v.status.projects
        }
        return sorted(names)


def _row(view: WorkerView, now: float, stale_after_s: float) -> dict[str, Any]:
    status, tele = view.status, view.telemetry
    eng = tele.engine if tele else None
    return {
        "worker": view.worker,
        "state": view.state(now, stale_after_s),
        "model": status.model if status else tele.model if tele else None,
        "quantization": tele.quantization if tele else status.quantization if status else None,
        "projects": status.projects if status else [],
        "adapters": getattr(tele, "adapters", None) if tele else None,
        "gpus": [
            {"index": g.index, "name": g.name, "usedMib": g.mem_used_mib, "totalMib": g.mem_total_mib}
            for g in (tele.gpus if tele else [])
        ],
        "rssMib": tele.process.rss_mib if tele else None,
        "kvCacheUsage": eng.kv_cache_usage if eng else None,
        "running": eng.running if eng else None,
        "waiting": eng.waiting if eng else None,
        "genTokPerS": eng.gen_tok_per_s if eng else None,
        "ttftMsP50": eng.ttft_ms_p50 if eng else None,
        "store": tele.state.model_dump(by_alias=True) if tele and tele.state else None,
        "lastSeenS": round(now - view.last_seen, 1),
    }
