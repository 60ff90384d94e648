"""`Intake`: every inbound message ends here, and `take` never raises.

A message becomes one of: a job (parsed, not running here already, admitted: `serve` runs it and
settles dedupe fleet-wide), a typed refusal on a safe route, a cancel or session reset, or a counted,
logged drop (a copy of a request running here; no safe route; a retained replay; a poison message that
made our own code raise). Then the job table applies the ack policy to it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import structlog

from worker import protocol
from worker.errors import EngineError, PublishError, RequestCancelledError, StateUnavailableError, WorkerError
from worker.message import InboundMessage
from worker.projects import Project
from worker.protocol import Cancel, Dialect, FinalReply, Rejected, Request, Reset, Route, Topics
from worker.serving.admission import Admission
from worker.serving.control import Control
from worker.serving.jobs import Job, JobTable
from worker.serving.pipeline import Pipeline
from worker.serving.replies import Replier
from worker.serving.serve import serve
from worker.serving.sessions import SessionStore
from worker.state import Claim

log = structlog.get_logger(__name__)
MAX_WARNED_FIELDS = 256
"""Unknown field names remembered (to log each once): a flood of made-up names cannot grow memory."""


class Intake:
    """See the module docstring."""

    def __init__(
        self,
        projects: dict[str, Project],
        topics: Topics,
        *,
        max_payload_bytes: int,
        admission: Admission,
        jobs: JobTable,
        pipeline: Pipeline,
        control_topic: str | None = None,
        control: Control | None = None,
        watch: Callable[[InboundMessage], bool] | None = None,
    ) -> None:
        self._projects = projects
        self._topics = topics
        self._max_payload_bytes = max_payload_bytes
        self._admission = admission
        self._jobs = jobs
        self._pipeline = pipeline
        self._control_topic = control_topic
        self._worker_control = control
        self._watch = watch
        """Sees every message first (peers' statuses for the takeover); True: it was one, consumed."""
        self._counters: Counter[tuple[str, str]] = pipeline.counters
        self._warned: set[str] = set()

    @property
    def _sessions(self) -> SessionStore:
        return self._pipeline.sessions

    @property
    def _replier(self) -> Replier:
        return self._pipeline.replier

    def take(self, msg: InboundMessage) -> None:
        """Handle one inbound message; never raises (a bug of ours costs this message only)."""
        try:
            watched = self._watch is not None and self._watch(msg)  # a peer's status (retained by design)
            job = None if watched else self._take(msg)
        except Exception:
            self._count(self._project_of(msg.topic), "poison")
            log.exception("request.poison", topic=msg.topic[:128], size=len(msg.payload))
            job = None
        self._jobs.took(msg, job)

    def _take(self, msg: InboundMessage) -> Job | None:
        if msg.retain:  # a stored message replayed on subscribe: it would be answered at every start
            self._count(self._project_of(msg.topic), "retained_ignored")
            log.warning("request.retained_ignored", topic=msg.topic[:128])
            return None
        if msg.topic == self._control_topic and self._worker_control is not None:  # adapters: load, unload
            self._jobs.reply(self._worker_control.handle(msg.payload))
            return None
        control = self._topics.control_kind(msg.topic)
        if control is not None:
            self._control(msg, *control)
            return None
        try:
            request = protocol.parse(msg, self._projects, self._topics, self._max_payload_bytes)
        except Rejected as rejected:
            self._refused(msg, rejected)
            return None
        try:
            job = self._admit(request)
        except Exception:  # a bug of ours after parsing: answer this request, keep the intake
            self._count(request.route.project, "internal_errors")
            log.exception("request.admission_failed", request_id=request.request_id)
            self._fail(request.route, EngineError())
            return None
        if job is not None and self._topics.is_direct(msg.topic) and request.route.dialect is Dialect.V2:
            self._jobs.reply(self._accepted(request))  # the client now knows this worker took it
        return job

    async def _accepted(self, request: Request) -> None:
        """A request sent to this worker's own topic (affinity) is acknowledged at once: `seq` 0."""
        route = request.route
        body = protocol.v2_message(route, 0, done=False, event="accepted", worker=self._replier.worker)
        with contextlib.suppress(PublishError):
            await self._replier.publish(route.topic, body, route.correlation_data, wait=False)

    def _refused(self, msg: InboundMessage, rejected: Rejected) -> None:
        self._count(rejected.route.project if rejected.route else "?", "rejected")
        if rejected.internal:
            self._count(self._project_of(msg.topic), "internal_errors")
        if rejected.route is None:  # no safe reply topic exists: counted and logged, not answered
            self._count("?", "unroutable")
            log.warning("request.unroutable", topic=msg.topic[:128], reason=rejected.error.message)
            return
        self._fail(rejected.route, rejected.error)

    def _admit(self, request: Request) -> Job | None:
        """Admit a parsed request; returns its job, or None once it is answered."""
        self._warn_once(request)
        if self._jobs.get(request.dedupe_key) is not None:  # running here: its one final reply is on the way
            log.info("request.duplicate", request_id=request.request_id, state="in_flight")
            self._count(request.route.project, "duplicates")
            return None
        try:
            self._admission.admit(request)
        except WorkerError as err:
            self._count(request.route.project, "rejected")
            self._fail(request.route, err)
            return None
        self._count(request.route.project, "requests")
        job = Job(request)
        return self._jobs.start(job, serve(job, self._pipeline))

    def _control(self, msg: InboundMessage, kind: str, project: str) -> None:
        """Cancel or session reset; malformed ones are counted and logged (there is no route to answer on)."""
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
        self._jobs.reply(self._reset(command))

    async def _reset(self, command: Reset) -> None:
        """Reset in the session's turn order (after the turn running now); confirm when asked to.

        A reset with a requestId is applied once fleet-wide (every worker receives resets): the copy that
        claims it applies and confirms it; any other copy, or a late one, does nothing.
        """
        state, key = self._pipeline.state, command.dedupe_key
        if key is not None and (await state.claim(key)).verdict is not Claim.NEW:
            self._count(command.project, "duplicate_resets")
            log.info("session.reset_duplicate", project=command.project, session_id=command.session_id)
            return
        try:
            existed = await self._sessions.reset(command.session_key)
        except StateUnavailableError as err:
            if key is not None:
                await state.abandon(key)  # a retry of the reset may run
            self._count(command.project, "control_failed")
            log.warning("session.reset_failed", project=command.project, reason=err.message)
            if command.confirm is not None:
                await self._replier.fail(command.confirm, err)
            return
        log.info("session.reset", project=command.project, session_id=command.session_id, existed=existed)
        body = b""
        if command.confirm is not None:
            route = command.confirm
            body = protocol.v2_message(route, 1, reset=True)
            await self._replier.publish(route.topic, body, route.correlation_data, wait=True)
        if key is not None:
            await state.complete(key, FinalReply(command.confirm.topic if command.confirm else "", body, None))

    def _cancel(self, command: Cancel) -> None:
        """Only the request's own clientId reaches it: requestIds live in their client's namespace."""
        job = self._jobs.get(command.dedupe_key)
        if job is None:
            log.info("request.cancel_unknown", request_id=command.request_id)
            return
        job.cancel(RequestCancelledError())

    def _fail(self, route: Route, error: WorkerError) -> None:
        """Answer a request that was never admitted."""
        self._count(route.project, "errors")
        log.info("request.failed_reply", project=route.project, code=str(error.code), request_id=route.request_id)
        self._jobs.reply(self._send_error(route, error))

    async def _send_error(self, route: Route, error: WorkerError) -> None:
        await self._replier.fail(route, error)

    def _warn_once(self, request: Request) -> None:
        """Unknown fields (forward compatibility) and an ignored priority are logged once per worker."""
        new = [f for f in request.unknown_fields if f not in self._warned]
        if new and len(self._warned) < MAX_WARNED_FIELDS:  # names are the sender's: bounded in number and length
            self._warned.update(new[: MAX_WARNED_FIELDS - len(self._warned)])
            log.warning("request.unknown_fields_ignored", fields=[f[:64] for f in new[:16]])
        if request.priority and not self._pipeline.priority_scheduling and "priority" not in self._warned:
            self._warned.add("priority")
            log.warning("request.priority_ignored", reason="model.scheduling_policy is fcfs")

    def _project_of(self, topic: str) -> str:
        """The served project a topic belongs to, else "?" (counters are keyed by served projects only)."""
        head = topic.removeprefix(self._topics.prefix).split("/", 1)[0]
        return head if head in self._projects else "?"

    def _count(self, project: str, what: str) -> None:
        self._counters[(project, what)] += 1
