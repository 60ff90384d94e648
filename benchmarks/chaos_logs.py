"""What the workers said: their JSON log files, read after the run and indexed for the checker.

Each worker id has one log file that spans its restarts; `chaos.started` marker lines (written by the
fleet before each start) split it into incarnations. Kept in memory: lines that name a requestId or a
session (a few per request), and a short list of context events (state and broker trouble, restarts)
that traces show around a violation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from chaos_fleet import STARTED_EVENT

CONTEXT_EVENTS = frozenset(
    {
        STARTED_EVENT,
        "state.unavailable",
        "state.recovered",
        "state.leases_lost",
        "state.lock_requeued",
        "state.refused",
        "bus.disconnected",
        "bus.reconnected",
        "job.unanswered",
        "job.failed",
        "request.failed",
        "engine.died",
    }
)
KEPT_FIELDS = ("code", "state", "reason", "error", "existed", "count", "incarnation")


@dataclass(frozen=True)
class LogLine:
    """One worker log event: when, which worker and incarnation, what, and a few of its fields."""

    ts: float
    worker: str
    incarnation: int
    event: str
    detail: str = ""

    def render(self) -> str:
        extra = f" {self.detail}" if self.detail else ""
        return f"{self.worker}#{self.incarnation} {self.event}{extra}"


@dataclass
class WorkerLogs:
    """Worker log lines indexed by requestId, by sessionId, and by worker (context events)."""

    by_request: dict[str, list[LogLine]] = field(default_factory=lambda: defaultdict(list))
    by_session: dict[str, list[LogLine]] = field(default_factory=lambda: defaultdict(list))
    context: dict[str, list[LogLine]] = field(default_factory=lambda: defaultdict(list))
    incarnations: dict[str, int] = field(default_factory=dict)
    done_times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Per worker: when it finished a request (`request.done`): did it answer after the last fault?"""
    errors: int = 0
    """Lines at level error or critical (reported, not judged: a chaos run provokes some)."""

    def generations(self, rid: str) -> list[LogLine]:
        return [line for line in self.by_request.get(rid, []) if line.event == "fake.generated"]

    def completions(self, rid: str) -> list[LogLine]:
        return [line for line in self.by_request.get(rid, []) if line.event == "request.done"]

    def ended(self, worker: str, incarnation: int) -> bool:
        """Whether that process is gone (a later incarnation of the same worker id started)."""
        return self.incarnations.get(worker, 0) > incarnation


def _ts(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def read_logs(paths: dict[str, Path]) -> WorkerLogs:
    """Parse every worker's log file (worker id -> path); lines that are not JSON (status lines) are skipped."""
    logs = WorkerLogs()
    for worker, path in paths.items():
        incarnation, last_ts = 0, 0.0
        with path.open("rb") as fh:
            for raw in fh:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(line, dict):
                    continue
                last_ts = _ts(line.get("ts", line.get("timestamp"))) or last_ts
                if line.get("event") == STARTED_EVENT:
                    incarnation = int(line.get("incarnation", incarnation + 1))
                    logs.incarnations[worker] = incarnation
                _index(logs, line, LogLine(last_ts, worker, incarnation, str(line.get("event", ""))))
    return logs


def _index(logs: WorkerLogs, line: dict[str, Any], entry: LogLine) -> None:
    if line.get("level") in {"error", "critical"}:
        logs.errors += 1
    detail = " ".join(f"{k}={line[k]}" for k in KEPT_FIELDS if k in line and k != "incarnation")
    entry = LogLine(entry.ts, entry.worker, entry.incarnation, entry.event, detail)
    if rid := line.get("request_id"):
        logs.by_request[str(rid)].append(entry)
        if entry.event == "request.done":
            logs.done_times[entry.worker].append(entry.ts)
    elif sid := line.get("session_id"):
        logs.by_session[str(sid)].append(entry)
    elif entry.event in CONTEXT_EVENTS:
        logs.context[entry.worker].append(entry)
