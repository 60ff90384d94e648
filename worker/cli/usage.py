"""`vllm-worker usage`: who spent how many tokens, per UTC day, project and client (issue 31).

From Redis when the fleet shares state (`state.url`: the fleet's counters, per day and client); else
from the workers' telemetry since they started (per project, summed over the workers heard within
`--wait` seconds; there `requests` are the accepted ones, refusals by a rate limit or quota among them,
and `refused` every refusal, at intake too). A project's `[quota]` (from the topics directory) adds how
much of today's budget is used.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from worker.cli.listen import listen
from worker.cli.terminal import say
from worker.config import WorkerConfig, load
from worker.errors import ConfigError, StateUnavailableError
from worker.projects import QuotaLimits, load_project
from worker.state import Counts, UsageRow
from worker.state.usage import PROJECT_WIDE, utc_day

SINCE_START = "since start"
"""The day column of rows read from telemetry (workers count since they started)."""
COLUMNS: tuple[str, ...] = ("day", "project", "client", "requests", "prompt_tokens", "completion_tokens")
COLUMNS += ("cached_tokens", "errors", "refused", "quota_used_pct")


def parser() -> argparse.ArgumentParser:
    """The command line (config file and environment give the state URL and the topics directory)."""
    p = argparse.ArgumentParser(prog="vllm-worker usage", description="Tokens and requests per day, project, client.")
    p.add_argument("--project", help="only this project")
    p.add_argument("--client", help="only this client (a v2 clientId, or a classic sessionId)")
    p.add_argument("--days", type=int, default=7, help="the last N UTC days, today included (default 7)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON rows")
    fmt.add_argument("--csv", action="store_true", help="print CSV rows")
    p.add_argument("--config", help="the worker's config file (for state.url, topics_dir, topic_prefix)")
    p.add_argument("--state-url", help="redis://... (default: state.url of the config or environment)")
    p.add_argument("--broker", help="without Redis: read the workers' telemetry on this broker")
    p.add_argument("--wait", type=float, default=6.0, help="without Redis: seconds to listen (default 6)")
    return p


async def main(argv: Sequence[str]) -> int:
    """Print the usage table; 2 on a config error."""
    args = parser().parse_args(argv)
    if args.days < 1:
        raise ConfigError("--days must be at least 1")
    flags: dict[str, Any] = {}
    if args.state_url:
        flags["state"] = {"url": args.state_url}
    if args.broker:
        flags["broker"] = {"url": args.broker}
    cfg = load(args.config, flags)
    if cfg.state.url.get_secret_value() != "memory":
        rows = await _from_state(cfg, args)
    else:
        rows = await _from_telemetry(cfg, args)
    quotas = {project: _quota(cfg, project) for project in {r.project for r in rows}}  # each file read once
    today = utc_day(time.time())
    out = [_row_dict(r, _quota_pct(quotas[r.project], r) if r.day == today else None) for r in rows]
    if args.json:
        print(json.dumps(out, indent=2))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(out)
    else:
        _table(out)
    return 0


async def _from_state(cfg: WorkerConfig, args: argparse.Namespace) -> list[UsageRow]:
    from worker.state import open_state  # noqa: PLC0415 - redis is imported only when used

    down = ConfigError("the shared state (state.url) does not answer")
    async with open_state(cfg) as state:
        if not state.health().healthy:
            raise down
        try:
            return await state.usage_rows(args.days, args.project, args.client)
        except StateUnavailableError as exc:
            raise down from exc


async def _from_telemetry(cfg: WorkerConfig, args: argparse.Namespace) -> list[UsageRow]:
    """Per project, summed over the workers heard (each counts since its start)."""
    from worker.fleet.reports import TelemetryReport  # noqa: PLC0415
    from worker.transport.bus import Bus  # noqa: PLC0415

    latest: dict[str, TelemetryReport] = {}

    def note(_topic: str, payload: bytes) -> None:
        try:
            report = TelemetryReport.model_validate_json(payload)
        except ValueError:
            return  # hostile or foreign: not a worker's telemetry
        latest[report.worker] = report

    async with Bus(cfg.broker, f"usage-{uuid.uuid4().hex[:8]}") as bus:
        await listen(bus, [f"{cfg.worker.topic_prefix}vllm-worker/+/telemetry"], note, args.wait)
    totals: dict[str, Counts] = {}
    for report in latest.values():
        for project, p in report.projects.items():
            counts = Counts(p.requests, p.prompt_tokens, p.completion_tokens, p.cached_tokens, p.errors, p.rejected)
            totals[project] = totals.get(project, Counts()) + counts
    if not latest:
        say(f"no worker telemetry heard on {cfg.broker.url} within {args.wait:g} s")
    return [
        UsageRow(SINCE_START, project, PROJECT_WIDE, counts)
        for project, counts in sorted(totals.items())
        if args.project in (None, project)
    ]


def _quota_pct(quota: QuotaLimits | None, row: UsageRow) -> float | None:
    """The share of a day's budget the row used, in percent (None: no budget)."""
    if quota is None:
        return None
    whole = row.client == PROJECT_WIDE
    tokens = quota.project_tokens_per_day if whole else quota.client_tokens_per_day
    requests = quota.project_requests_per_day if whole else quota.client_requests_per_day
    shares = [row.counts.tokens / tokens if tokens else None, row.counts.requests / requests if requests else None]
    known = [s for s in shares if s is not None]
    return round(100 * max(known), 1) if known else None


def _quota(cfg: WorkerConfig, project: str) -> QuotaLimits | None:
    from worker.config import resolve_path  # noqa: PLC0415

    path = resolve_path(cfg.worker.topics_dir) / f"{project}.toml"
    try:
        return load_project(path).quota if path.is_file() else None
    except ConfigError:
        return None


def _row_dict(row: UsageRow, pct: float | None) -> dict[str, Any]:
    client = "(project)" if row.client == PROJECT_WIDE else row.client
    return {"day": row.day, "project": row.project, "client": client, **row.counts.as_dict(), "quota_used_pct": pct}


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="usage (tokens = prompt + completion)")
    heads = ("day", "project", "client", "requests", "prompt", "completion", "cached", "errors", "refused", "quota %")
    for i, head in enumerate(heads):
        table.add_column(head, justify="right" if i >= 3 else "left")  # noqa: PLR2004 - the numeric columns
    for r in rows:
        pct = "" if r["quota_used_pct"] is None else f"{r['quota_used_pct']:.1f}"
        numbers = [f"{r[c]:,}" for c in COLUMNS[3:9]]
        table.add_row(r["day"], r["project"], r["client"], *numbers, pct)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
