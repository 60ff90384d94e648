"""The fleet view: every worker seen on a broker, from their retained status and periodic telemetry.

`FleetState` folds status/telemetry messages (validated with the same models the workers publish),
`render` draws the live rich table, `snapshot` gives the JSON for `--once --json`, and
`PrometheusCollector` exposes the fleet with vLLM's metric names plus a `worker` label.

Anyone who can publish on the broker can write here, so every message is hostile until validated and the
view is bounded in workers and in bytes: the most recently seen are kept, a worker that stops reporting
turns stale whatever it last published, and one silent for `PRUNE_AFTER_STALE` times longer is forgotten.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from worker.fleet.reports import StatusReport, TelemetryReport

MAX_WORKERS = 1024
MAX_ID_CHARS = 256
"""Worker ids read from topics (the protocol's own ids are at most 128 characters)."""
MAX_REPORT_BYTES = 64 * 1024
"""One status or telemetry payload, refused unparsed above this (a real one is about 1 KiB)."""
MAX_STORED_BYTES = 8 * 2**20
"""Payload bytes kept for the whole fleet; the least recently seen workers go first."""
PRUNE_AFTER_STALE = 10
"""A worker silent for this many `stale_after_s` is forgotten, so made-up ids do not pile up."""

STATE_STYLE = {
    "ready": "green",
    "starting": "yellow",
    "draining": "yellow",
    "offline": "bold red",
    "stale": "red",
}


@dataclass
class WorkerView:
    """What the fleet knows about one worker."""

    worker: str
    status: StatusReport | None = None
    telemetry: TelemetryReport | None = None
    last_seen: float = 0.0
    status_bytes: int = 0
    telemetry_bytes: int = 0

    @property
    def stored_bytes(self) -> int:
        """Payload bytes this view holds (what the fleet's byte bound counts)."""
        return len(self.worker) + self.status_bytes + self.telemetry_bytes

    def state(self, now: float, stale_after_s: float) -> str:
        """Reported state; `stale` once silent for `stale_after_s`, whatever it claimed (offline stays offline)."""
        state = self.status.state if self.status else "unknown"
        if state != "offline" and now - self.last_seen > stale_after_s:
            return "stale"
        return state


@dataclass
class FleetState:
    """All workers by id; fed by `handle(topic, payload)`."""

    topic_prefix: str = ""
    stale_after_s: float = 30.0
    clock: Callable[[], float] = time.time
    workers: dict[str, WorkerView] = field(default_factory=dict)
    """Least recently seen first (every accepted message moves its worker to the end): eviction order."""
    stored_bytes: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """Messages dropped, by reason (`id`, `size`, `invalid`)."""

    @property
    def filters(self) -> list[str]:
        """Topics to subscribe."""
        return [f"{self.topic_prefix}vllm-worker/+/status", f"{self.topic_prefix}vllm-worker/+/telemetry"]

    def handle(self, topic: str, payload: bytes) -> bool:
        """Fold one message in; False when it is not a (valid) fleet message. Never raises.

        An empty payload on a status topic (a cleared retained status) forgets the worker.
        """
        parts = topic.removeprefix(self.topic_prefix).split("/")
        if len(parts) != 3 or parts[0] != "vllm-worker" or parts[2] not in ("status", "telemetry"):  # noqa: PLR2004
            return False
        worker, kind = parts[1], parts[2]
        if not (0 < len(worker) <= MAX_ID_CHARS and worker.isprintable()):
            return self._refuse("id")
        if not payload and kind == "status":
            self.forget(worker)
            return True
        if len(payload) > MAX_REPORT_BYTES:
            return self._refuse("size")
        try:
            report: StatusReport | TelemetryReport = (
                StatusReport.model_validate_json(payload)
                if kind == "status"
                else TelemetryReport.model_validate_json(payload)
            )
        except ValidationError:
            return self._refuse("invalid")
        view = self.workers.pop(worker, None)
        if view is None:
            view = WorkerView(worker)
        else:
            self.stored_bytes -= view.stored_bytes
        if isinstance(report, StatusReport):
            view.status, view.status_bytes = report, len(payload)
        else:
            view.telemetry, view.telemetry_bytes = report, len(payload)
        view.last_seen = self.clock()
        self.workers[worker] = view  # now the most recently seen
        self.stored_bytes += view.stored_bytes
        self.prune()
        return True

    def forget(self, worker: str) -> None:
        """Drop one worker."""
        if (view := self.workers.pop(worker, None)) is not None:
            self.stored_bytes -= view.stored_bytes

    def prune(self) -> None:
        """Forget the least recently seen while over `MAX_WORKERS` or `MAX_STORED_BYTES`, and the long silent."""
        horizon = self.clock() - PRUNE_AFTER_STALE * self.stale_after_s
        while self.workers:
            oldest = next(iter(self.workers.values()))
            crowded = len(self.workers) > MAX_WORKERS or self.stored_bytes > MAX_STORED_BYTES
            if not crowded and oldest.last_seen >= horizon:
                return
            self.forget(oldest.worker)

    def recent(self, limit: int = MAX_WORKERS) -> list[WorkerView]:
        """The `limit` most recently seen workers, most recent first (after pruning)."""
        self.prune()
        return list(islice(reversed(self.workers.values()), limit))

    def views(self) -> list[WorkerView]:
        """Every worker known now, by name (after pruning)."""
        self.prune()
        return sorted(self.workers.values(), key=lambda v: v.worker)

    def snapshot(self) -> list[dict[str, Any]]:
        """JSON-ready list, one object per worker (for scripts)."""
        now = self.clock()
        return [
            {
                "worker": v.worker,
                "state": v.state(now, self.stale_after_s),
                "lastSeenS": round(now - v.last_seen, 1),
                "status": v.status.model_dump(by_alias=True) if v.status else None,
                "telemetry": v.telemetry.model_dump(by_alias=True) if v.telemetry else None,
            }
            for v in self.views()
        ]

    def _refuse(self, reason: str) -> bool:
        self.refused[reason] += 1
        return False


def _bar(used: int, total: int, width: int = 10) -> Text:
    if total <= 0:
        return Text("-")
    frac = min(used / total, 1.0)
    filled = round(frac * width)
    style = "green" if frac < 0.8 else "yellow" if frac < 0.95 else "red"  # noqa: PLR2004
    return Text("█" * filled, style=style) + Text("░" * (width - filled)) + Text(f" {used // 1024}/{total // 1024}G")


def _text(value: str, limit: int = 64) -> Text:
    """A broker string as a cell: never markup, no control characters (terminal escapes), clipped."""
    clean = "".join(c if c.isprintable() else "?" for c in value[: limit + 1])
    return Text(clean if len(clean) <= limit else clean[: limit - 1] + "…")


def render(fleet: FleetState) -> Table:
    """The live table."""
    views = fleet.views()
    table = Table(title=f"vllm-worker fleet ({len(views)} workers)", expand=False)
    for col in (
        "worker",
        "state",
        "model",
        "quant",
        "projects",
        "GPU mem",
        "KV",
        "run/wait",
        "tok/s",
        "TTFT p50",
        "state store",
        "seen",
    ):
        table.add_column(col, no_wrap=col in ("worker", "GPU mem"))
    now = fleet.clock()
    for view in views:
        state = view.state(now, fleet.stale_after_s)
        status, tele = view.status, view.telemetry
        eng = tele.engine if tele else None
        gpu = Text("cpu") if tele is not None and not tele.gpus else Text("-")
        if tele is not None and tele.gpus:
            gpu = _bar(sum(g.mem_used_mib for g in tele.gpus), sum(g.mem_total_mib for g in tele.gpus))
        table.add_row(
            _text(view.worker, limit=128),
            Text(state, style=STATE_STYLE.get(state, "")),
            _text(status.model if status else tele.model if tele else "-"),
            _text(tele.quantization if tele else status.quantization if status else "-"),
            _text(", ".join(status.projects[:8]) if status else "-"),
            gpu,
            f"{eng.kv_cache_usage:.0%}" if eng else "-",
            f"{eng.running}/{eng.waiting}" if eng else "-",
            f"{eng.gen_tok_per_s:.0f}" if eng else "-",
            f"{eng.ttft_ms_p50:.0f} ms" if eng else "-",
            _store(tele),
            f"{now - view.last_seen:.0f}s ago",
        )
    return table


def _store(tele: TelemetryReport | None) -> Text:
    """Where the worker's sessions live, and whether that backend answers (a DOWN store refuses turns)."""
    if tele is None or tele.state is None:
        return Text("-")
    st = tele.state
    backend = _text(st.backend, limit=16).plain
    if not st.healthy:
        return Text(f"{backend} DOWN", style="bold red")
    return Text(backend + (f" {st.latency_ms:.1f} ms" if st.latency_ms is not None else ""))


class PrometheusCollector:
    """prometheus_client custom collector: the fleet's telemetry under vLLM's metric names."""

    def __init__(self, fleet: FleetState) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Any]:
        """Called by prometheus_client at scrape time."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

        gauges: dict[str, tuple[str, Callable[[TelemetryReport], float]]] = {
            "vllm:num_requests_running": ("Requests in model execution batches", lambda t: t.engine.running),
            "vllm:num_requests_waiting": ("Requests waiting to be processed", lambda t: t.engine.waiting),
            "vllm:kv_cache_usage_perc": (
                "KV-cache usage; 1 means 100 percent",
                lambda t: t.engine.kv_cache_usage,
            ),
            "vllm_worker:prefix_cache_hit_rate": (
                "Prefix-cache hit rate",
                lambda t: t.engine.prefix_cache_hit_rate,
            ),
            "vllm_worker:generation_tokens_per_second": (
                "Generated tokens/s",
                lambda t: t.engine.gen_tok_per_s,
            ),
            "vllm_worker:time_to_first_token_p50_seconds": (
                "TTFT p50",
                lambda t: t.engine.ttft_ms_p50 / 1000,
            ),
            "vllm_worker:process_rss_bytes": ("Worker process-tree RSS", lambda t: t.process.rss_mib * 2**20),
        }
        known = self._fleet.views()
        views = [v for v in known if v.telemetry is not None]
        for name, (doc, read) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["worker", "model_name"])
            for v in views:
                assert v.telemetry is not None  # noqa: S101
                family.add_metric([v.worker, v.telemetry.model], float(read(v.telemetry)))
            yield family
        up = GaugeMetricFamily("vllm_worker:up", "1 when the worker's state is ready", labels=["worker", "state"])
        mem = GaugeMetricFamily("vllm_worker:gpu_memory_used_bytes", "GPU memory used", labels=["worker", "gpu"])
        total = CounterMetricFamily("vllm_worker:requests", "Requests accepted", labels=["worker", "project"])
        tokens = CounterMetricFamily(
            "vllm_worker:tokens", "Tokens spent since the worker started", labels=["worker", "project", "kind"]
        )
        by_client = CounterMetricFamily(
            "vllm_worker:client_tokens",
            "Prompt + completion tokens of a worker's top clients (at most 16 per project) since it started",
            labels=["worker", "project", "client"],
        )
        now = self._fleet.clock()
        for v in known:
            state = v.state(now, self._fleet.stale_after_s)
            up.add_metric([v.worker, state], 1.0 if state == "ready" else 0.0)
            for g in v.telemetry.gpus if v.telemetry else []:
                mem.add_metric([v.worker, str(g.index)], float(g.mem_used_mib * 2**20))
            for project, counters in (v.telemetry.projects if v.telemetry else {}).items():
                total.add_metric([v.worker, project], float(counters.requests))
                for kind in ("prompt", "completion", "cached"):
                    tokens.add_metric([v.worker, project, kind], float(getattr(counters, f"{kind}_tokens")))
                for client, spent in counters.top_clients.items():
                    by_client.add_metric([v.worker, project, client], float(spent))
        store = GaugeMetricFamily(
            "vllm_worker:state_healthy",
            "1 when the state backend (memory, redis) answers",
            labels=["worker", "backend"],
        )
        for v in views:
            if v.telemetry is not None and v.telemetry.state is not None:
                st = v.telemetry.state
                store.add_metric([v.worker, st.backend], 1.0 if st.healthy else 0.0)
        yield from (up, mem, total, tokens, by_client, store)
