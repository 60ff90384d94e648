"""`Service`: wires broker, bus, engine and the request pipeline, and owns the worker's lifecycle.

Order matters: the bus comes up first so `starting` is visible during the (long) engine load and
`offline` is the last thing published; inputs are subscribed only once the engine is ready. Each
accepted request runs as its own task, so AsyncLLM batches all of them continuously.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog

from worker import __version__, protocol
from worker.admission import Admission, Seen
from worker.broker import EmbeddedBroker
from worker.bus import Bus, Will
from worker.config import WorkerConfig
from worker.engine.base import Engine, Prompt
from worker.errors import (
    CancelledError,
    EngineDeadError,
    EngineError,
    ExpiredError,
    ShuttingDownError,
    WorkerError,
)
from worker.loops import Loops
from worker.message import InboundMessage
from worker.projects import Project
from worker.protocol import Cancel, Dialect, FinalReply, Rejected, Request, Route, Topics
from worker.replies import Outcome, Replier, Stream
from worker.reports import ProjectReport, State, StatusReport, TelemetryReport
from worker.sessions import SessionStore
from worker.telemetry import GpuProbe, collect_process, engine_report, process_tree_pids

log = structlog.get_logger(__name__)

Say = Callable[[str], None]
HEALTH_INTERVAL_S = 2.0


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
        self._projects = {name: p.capped(cfg.generation.max_tokens) for name, p in projects.items()}
        self._engine = engine
        self._say = say or (lambda _msg: None)
        self.worker_id = cfg.worker.id or default_worker_id(cfg.model.visible_devices)
        self._topics = Topics(cfg.worker.topic_prefix)
        self._status_topic = f"{cfg.worker.topic_prefix}vllm-worker/{self.worker_id}/status"
        self._telemetry_topic = f"{cfg.worker.topic_prefix}vllm-worker/{self.worker_id}/telemetry"
        self._gpus = GpuProbe()
        self._admission = Admission(cfg.worker, projects)
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving: dict[asyncio.Task[None], Request] = {}
        self._by_id: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._finals: dict[asyncio.Task[None], FinalReply] = {}
        self._cancel_reasons: dict[asyncio.Task[None], WorkerError] = {}
        self._unacked: dict[asyncio.Task[None], InboundMessage] = {}
        self._settled: set[asyncio.Task[None]] = set()
        self._grouped = False
        self._warned_fields: set[str] = set()
        self._started = time.monotonic()
        self.counters: Counter[tuple[str, str]] = Counter()
        self.exit_code = 0
        self.ready = asyncio.Event()
        self.broker_port: int | None = None
        self._bus: Bus | None = None
        self._sessions: SessionStore | None = None
        self._replier: Replier | None = None
        self._stop: asyncio.Event | None = None
        self._loops = Loops(self._loop_died)

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
            persistent = broker_cfg.url is not None and broker_cfg.session_expiry_s > 0
            bus = await stack.enter_async_context(
                Bus(
                    broker_cfg,
                    broker_cfg.client_id or self.worker_id,
                    will=will,
                    persistent=persistent,
                    receive_maximum=self._cfg.worker.receive_maximum or 2 * self._cfg.model.max_num_seqs,
                )
            )
            self._bus = bus
            # MQTT 5 + a share group: N workers split each project, and a request is acked only once its
            # final reply is out, so a crashed worker's requests are redelivered when it comes back.
            self._grouped = bus.is_v5 and bool(self._cfg.worker.share_group)
            if not self._grouped:
                reason = "share_group is empty" if bus.is_v5 else "the broker speaks MQTT 3.1.1 only (amqtt?)"
                log.info("bus.scale_out_off", reason=reason, delivery="acked on acceptance")
            await self._publish_status("starting")
            stack.push_async_callback(self._publish_status, "offline")
            self._say(f"engine starting: {self._cfg.model.path}")
            ticker = asyncio.create_task(self._tick_while_starting())  # supervised: cancelled just below
            try:
                engine = await stack.enter_async_context(self._engine)
            finally:
                ticker.cancel()
            self._sessions = SessionStore(self._cfg.sessions, engine)
            self._replier = self._make_replier(engine.model_name)
            await bus.subscribe(self._control_filters() + self._request_filters())
            await self._publish_status("ready")
            self.ready.set()
            self._say(f"ready: projects {', '.join(self._projects)} on {self._broker_label(broker_cfg.endpoint())}")
            self._stop = stop
            self._loops.start("intake", self._intake(bus, stop))
            self._loops.start("telemetry", self._telemetry_loop())
            self._loops.start("health", self._health_loop(stop))
            await stop.wait()
            await self._loops.stop("intake", "health")
            await self._drain(bus)
            await self._loops.stop()
        await asyncio.to_thread(self._gpus.close)
        return self.exit_code

    def _loop_died(self, name: str) -> None:
        """A background loop ended on its own: never stay "ready but deaf"; drain, go offline, exit 1."""
        self._say(f"internal error: the {name} loop stopped; exiting with status 1")
        self.exit_code = 1
        if self._stop is not None:
            self._stop.set()

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
        if self._grouped:
            return [f"$share/{self._cfg.worker.share_group}/{f}" for f in filters]
        return filters

    def _control_filters(self) -> list[str]:
        return [t for name in self._projects for t in (self._topics.cancel(name), self._topics.session_reset(name))]

    async def _drain(self, bus: Bus) -> None:
        """Stop intake, let in-flight requests finish within drain_timeout_s, answer the rest."""
        self._admission.draining = True
        await self._publish_status("draining")
        with contextlib.suppress(Exception):
            await bus.unsubscribe(self._request_filters())
        if self._tasks:
            self._say(f"draining {len(self._serving)} request(s), up to {self._cfg.worker.drain_timeout_s:.0f} s")
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

    async def _health_loop(self, stop: asyncio.Event) -> None:
        """Notice an engine that died while idle: fatal, exit non-zero so a supervisor restarts us."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self._engine.check_health()
            except EngineDeadError:
                self._engine_died(stop)
                return

    def _engine_died(self, stop: asyncio.Event) -> None:
        if self.exit_code == 0:
            log.error("engine.died", action="draining and exiting with status 1")
            self._say("engine died: exiting with status 1")
        self.exit_code = 1
        stop.set()

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
            try:
                task = self._take(msg, stop)
            except Exception:  # a bug of ours on this message must cost this message only
                self._count(self._project_of(msg.topic), "poison")
                log.exception("request.poison", topic=msg.topic[:128], size=len(msg.payload))
                task = None
            if task is not None and self._grouped:
                self._unacked[task] = msg  # acked in _done, once its final reply is out
            else:
                bus.ack(msg)  # accepted, answered or refused: never redelivered in a loop

    def _take(self, msg: InboundMessage, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """One inbound message: a request or a control command; returns the task serving a request."""
        if msg.retain:  # a stored message replayed on subscribe: it would be answered at every start
            self._count(self._project_of(msg.topic), "retained_ignored")
            log.warning("request.retained_ignored", topic=msg.topic[:128])
            return None
        control = self._topics.control_kind(msg.topic)
        if control is not None:
            self._control(msg, *control)
            return None
        return self._accept(msg, stop)

    def _project_of(self, topic: str) -> str:
        """The served project a topic belongs to, else "?" (counters are keyed by served projects only)."""
        head = topic.removeprefix(self._topics.prefix).split("/", 1)[0]
        return head if head in self._projects else "?"

    def _accept(self, msg: InboundMessage, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """Parse, dedupe and admit one request; never raises. Every outcome ends in one reply task.

        Returns the task serving an admitted request (whose ack waits for its final reply).
        """
        try:
            request = protocol.parse(msg, self._projects, self._topics, self._cfg.worker.max_payload_bytes)
        except Rejected as rejected:
            self._count(rejected.route.project if rejected.route else "?", "rejected")
            if rejected.internal:
                self._count(self._project_of(msg.topic), "internal_errors")
            if rejected.route is None:
                self._count("?", "unroutable")
                log.warning("request.unroutable", topic=msg.topic[:128], reason=rejected.error.message)
                return None
            self._spawn(self._fail(rejected.route, rejected.error))
            return None
        try:
            return self._admit(request, stop)
        except Exception:  # a bug of ours after parsing: answer this request, keep the intake
            self._count(request.route.project, "internal_errors")
            log.exception("request.admission_failed", request_id=request.request_id)
            self._spawn(self._fail(request.route, EngineError()))
            return None

    def _admit(self, request: Request, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """Dedupe and admit a parsed request; returns its serving task, or None once it is answered."""
        self._warn_unknown(request)
        seen, final = self._admission.seen(request)
        if seen is not Seen.NEW:
            log.info("request.duplicate", request_id=request.request_id, state=seen.value)
            if final is not None:  # answered again with the cached final reply
                self._count(request.route.project, "duplicates_resent")
                self._spawn(self._resend(final))
            else:  # still running: its one final reply is on the way
                self._count(request.route.project, "duplicates")
            return None
        try:
            self._admission.admit(request)
        except WorkerError as err:
            self._count(request.route.project, "rejected")
            self._spawn(self._fail(request.route, err))
            return None
        self._count(request.route.project, "requests")
        task = self._spawn(self._serve(request, stop))
        self._serving[task] = request
        self._by_id[request.dedupe_key] = task
        return task

    def _control(self, msg: InboundMessage, kind: str, project: str) -> None:  # always acked at once
        """Cancel or session reset; malformed ones are logged (there is no route to answer on)."""
        if project not in self._projects:
            return
        try:
            command = protocol.parse_control(msg, kind, project, self._topics)
        except WorkerError as err:
            self._count(project, "control_rejected")
            log.info("control.rejected", project=project, kind=kind, reason=err.message)
            return
        if isinstance(command, Cancel):
            self._cancel(command)
            return
        assert self._sessions is not None  # noqa: S101 - set before intake starts
        existed = self._sessions.reset(command.session_key)
        log.info("session.reset", project=project, session_id=command.session_id, existed=existed)
        if command.confirm is not None:
            body = protocol.v2_message(command.confirm, 1, reset=True)
            self._spawn(self._publish_reply(command.confirm.topic, body, command.confirm.correlation_data, wait=True))

    def _cancel(self, command: Cancel) -> None:
        """Only the request's own clientId reaches it: requestIds live in their client's namespace."""
        task = self._by_id.get(command.dedupe_key)
        if task is None or task not in self._serving:
            log.info("request.cancel_unknown", request_id=command.request_id)
            return
        self._cancel_reasons[task] = CancelledError()
        task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # a reply that could not go out
            self._count("?", "internal_errors")
            log.error("reply.failed", exc_info=exc)
        self._cancel_reasons.pop(task, None)
        msg = self._unacked.pop(task, None)
        settled = task in self._finals or task in self._settled
        self._settled.discard(task)
        if msg is not None and self._bus is not None and settled:
            self._bus.ack(msg)  # its final reply is out (a drained-away request stays unacked: redelivered)
        request = self._serving.pop(task, None)
        if request is not None:
            self._by_id.pop(request.dedupe_key, None)
            self._admission.release(request, self._finals.pop(task, None))

    def _count(self, project: str, what: str) -> None:
        self.counters[(project, what)] += 1

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
        task = asyncio.current_task()
        assert task is not None  # noqa: S101
        stream = self._replier.stream(request)
        log.debug(
            "request.accepted",
            project=request.route.project,
            request_id=request.request_id,
            text=request.message,
        )
        try:
            async with self._sessions.turn(request):
                prompt = await self._sessions.build_prompt(request)
                async with asyncio.timeout(_remaining_s(request)):
                    outcome = await self._generate(request, prompt, stream)
                await self._sessions.record(request, outcome.text)
            self._finals[task] = await stream.finish(outcome)
            log.info(
                "request.done",
                project=request.route.project,
                request_id=request.request_id,
                ttft_ms=outcome.ttft_ms,
                total_ms=outcome.total_ms,
                tokens=outcome.completion_tokens,
            )
        except TimeoutError:
            await self._fail_stream(task, stream, ExpiredError(f"deadline of {request.deadline_ms} ms passed"))
        except WorkerError as err:
            await self._fail_stream(task, stream, err)
        except EngineDeadError:
            self._engine_died(stop)
            await self._fail_stream(task, stream, EngineError("the engine stopped"))
        except asyncio.CancelledError:
            reason = self._cancel_reasons.get(task, ShuttingDownError())
            if isinstance(reason, CancelledError) and request.route.dialect is Dialect.CLASSIC:
                self._count(request.route.project, "cancelled")  # classic: nothing further (PROTOCOL 4)
                self._settled.add(task)  # ... but it is finished: ack it, never redeliver it
            elif isinstance(reason, ShuttingDownError) and self._grouped:
                self._count(request.route.project, "left_for_redelivery")  # unacked: back after a restart
            else:
                await self._fail_stream(task, stream, reason)
            if not isinstance(reason, CancelledError):
                raise
        except Exception:
            self._count(request.route.project, "internal_errors")  # a bug of ours: the battery asserts 0
            log.exception("request.failed", request_id=request.request_id)
            await self._fail_stream(task, stream, EngineError())

    async def _generate(self, request: Request, prompt: Prompt, stream: Stream) -> Outcome:
        parts: list[str] = []
        tokens = cached = 0
        finish = "stop"
        started = time.monotonic()
        first_token_at: float | None = None
        sampling = request.sampling
        if self._cfg.generation.ignore_eos:
            sampling = dataclasses.replace(sampling, ignore_eos=True)
        deltas = self._engine.generate(prompt, sampling, request.request_id, self._priority(request))
        async for delta in deltas:
            if first_token_at is None and delta.new_tokens:
                first_token_at = time.monotonic()
            parts.append(delta.text)
            tokens += delta.new_tokens
            cached = max(cached, delta.cached_tokens)
            finish = delta.finish_reason or finish
            await stream.feed(delta.text, delta.new_tokens)
        text = protocol.visible_text(request.project, "".join(parts))
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

    def _priority(self, request: Request) -> int:
        if self._cfg.model.scheduling_policy == "priority":
            return request.priority
        if request.priority and "priority" not in self._warned_fields:
            self._warned_fields.add("priority")
            log.warning("request.priority_ignored", reason="model.scheduling_policy is fcfs")
        return 0

    async def _fail_stream(self, task: asyncio.Task[None], stream: Stream, error: WorkerError) -> None:
        self._count(stream.route.project, "errors")
        log.info("request.failed_reply", project=stream.route.project, code=str(error.code))
        self._finals[task] = await stream.fail(error)

    async def _fail(self, route: Route, error: WorkerError) -> None:
        """Answer a request that was never admitted."""
        self._count(route.project, "errors")
        log.info("request.failed_reply", project=route.project, code=str(error.code), request_id=route.request_id)
        replier = self._replier or self._make_replier(self._engine.model_name)
        await replier.fail(route, error)

    async def _resend(self, final: FinalReply) -> None:
        await self._publish_reply(final.topic, final.payload, final.correlation_data, wait=True)

    def _make_replier(self, model: str) -> Replier:
        w = self._cfg.worker
        return Replier(self._publish_reply, model, self.worker_id, w.stream_interval_ms, w.stream_max_tokens)

    async def _publish_reply(self, topic: str, payload: bytes, correlation: bytes | None, *, wait: bool) -> None:
        """Publish a reply, but only inside a served project's reply namespace (what the worker's ACL grants).

        The parser already refuses other reply topics; this is the last line: a topic outside would get
        the worker disconnected by Mosquitto, or let a client speak with the worker's rights.
        """
        assert self._bus is not None  # noqa: S101
        if not self._is_reply_topic(topic):
            self._count("?", "blocked_replies")
            log.error("reply.blocked", topic=topic[:128], reason="outside the reply namespace")
            return
        await self._bus.publish(topic, payload, qos=1, correlation_data=correlation, wait=wait)

    def _is_reply_topic(self, topic: str) -> bool:
        return any(
            protocol.is_reply_topic(topic, self._topics.reply_prefix(name, dialect))
            for name in self._projects
            for dialect in Dialect
        )


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _remaining_s(request: Request) -> float | None:
    if request.deadline_ms is None:
        return None
    return request.deadline_ms / 1000 - (time.monotonic() - request.received_at)
