"""`Service`: wires broker, bus, engine and the request pipeline, and owns the worker's lifecycle.

Order matters: the bus comes up first so `starting` is visible during the (long) engine load and
`offline` is the last thing published; inputs are subscribed only once the engine is ready. Each
accepted request runs as its own task, so AsyncLLM batches all of them continuously.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog

from worker import __version__, protocol
from worker.admission import Admission
from worker.broker import EmbeddedBroker
from worker.bus import Bus, Will
from worker.config import WorkerConfig
from worker.engine.base import Engine, Prompt
from worker.errors import EngineDeadError, EngineError, ExpiredError, ShuttingDownError, WorkerError
from worker.message import InboundMessage
from worker.projects import Project
from worker.protocol import Rejected, Request, Route, Topics
from worker.replies import Outcome, Replier
from worker.reports import ProjectReport, State, StatusReport, TelemetryReport
from worker.sessions import SessionStore
from worker.telemetry import GpuProbe, collect_process, engine_report, process_tree_pids

log = structlog.get_logger(__name__)

Say = Callable[[str], None]


def default_worker_id(visible_devices: str | None) -> str:
    """`{hostname}-{first GPU index or cpu}-0`; set `worker.id` when several workers share a device."""
    from worker.engine.vllm import gpu_present  # noqa: PLC0415 - cheap, no vllm import

    device = (visible_devices or "0").split(",")[0].strip() if gpu_present() else "cpu"
    return f"{socket.gethostname()}-{device}-0"


class Service:
    """One worker process: see the module docstring."""

    def __init__(
        self,
        cfg: WorkerConfig,
        projects: dict[str, Project],
        engine: Engine,
        say: Say | None = None,
    ) -> None:
        self._cfg = cfg
        self._projects = projects
        self._engine = engine
        self._say = say or (lambda _msg: None)
        self.worker_id = cfg.worker.id or default_worker_id(cfg.model.visible_devices)
        self._topics = Topics(cfg.worker.topic_prefix)
        self._status_topic = f"{cfg.worker.topic_prefix}vllm-worker/{self.worker_id}/status"
        self._telemetry_topic = f"{cfg.worker.topic_prefix}vllm-worker/{self.worker_id}/telemetry"
        self._gpus = GpuProbe()
        self._admission = Admission(cfg.worker.max_inflight, cfg.worker.retry_after_ms)
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving: dict[asyncio.Task[None], Request] = {}
        self._warned_fields: set[str] = set()
        self._started = time.monotonic()
        self.counters: Counter[tuple[str, str]] = Counter()
        self.exit_code = 0
        self.ready = asyncio.Event()
        self.broker_port: int | None = None
        self._bus: Bus | None = None
        self._sessions: SessionStore | None = None
        self._replier: Replier | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set (signal) or the engine dies; returns the process exit code."""
        broker_cfg = self._cfg.broker
        async with contextlib.AsyncExitStack() as stack:
            if broker_cfg.url is None:
                broker = await stack.enter_async_context(EmbeddedBroker(broker_cfg))
                broker_cfg = broker_cfg.model_copy(update={"embedded_port": broker.port, "protocol": "3.1.1"})
                self.broker_port = broker.port
            will = Will(self._status_topic, self._status_payload("offline"))
            bus = await stack.enter_async_context(Bus(broker_cfg, self.worker_id, will=will))
            self._bus = bus
            await self._publish_status("starting")
            stack.push_async_callback(self._publish_status, "offline")
            self._say(f"engine starting: {self._cfg.model.path}")
            ticker = asyncio.create_task(self._tick_while_starting())
            try:
                engine = await stack.enter_async_context(self._engine)
            finally:
                ticker.cancel()
            self._sessions = SessionStore(self._cfg.sessions, engine)
            self._replier = Replier(self._publish_reply, engine.model_name, self.worker_id)
            await bus.subscribe(self._request_filters())
            await self._publish_status("ready")
            self.ready.set()
            self._say(
                f"ready: projects {', '.join(self._projects)} on {self._broker_label(broker_cfg.endpoint())}"
            )
            intake = asyncio.create_task(self._intake(bus, stop))
            telemetry = asyncio.create_task(self._telemetry_loop())
            await stop.wait()
            intake.cancel()
            await self._drain(bus)
            telemetry.cancel()
        await asyncio.to_thread(self._gpus.close)
        return self.exit_code

    def _broker_label(self, endpoint: tuple[str, int, bool]) -> str:
        host, port, tls = endpoint
        return f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"

    async def _tick_while_starting(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(5)
            self._say(f"engine starting... {time.monotonic() - started:.0f} s")

    def _request_filters(self) -> list[str]:
        filters: list[str] = []
        for name in self._projects:
            filters += [self._topics.user_input(name), self._topics.user_input_sessions(name)]
        return filters

    async def _drain(self, bus: Bus) -> None:
        """Stop intake, let in-flight requests finish within drain_timeout_s, answer the rest."""
        self._admission.draining = True
        await self._publish_status("draining")
        with contextlib.suppress(Exception):
            await bus.unsubscribe(self._request_filters())
        if self._tasks:
            self._say(
                f"draining {len(self._serving)} request(s), up to {self._cfg.worker.drain_timeout_s:.0f} s"
            )
            _, pending = await asyncio.wait(self._tasks, timeout=self._cfg.worker.drain_timeout_s)
            for task in pending:
                task.cancel()  # _serve answers shutting_down on cancellation
            if pending:
                await asyncio.wait(pending, timeout=5)
        log.info("service.drained", requests=sum(v for (_, k), v in self.counters.items() if k == "requests"))

    # ---- status --------------------------------------------------------------------------------------
    def _model_name(self) -> str:
        if self._replier is not None:  # the engine is up: report what it actually loaded
            return self._engine.model_name
        return self._cfg.model.name or self._cfg.model.path.rstrip("/").rsplit("/", 1)[-1]

    def _quantization(self) -> str:
        return self._engine.quantization if self._replier is not None else self._cfg.model.quantization

    def _status_payload(self, state: State) -> bytes:
        return StatusReport(
            state=state,
            worker=self.worker_id,
            projects=list(self._projects),
            model=self._model_name(),
            quantization=self._quantization(),
            version=__version__,
            since=_now_iso(),
        ).to_json()

    async def _publish_status(self, state: State) -> None:
        if self._bus is None:
            return
        try:
            async with asyncio.timeout(5):
                await self._bus.publish(self._status_topic, self._status_payload(state), qos=1, retain=True)
        except (TimeoutError, RuntimeError):
            log.warning("status.not_published", state=state)

    # ---- telemetry -----------------------------------------------------------------------------------
    async def telemetry(self) -> TelemetryReport:
        """One telemetry snapshot; blocking collection (NVML, /proc) runs off the event loop."""
        pids = await asyncio.to_thread(process_tree_pids)
        gpus = await asyncio.to_thread(self._gpus.collect, pids)
        process = await asyncio.to_thread(collect_process, self._started)
        projects = {
            name: ProjectReport(
                requests=self.counters[(name, "requests")],
                errors=self.counters[(name, "errors")],
                rejected=self.counters[(name, "rejected")],
                sessions=self._sessions.count(name) if self._sessions else 0,
            )
            for name in self._projects
        }
        return TelemetryReport(
            ts=_now_iso(),
            worker=self.worker_id,
            model=self._model_name(),
            quantization=self._quantization(),
            gpus=gpus,
            engine=engine_report(self._engine.stats()),
            projects=projects,
            process=process,
        )

    async def _telemetry_loop(self) -> None:
        assert self._bus is not None  # noqa: S101 - started after the bus is up
        prefix = self._cfg.worker.topic_prefix
        while True:
            report = await self.telemetry()
            await self._bus.publish(self._telemetry_topic, report.to_json(), qos=0)
            if self._cfg.worker.project_telemetry:
                for name, counters in report.projects.items():
                    narrowed = report.model_copy(update={"projects": {name: counters}})
                    await self._bus.publish(f"{prefix}{name}/telemetry", narrowed.to_json(), qos=0)
            await asyncio.sleep(self._cfg.worker.telemetry_interval_s)

    # ---- intake --------------------------------------------------------------------------------------
    async def _intake(self, bus: Bus, stop: asyncio.Event) -> None:
        while not stop.is_set():
            msg = await bus.messages()
            self._accept(msg, stop)
            bus.ack(msg)  # accepted (or answered): the request is ours now

    def _accept(self, msg: InboundMessage, stop: asyncio.Event) -> None:
        """Parse and admit one message; never raises. Every outcome ends in one reply task."""
        try:
            request = protocol.parse(msg, self._projects, self._topics, self._cfg.worker.max_payload_bytes)
        except Rejected as rejected:
            project = rejected.route.project if rejected.route else "?"
            self.counters[(project, "rejected")] += 1
            log.info(
                "request.rejected",
                project=project,
                code=str(rejected.error.code),
                reason=rejected.error.message,
            )
            if rejected.route is None:
                log.warning("request.unroutable", topic=msg.topic[:128], reason=rejected.error.message)
                return
            self._spawn(self._fail(rejected.route, rejected.error))
            return
        self._warn_unknown(request)
        if self._admission.is_duplicate(request):
            self.counters[(request.route.project, "duplicates")] += 1
            log.info("request.duplicate_dropped", request_id=request.request_id)
            return
        try:
            self._admission.admit(request)
        except WorkerError as err:
            self.counters[(request.route.project, "rejected")] += 1
            self._spawn(self._fail(request.route, err))
            return
        self.counters[(request.route.project, "requests")] += 1
        task = self._spawn(self._serve(request, stop))
        self._serving[task] = request

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        request = self._serving.pop(task, None)
        if request is not None:
            self._admission.release(request)

    def _warn_unknown(self, request: Request) -> None:
        new = [f for f in request.unknown_fields if f not in self._warned_fields]
        if new:
            self._warned_fields.update(new)
            log.warning("request.unknown_fields_ignored", fields=new)

    # ---- the request path ----------------------------------------------------------------------------
    async def _serve(self, request: Request, stop: asyncio.Event) -> None:
        """Request -> sessions -> engine -> reply; exactly one final reply whatever happens."""
        assert self._sessions is not None  # noqa: S101 - set before intake starts
        assert self._replier is not None  # noqa: S101
        log.debug(
            "request.accepted",
            project=request.route.project,
            request_id=request.request_id,
            text=request.message,
        )
        try:
            async with self._sessions.lock_for(request):
                prompt = await self._sessions.build_prompt(request)
                async with asyncio.timeout(_remaining_s(request)):
                    outcome = await self._generate(request, prompt)
                await self._sessions.record(request, outcome.text)
            await self._replier.answer(request, outcome)
            log.info(
                "request.done",
                project=request.route.project,
                request_id=request.request_id,
                ttft_ms=outcome.ttft_ms,
                total_ms=outcome.total_ms,
                tokens=outcome.completion_tokens,
            )
        except TimeoutError:
            await self._fail(request.route, ExpiredError(f"deadline of {request.deadline_ms} ms passed"))
        except WorkerError as err:
            await self._fail(request.route, err)
        except EngineDeadError:
            log.exception("engine.died")
            await self._fail(request.route, EngineError("the engine stopped"))
            self.exit_code = 1
            stop.set()
        except asyncio.CancelledError:
            await self._fail(request.route, ShuttingDownError())
            raise
        except Exception:
            log.exception("request.failed", request_id=request.request_id)
            await self._fail(request.route, EngineError())

    async def _generate(self, request: Request, prompt: Prompt) -> Outcome:
        parts: list[str] = []
        tokens = cached = 0
        finish = "stop"
        started = time.monotonic()
        first_token_at: float | None = None
        async for delta in self._engine.generate(prompt, request.sampling, request.request_id):
            if first_token_at is None and delta.new_tokens:
                first_token_at = time.monotonic()
            parts.append(delta.text)
            tokens += delta.new_tokens
            cached = max(cached, delta.cached_tokens)
            finish = delta.finish_reason or finish
        text = "".join(parts)
        text = protocol.strip_reasoning(text) if request.project.strip_reasoning else text.strip()
        now = time.monotonic()
        return Outcome(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=tokens,
            cached_tokens=cached,
            queue_ms=round((started - request.received_at) * 1000),
            ttft_ms=round(((first_token_at or now) - request.received_at) * 1000),
            total_ms=round((now - request.received_at) * 1000),
        )

    async def _fail(self, route: Route, error: WorkerError) -> None:
        assert self._replier is not None or self._bus is not None  # noqa: S101
        self.counters[(route.project, "errors")] += 1
        log.info(
            "request.failed_reply", project=route.project, code=str(error.code), request_id=route.request_id
        )
        replier = self._replier or Replier(self._publish_reply, self._engine.model_name, self.worker_id)
        await replier.fail(route, error)

    async def _publish_reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        assert self._bus is not None  # noqa: S101
        await self._bus.publish(topic, payload, qos=1, correlation_data=correlation)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _remaining_s(request: Request) -> float | None:
    if request.deadline_ms is None:
        return None
    return request.deadline_ms / 1000 - (time.monotonic() - request.received_at)
