"""Fleet samples for the console: one row per worker, taken once a second, the last 15 minutes kept.

Sampling on a fixed clock (not per telemetry message) gives every worker a point at the same times, so a
chart's series line up. Each sample is encoded to JSON once, when taken, and every event stream sends
those same bytes: a hundred open pages cost no more serialising than one. Whatever the broker sends, a
sample holds at most `MAX_WORKERS` rows (the most recently seen workers) in `MAX_SAMPLE_BYTES`, and the
history at most `MAX_HISTORY_BYTES`. Values are plain data; the browser renders them as text only.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from worker.fleet.view import FleetState, WorkerView

SAMPLE_S = 1.0
HISTORY_S = 15 * 60
MAX_SAMPLES = round(HISTORY_S / SAMPLE_S)
MAX_WORKERS = 256
"""Rows per sample: a flood of made-up worker ids cannot grow the console's memory without bound."""
MAX_SAMPLE_BYTES = 256 * 1024
"""One encoded sample (a real row is about 500 bytes); rows that do not fit are left out."""
MAX_HISTORY_BYTES = 32 * 2**20
"""The whole history; the oldest samples go first (15 minutes of about 60 real workers fit)."""
TEXT_CHARS = 256
"""Longest string a row shows (models, projects, adapters); the table has no room for more."""
MAX_LISTED = 32
"""Projects and adapters a row lists."""


class Samples:
    """Folds `FleetState` into timestamped, encoded samples (see the module docstring)."""

    def __init__(self, fleet: FleetState, clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self._clock = clock
        self.history: deque[bytes] = deque()
        """Encoded samples (JSON objects), oldest first."""
        self.history_bytes = 0
        self.rows_left_out = 0

    def take(self) -> bytes:
        """One sample now, encoded; also appended to the history."""
        now = self._clock()
        rows: list[tuple[str, bytes]] = []
        room = MAX_SAMPLE_BYTES - 64  # the envelope: {"t":...,"workers":[...]}
        for view in self._fleet.recent(MAX_WORKERS):
            row = _encode(_row(view, now, self._fleet.stale_after_s))
            if len(row) + 1 > room:
                self.rows_left_out += 1
                continue
            rows.append((view.worker, row))
            room -= len(row) + 1
        rows.sort(key=lambda r: r[0])  # a stable table: by name
        sample = b'{"t":%s,"workers":[%s]}' % (_encode(round(now, 3)), b",".join(row for _, row in rows))
        self.history.append(sample)
        self.history_bytes += len(sample)
        while len(self.history) > MAX_SAMPLES or self.history_bytes > MAX_HISTORY_BYTES:
            self.history_bytes -= len(self.history.popleft())
        return sample

    def projects(self) -> list[str]:
        """Projects served by ready workers (the playground's choices)."""
        now = self._clock()
        names = {
            p
            for v in self._fleet.recent()
            if v.status is not None and v.state(now, self._fleet.stale_after_s) == "ready"
            for p in v.status.projects
        }
        return sorted(names)


def _encode(data: object) -> bytes:
    """Compact JSON that every browser parses: ASCII only, never NaN or Infinity."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def _row(view: WorkerView, now: float, stale_after_s: float) -> dict[str, Any]:
    status, tele = view.status, view.telemetry
    eng = tele.engine if tele else None
    store = tele.state if tele else None
    return {
        "worker": view.worker,
        "state": view.state(now, stale_after_s),
        "model": _clip(status.model if status else tele.model if tele else None),
        "quantization": _clip(tele.quantization if tele else status.quantization if status else None),
        "projects": [_clip(p) for p in status.projects[:MAX_LISTED]] if status else [],
        "adapters": {_clip(p): _clip(a) for p, a in list(tele.adapters.items())[:MAX_LISTED]} if tele else None,
        "gpus": [
            {"index": g.index, "name": _clip(g.name), "usedMib": g.mem_used_mib, "totalMib": g.mem_total_mib}
            for g in (tele.gpus if tele else [])
        ],
        "rssMib": tele.process.rss_mib if tele else None,
        "kvCacheUsage": _num(eng.kv_cache_usage) if eng else None,
        "running": eng.running if eng else None,
        "waiting": eng.waiting if eng else None,
        "genTokPerS": _num(eng.gen_tok_per_s) if eng else None,
        "ttftMsP50": _num(eng.ttft_ms_p50) if eng else None,
        "store": (
            {
                "backend": _clip(store.backend),
                "healthy": store.healthy,
                "latencyMs": _num(store.latency_ms),
                "degraded": store.degraded,
            }
            if store
            else None
        ),
        "lastSeenS": round(now - view.last_seen, 1),
    }


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:TEXT_CHARS]


def _num(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: a worker sending them would break every page's parser."""
    return value if value is not None and math.isfinite(value) else None
