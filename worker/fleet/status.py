"""`StatusReporter`: the worker's retained status, its periodic telemetry and the engine health check.

Status (`starting|ready|draining|offline`, retained, QoS 1) and telemetry (QoS 0) are what fleet views
and dashboards read (PROTOCOL section 6); collection that blocks (NVML, /proc) runs off the event loop.
The health loop notices an engine that died while idle and calls `on_engine_death` (fatal: drain, exit 1).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from worker import __version__
from worker.config import WorkerConfig
from worker.engine.adapters import AdapterTable
from worker.engine.base import Engine
from worker.errors import EngineDeadError
from worker.fleet.homeassistant import discovery
from worker.fleet.reports import (
    MAX_CLIENTS,
    ParallelReport,
    ProjectReport,
    State,
    StateReport,
    StatusReport,
    TelemetryReport,
)
from worker.fleet.telemetry import GpuProbe, collect_process, engine_report, process_tree_pids
from worker.serving.sessions import SessionStore
from worker.state import State as StateStore
from worker.state.usage import PROJECT_WIDE, UsageBook
from worker.transport.bus import Bus

log = structlog.get_logger(__name__)
NOTHING_COUNTED = UsageBook(max_clients=1, retention_days=1)
"""What telemetry reads before the state layer is open (the engine is still starting)."""

HEALTH_INTERVAL_S = 2.0


class StatusReporter:
    """See the module docstring. `bus`, `sessions` and `engine_ready` are set as the worker comes up."""

    def __init__(
        self,
        cfg: WorkerConfig,
        worker_id: str,
        projects: list[str],
        engine: Engine,
        counters: Counter[tuple[str, str]],
    ) -> None:
        self._cfg = cfg
        self.worker_id = worker_id
        self._projects = projects
        self._engine = engine
        self._counters = counters
        prefix = cfg.worker.topic_prefix
        self.status_topic = f"{prefix}vllm-worker/{worker_id}/status"
        self.telemetry_topic = f"{prefix}vllm-worker/{worker_id}/telemetry"
        self.gpus = GpuProbe()
        self.started = time.monotonic()
        self.bus: Bus | None = None
        self.sessions: SessionStore | None = None
        self.store: StateStore | None = None
        self.adapters: AdapterTable | None = None
        self.engine_ready = False
        self.affinity: Callable[[], bool] | None = None
        """Whether the worker invites sticky turns now (telemetry says so; None: not wired)."""

    def _project_report(self, name: str) -> ProjectReport:
        """A project's counters since start; tokens from the state layer's book of this worker's own counts."""
        book = self.store.own_usage() if self.store is not None else NOTHING_COUNTED
        spent = book.total(name)
        return ProjectReport(
            requests=self._counters[(name, "requests")],
            errors=self._counters[(name, "errors")],
            rejected=self._counters[(name, "rejected")],
            prompt_tokens=spent.prompt_tokens,
            completion_tokens=spent.completion_tokens,
            cached_tokens=spent.cached_tokens,
            tokens_today=book.used_today((name, PROJECT_WIDE)).tokens,
            top_clients=book.top(name, MAX_CLIENTS),
            sessions=self.sessions.count(name) if self.sessions else 0,
        )

    def _model_name(self) -> str:
        if self.engine_ready:  # report what the engine actually loaded
            return self._engine.model_name
        return self._cfg.model.name or self._cfg.model.path.rstrip("/").rsplit("/", 1)[-1]

    def _quantization(self) -> str:
        return self._engine.quantization if self.engine_ready else self._cfg.model.quantization

    def status_payload(self, state: State) -> bytes:
        """The retained status message for `state` (also the Last Will's, for `offline`)."""
        return StatusReport(
            state=state,
            worker=self.worker_id,
            projects=self._projects,
            model=self._model_name(),
            quantization=self._quantization(),
            version=__version__,
            since=_now_iso(),
            parallel=ParallelReport(
                tensor_parallel_size=self._cfg.model.tensor_parallel_size,
                pipeline_parallel_size=self._cfg.model.pipeline_parallel_size,
                backend=self._cfg.model.distributed_executor_backend,
                visible_devices=self._cfg.model.visible_devices,
            ),
            adapters=self.adapters.names() if self.adapters is not None else {},
            dtype=self._engine.dtype if self.engine_ready else self._cfg.model.dtype,
            dtype_reason=self._engine.dtype_reason if self.engine_ready else "",
        ).to_json()

    async def publish_discovery(self) -> None:
        """Home Assistant discovery configs, retained (`worker.homeassistant_discovery`); see `homeassistant`."""
        w = self._cfg.worker
        if self.bus is None or not w.homeassistant_discovery:
            return
        configs = discovery(
            worker_id=self.worker_id,
            topic_prefix=w.topic_prefix,
            ha_prefix=w.homeassistant_prefix,
            projects=self._projects,
            model=self._model_name(),
        )
        try:
            async with asyncio.timeout(5):
                for topic, payload in configs:
                    await self.bus.publish(topic, payload, qos=1, retain=True)
        except (TimeoutError, RuntimeError):
            log.warning("homeassistant.not_published")

    async def publish_status(self, state: State) -> None:
        """Publish the status; a broker that is away for 5 s costs a warning, not the worker."""
        if self.bus is None:
            return
        try:
            async with asyncio.timeout(5):
                await self.bus.publish(self.status_topic, self.status_payload(state), qos=1, retain=True)
        except (TimeoutError, RuntimeError):
            log.warning("status.not_published", state=state)

    async def telemetry(self) -> TelemetryReport:
        """One telemetry snapshot; blocking collection (NVML, /proc) runs off the event loop."""
        pids = await asyncio.to_thread(process_tree_pids)
        gpus = await asyncio.to_thread(self.gpus.collect, pids, _indices(self._cfg.model.visible_devices))
        process = await asyncio.to_thread(collect_process, self.started)
        process = process.model_copy(update={"unacked": self.bus.unacked if self.bus is not None else 0})
        projects = {name: self._project_report(name) for name in self._projects}
        return TelemetryReport(
            ts=_now_iso(),
            worker=self.worker_id,
            model=self._model_name(),
            quantization=self._quantization(),
            gpus=gpus,
            engine=engine_report(self._engine.stats()),
            projects=projects,
            process=process,
            state=_state_report(self.store),
            adapters=self.adapters.names() if self.adapters is not None else {},
            affinity=self.affinity() if self.affinity is not None else None,
        )

    async def telemetry_loop(self) -> None:
        """Publish telemetry every `telemetry_interval_s` (and per project, when configured)."""
        assert self.bus is not None  # noqa: S101 - started after the bus is up
        prefix = self._cfg.worker.topic_prefix
        while True:
            report = await self.telemetry()
            await self.bus.publish(self.telemetry_topic, report.to_json(), qos=0)
            if self._cfg.worker.project_telemetry:
                for name, counters in report.projects.items():
                    narrowed = report.model_copy(update={"projects": {name: counters}})
                    await self.bus.publish(f"{prefix}{name}/telemetry", narrowed.to_json(), qos=0)
            await asyncio.sleep(self._cfg.worker.telemetry_interval_s)

    async def health_loop(self, on_engine_death: Callable[[], None]) -> None:
        """Check the engine every HEALTH_INTERVAL_S; a dead engine is fatal (the loop then ends)."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self._engine.check_health()
            except EngineDeadError:
                on_engine_death()
                await asyncio.Event().wait()  # the worker is stopping: wait to be cancelled, never "end"


def _indices(visible_devices: str | None) -> set[int] | None:
    """The GPUs this worker's engine uses (all its ranks), or None for every GPU on the host."""
    if not visible_devices:
        return None
    parts = [p.strip() for p in visible_devices.split(",")]
    return {int(p) for p in parts if p.isdigit()} or None


def _state_report(store: StateStore | None) -> StateReport | None:
    if store is None:
        return None
    health = store.health()
    return StateReport(
        backend=health.backend, healthy=health.healthy, latency_ms=health.latency_ms, degraded=health.degraded
    )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
