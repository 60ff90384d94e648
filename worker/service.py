"""`Service`: the worker's lifecycle: start, supervise, drain, stop. The request path is `serve.py`.

Order matters: the bus comes up first so `starting` is visible during the (long) engine load and
`offline` is the last thing published; inputs are subscribed only once the engine is ready, and `ready`
is published only once the broker granted those subscriptions. Intake, telemetry and health run as
supervised loops (`Loops`): if one ends, the worker drains, goes offline and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog

from worker import protocol
from worker.config import WorkerConfig, resolve_path
from worker.engine import adapters
from worker.engine.adapters import AdapterTable
from worker.engine.base import Engine
from worker.errors import PublishError, ShuttingDownError
from worker.fleet.reports import TelemetryReport
from worker.fleet.status import StatusReporter
from worker.loops import Loops
from worker.message import InboundMessage
from worker.projects import Project
from worker.protocol import Dialect, Topics
from worker.protocol.parse import ROUTING_PARSE_LIMIT_BYTES
from worker.serving.admission import Admission
from worker.serving.affinity import Affinity
from worker.serving.control import Control
from worker.serving.devices import DeviceTools
from worker.serving.intake import Intake
from worker.serving.jobs import JobTable
from worker.serving.pipeline import Pipeline
from worker.serving.replies import Replier
from worker.serving.sessions import SessionStore
from worker.serving.takeover import Takeover
from worker.state import State, open_state
from worker.transport.broker import EmbeddedBroker
from worker.transport.bus import Bus
from worker.transport.mqttclient import Will
from worker.transport.packets import PACKET_OVERHEAD_BYTES

MAX_PACKET_BYTES = ROUTING_PARSE_LIMIT_BYTES + PACKET_OVERHEAD_BYTES
"""Announced in CONNECT: an oversize request up to the routing-parse limit still reaches us and is
answered `too_large`; anything larger the broker discards rather than sends."""

log = structlog.get_logger(__name__)

Say = Callable[[str], None]


def default_worker_id(visible_devices: str | None) -> str:
    """`{hostname}-{first GPU index or cpu}-0`; set `worker.id` when several workers share a device."""
    from worker.engine.vllm_preflight import gpu_present  # noqa: PLC0415 - cheap, no vllm import

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
        # built once: every reply, stream chunks included, is checked against them
        self._reply_prefixes = tuple(self._topics.reply_prefix(name, d) for name in self._projects for d in Dialect)
        self.counters: Counter[tuple[str, str]] = Counter()
        self._status = StatusReporter(cfg, self.worker_id, list(self._projects), engine, self.counters)
        self._admission = Admission(cfg.worker, projects)
        self._loops = Loops(self._loop_died)
        self._grouped = False
        self._stop = asyncio.Event()
        self.exit_code = 0
        self.ready = asyncio.Event()
        self.broker_port: int | None = None
        self._bus: Bus | None = None
        self._sessions: SessionStore | None = None
        self._jobs: JobTable | None = None
        self._pipeline: Pipeline | None = None
        self._takeover: Takeover | None = None
        self._devices: DeviceTools | None = None
        self._affinity = Affinity(cfg.worker, self._topics, self.worker_id, engine, list(self._projects))
        self._adapters = self._status.adapters = AdapterTable()
        self._control_topic = f"{cfg.worker.topic_prefix}vllm-worker/{self.worker_id}/control"

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set (signal), a loop dies or the engine dies; returns the exit code."""
        self._stop = stop
        async with contextlib.AsyncExitStack() as stack:
            bus = await self._connect(stack)
            await self._status.publish_status("starting")
            stack.push_async_callback(self._status.publish_status, "offline")
            engine = await self._start_engine(stack)
            model_config = _model_config(self._cfg.model.path)  # read once: adapters are checked against it
            await self._load_adapters(engine, model_config)
            store = await stack.enter_async_context(open_state(self._cfg))
            intake = self._wire(bus, engine, store, model_config)
            devices = self._devices.filters() if self._devices is not None else []
            inputs = self._request_filters() + self._affinity.filters()
            await bus.subscribe(self._control_filters() + devices + inputs + self._peer_filters())
            self._status.engine_ready = True
            await self._status.publish_status("ready")
            await self._status.publish_discovery()
            self.ready.set()
            self._say(f"ready: projects {', '.join(self._projects)} on {_label(bus)}")
            self._loops.start("intake", self._intake(bus, intake))
            self._loops.start("telemetry", self._status.telemetry_loop())
            self._loops.start("health", self._status.health_loop(self._engine_died))
            self._loops.start("state", store.monitor())
            if self._takeover is not None:
                self._loops.start("takeover", self._takeover.run())
            await stop.wait()
            await self._loops.stop("intake", "health")
            await self._drain(bus)
            await self._loops.stop()
        await asyncio.to_thread(self._status.gpus.close)
        return self.exit_code

    async def _connect(self, stack: contextlib.AsyncExitStack) -> Bus:
        broker_cfg = self._cfg.broker
        if broker_cfg.url is None:
            broker = await stack.enter_async_context(EmbeddedBroker(broker_cfg))
            broker_cfg = broker_cfg.model_copy(update={"embedded_port": broker.port, "protocol": "3.1.1"})
            self.broker_port = broker.port
        bus = Bus(
            broker_cfg,
            broker_cfg.client_id or self.worker_id,
            will=Will(self._status.status_topic, self._status.status_payload("offline")),
            persistent=broker_cfg.url is not None and broker_cfg.session_expiry_s > 0,
            receive_maximum=self._cfg.worker.receive_maximum or 2 * self._cfg.model.max_num_seqs,
            max_packet_bytes=MAX_PACKET_BYTES,
        )
        self._bus = self._status.bus = await stack.enter_async_context(bus)
        # MQTT 5 + a share group: N workers split each project, and a request is acked only once its
        # final reply is out, so a crashed worker's requests are redelivered when it comes back.
        self._grouped = bus.is_v5 and bool(self._cfg.worker.share_group)
        if not self._grouped and broker_cfg.url is not None:  # the embedded broker is single-box by design
            reason = "share_group is empty" if bus.is_v5 else "the broker speaks MQTT 3.1.1 only (amqtt?)"
            log.info("bus.scale_out_off", reason=reason, delivery="acked on acceptance")
        return bus

    async def _start_engine(self, stack: contextlib.AsyncExitStack) -> Engine:
        self._say(f"engine starting: {self._cfg.model.path}")
        ticker = asyncio.create_task(self._tick_while_starting())  # supervised: cancelled just below
        try:
            return await stack.enter_async_context(self._engine)
        finally:
            ticker.cancel()

    def _wire(self, bus: Bus, engine: Engine, store: State, model_config: dict[str, Any]) -> Intake:
        """Build the request path once the engine is up."""
        w = self._cfg.worker
        self._status.store = store
        self._sessions = self._status.sessions = SessionStore(self._cfg.sessions, engine, store)
        self._affinity = Affinity(w, self._topics, self.worker_id, engine, list(self._projects))
        self._affinity.enable(store.backend)
        self._status.affinity = self._affinity.inviting if self._affinity.enabled else None
        replier = Replier(
            self._publish_reply,
            engine.model_name,
            self.worker_id,
            w.stream_interval_ms,
            w.stream_max_tokens,
            affinity=self._affinity.invite,
        )
        self._jobs = JobTable(bus.ack, self._admission.release, hold_acks=self._grouped)
        self._devices = DeviceTools(self._projects, self._topics, self.worker_id, self._publish_call, self.counters)
        self._pipeline = pipeline = Pipeline(
            engine=engine,
            adapters=self._adapters,
            state=store,
            sessions=self._sessions,
            budgets=self._admission.budgets,
            quotas=self._admission.quotas,
            replier=replier,
            counters=self.counters,
            on_engine_death=self._engine_died,
            ignore_eos=self._cfg.generation.ignore_eos,
            priority_scheduling=self._cfg.model.scheduling_policy == "priority",
            hold_for_redelivery=self._grouped,
            devices=self._devices,
        )
        self._takeover = self._make_takeover(store)
        return Intake(
            self._projects,
            self._topics,
            max_payload_bytes=w.max_payload_bytes,
            admission=self._admission,
            jobs=self._jobs,
            pipeline=pipeline,
            watch=self._watch,
            control_topic=self._control_topic,
            control=Control(
                engine,
                self._adapters,
                list(self._projects),
                adapters_dir=resolve_path(self._cfg.model.adapters_dir),
                model_config=model_config,
                max_lora_rank=self._cfg.model.max_lora_rank,
                lora_enabled=self._lora_enabled,
                publish=lambda body: bus.publish(f"{self._control_topic}/reply", body, qos=1),
                changed=lambda: self._status.publish_status("draining" if self._admission.draining else "ready"),
            ),
        )

    def _watch(self, msg: InboundMessage) -> bool:
        """Messages that are not requests: device tool results and announcements, peers' statuses."""
        if self._devices is not None and self._devices.take(msg):
            return True
        return self._takeover is not None and self._takeover.observe(msg)

    def _make_takeover(self, store: State) -> Takeover | None:
        """Takeover of dead peers' sessions: a share group on MQTT 5 with fleet state only (see `takeover`)."""
        w = self._cfg.worker
        if not (self._grouped and store.backend == "redis" and w.takeover_after_s > 0):
            return None
        assert self._bus is not None  # noqa: S101 - wired once the bus is up
        cfg = self._cfg.broker
        return Takeover(
            cfg.model_copy(update={"client_id": None}),
            self.worker_id,
            frozenset(self._projects),
            store,
            after_s=w.takeover_after_s,
            status_prefix=f"{w.topic_prefix}vllm-worker/",
            filters=self._peer_request_filters,
            intake=self._borrowed_intake,
            receive_maximum=w.receive_maximum or 2 * self._cfg.model.max_num_seqs,
        )

    def _borrowed_intake(self, ack: Callable[[InboundMessage], None]) -> tuple[Intake, JobTable]:
        """The request path again, for the messages of a taken-over session (acked on that session)."""
        assert self._pipeline is not None  # noqa: S101 - wired before the takeover loop starts
        jobs = JobTable(ack, self._admission.release, hold_acks=True)
        intake = Intake(
            self._projects,
            self._topics,
            max_payload_bytes=self._cfg.worker.max_payload_bytes,
            admission=self._admission,
            jobs=jobs,
            pipeline=self._pipeline,
            watch=self._takeover.observe if self._takeover is not None else None,
        )
        return intake, jobs

    def _peer_filters(self) -> list[str]:
        """Peers' statuses, for the takeover (when it is on)."""
        return [f"{self._cfg.worker.topic_prefix}vllm-worker/+/status"] if self._takeover is not None else []

    def _peer_request_filters(self, peer: str, projects: frozenset[str]) -> list[str]:
        """What a peer's session subscribed: its shared request filters, control topics, peers' statuses."""
        t, group = self._topics, f"$share/{self._cfg.worker.share_group}/"
        shared = [group + f for p in sorted(projects) for f in (t.user_input(p), t.user_input_sessions(p))]
        own = [f"{t.prefix}vllm-worker/{peer}/control", *self._peer_filters(), *self._affinity.filters(peer)]
        return shared + [f for p in sorted(projects) for f in (t.cancel(p), t.session_reset(p))] + own

    async def _intake(self, bus: Bus, intake: Intake) -> None:
        while True:
            intake.take(await bus.messages())

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
        filters = [t for name in self._projects for t in (self._topics.cancel(name), self._topics.session_reset(name))]
        return [*filters, self._control_topic]

    async def _load_adapters(self, engine: Engine, model_config: dict[str, Any]) -> None:
        """Each project's configured LoRA adapter, checked and loaded before any request arrives."""
        for name, project in self._projects.items():
            if project.adapter is None:
                continue
            path = resolve_path(project.adapter)
            rank = adapters.check(path, model_config, max_lora_rank=self._cfg.model.max_lora_rank)
            adapter = self._adapters.new(path.name, path, rank)
            await engine.load_adapter(adapter)
            self._adapters.replace(name, adapter)
            self._say(f"adapter {adapter.name} serves project {name}")

    async def _drain(self, bus: Bus) -> None:
        """Stop intake, let in-flight requests finish within drain_timeout_s, answer the rest."""
        self._admission.draining = True
        await self._status.publish_status("draining")
        with contextlib.suppress(Exception):
            await bus.unsubscribe(self._request_filters() + self._affinity.filters())
        if self._jobs is not None and len(self._jobs):
            self._say(f"draining {len(self._jobs)} request(s), up to {self._cfg.worker.drain_timeout_s:.0f} s")
        if self._jobs is not None:
            await self._jobs.drain(self._cfg.worker.drain_timeout_s, lambda job: job.cancel(ShuttingDownError()))
        log.info("service.drained", requests=sum(v for (_, k), v in self.counters.items() if k == "requests"))

    def _loop_died(self, name: str) -> None:
        """A background loop ended on its own: never stay "ready but deaf"; drain, go offline, exit 1."""
        self._say(f"internal error: the {name} loop stopped; exiting with status 1")
        self.exit_code = 1
        self._stop.set()

    def _engine_died(self) -> None:
        """Fatal: every in-flight request is answered `engine_error`, then exit non-zero for a restart."""
        if self.exit_code == 0:
            log.error("engine.died", action="draining and exiting with status 1")
            self._say("engine died: exiting with status 1")
        self.exit_code = 1
        self._stop.set()

    @property
    def _lora_enabled(self) -> bool:
        """Whether the engine serves adapters: `model.enable_lora`, else when a project names one (as `cli`)."""
        enabled = self._cfg.model.enable_lora
        return enabled if enabled is not None else any(p.adapter for p in self._projects.values())

    @property
    def projects(self) -> list[str]:
        """The projects this worker serves."""
        return list(self._projects)

    async def telemetry(self) -> TelemetryReport:
        """One telemetry snapshot (what the telemetry loop publishes)."""
        return await self._status.telemetry()

    async def _publish_reply(self, topic: str, payload: bytes, correlation: bytes | None, *, wait: bool) -> None:
        """Publish a reply, but only inside a served project's reply namespace (what the worker's ACL grants).

        The parser already refuses other reply topics; this is the last line: a topic outside would get
        the worker disconnected, or let a client speak with the worker's rights.
        """
        assert self._bus is not None  # noqa: S101 - replies exist only once the bus is up
        if not self._is_reply_topic(topic):
            self.counters[("?", "blocked_replies")] += 1
            log.error("reply.blocked", topic=ascii(topic[:128]), reason="outside the reply namespace")
            raise PublishError("the reply topic is outside the reply namespace")
        await self._bus.publish(topic, payload, qos=1, correlation_data=correlation, wait=wait)

    async def _publish_call(self, topic: str, payload: bytes, correlation: bytes, reply_to: str) -> None:
        """Publish a device tool call, only on a served project's tool topics (what the worker's ACL grants)."""
        assert self._bus is not None  # noqa: S101 - calls exist only once the bus is up
        if not any(self._topics.is_tool_topic(name, topic) for name in self._projects):
            log.error("tools.call_blocked", topic=ascii(topic[:128]), reason="outside the projects' tool topics")
            raise PublishError("the tool topic is outside the projects' tool topics")
        await self._bus.publish(topic, payload, qos=1, correlation_data=correlation, response_topic=reply_to)

    def _is_reply_topic(self, topic: str) -> bool:
        return protocol.is_reply_topic(topic, *self._reply_prefixes)


def _model_config(model_path: str) -> dict[str, Any]:
    """The served model's config.json ({} when there is none, e.g. the fake engine's)."""
    try:
        data = json.loads((resolve_path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _label(bus: Bus) -> str:
    host, port, tls = bus.endpoint
    return f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
