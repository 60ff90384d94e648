"""The console's Usage page data: tokens per project today, the last 14 days, and the top clients.

From the shared state when the console is given one (`--state-url`: the fleet's counters, per UTC day
and client), else from the workers' telemetry (today's tokens per project and each worker's top
clients since it started; the chart then has today only). A snapshot is cached for `CACHE_S`, so open
pages cost Redis one read every few seconds, whatever their number. Every name shown comes from the
broker or Redis: the page renders it as text only.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from worker.errors import WorkerError
from worker.fleet.view import FleetState
from worker.state import State, UsageRow
from worker.state.usage import PROJECT_WIDE, TOTAL, last_days, utc_day, wall_clock

log = structlog.get_logger(__name__)
DAYS = 14
TOP = 10
MAX_PROJECTS = 64
CACHE_S = 5.0


class UsageView:
    """See the module docstring."""

    def __init__(self, fleet: FleetState, state: State | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._fleet = fleet
        self._state = state
        self._clock = clock
        self._cached: tuple[float, dict[str, Any]] | None = None

    async def snapshot(self) -> dict[str, Any]:
        """What the page shows (see `_shape`); at most `CACHE_S` old."""
        now = self._clock()
        if self._cached is not None and now - self._cached[0] < CACHE_S:
            return self._cached[1]
        if self._state is None:
            data = self._from_telemetry()
        else:
            try:
                data = await self._from_state(self._state)
            except WorkerError:
                log.warning("console.usage_unavailable")
                return {"source": "redis", "error": "the shared state does not answer", "projects": []}
        self._cached = (now, data)
        return data

    async def _from_state(self, state: State) -> dict[str, Any]:
        days = await state.usage_rows(DAYS, None, PROJECT_WIDE)
        today = await state.usage_rows(1)
        return _shape("redis", days + [r for r in today if r.day != TOTAL and r.client != PROJECT_WIDE])

    def _from_telemetry(self) -> dict[str, Any]:
        today = utc_day(wall_clock())
        tokens: Counter[str] = Counter()
        clients: dict[str, Counter[str]] = {}
        for view in self._fleet.views():
            if view.telemetry is None:
                continue
            for project, report in view.telemetry.projects.items():
                tokens[project] += report.tokens_today
                clients.setdefault(project, Counter()).update(report.top_clients)
        rows: list[tuple[str, str, str, int]] = [(today, p, PROJECT_WIDE, n) for p, n in tokens.items()]
        rows += [(today, p, c, n) for p, per in clients.items() for c, n in per.items()]
        return _shape_tokens("telemetry", rows)


def _shape(source: str, rows: list[UsageRow]) -> dict[str, Any]:
    return _shape_tokens(source, [(r.day, r.project, r.client, r.counts.tokens) for r in rows if r.day != TOTAL])


def _shape_tokens(source: str, rows: list[tuple[str, str, str, int]]) -> dict[str, Any]:
    """`{source, days, projects: [{project, today, series, top: [{client, tokens}]}]}`, bounded."""
    days = list(reversed(last_days(wall_clock(), DAYS)))
    today = days[-1]
    series: dict[str, dict[str, int]] = {}
    top: dict[str, Counter[str]] = {}
    for day, project, client, tokens in rows:
        if client == PROJECT_WIDE:
            series.setdefault(project, {})[day] = tokens
        elif day == today:
            top.setdefault(project, Counter())[client] += tokens
    names = sorted(series, key=lambda p: -series[p].get(today, 0))[:MAX_PROJECTS]
    return {
        "source": source,
        "days": days,
        "projects": [
            {
                "project": p,
                "today": series[p].get(today, 0),
                "series": [series[p].get(d, 0) for d in days],
                "top": [{"client": c, "tokens": n} for c, n in top.get(p, Counter()).most_common(TOP)],
            }
            for p in names
        ],
    }
