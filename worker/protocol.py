"""The wire protocol (PROTOCOL.md sections 1-3): topic names, request parsing, reply encoding.

`parse` turns an `InboundMessage` into a validated `Request`, or raises `Rejected` carrying the typed
error and, when one can be derived safely, the `Route` to answer on. Ids are validated before they
are spliced into any topic name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from worker.engine.base import ChatMessage, Sampling
from worker.errors import (
    BadRequestError,
    TooLargeError,
    UnknownProjectError,
    WorkerError,
)
from worker.message import InboundMessage
from worker.payload import decode
from worker.projects import Project
from worker.schemas import check_schema

log = structlog.get_logger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
DEFAULT_SESSION = "default"
MAX_TOPIC_CHARS = 512
ROUTING_PARSE_LIMIT_BYTES = 1024 * 1024
"""Payloads over max size are still parsed (to find a v2 reply route) up to this size."""
MAX_CHAT_MESSAGES = 256
"""Entries of a stateless `messages` list."""
MAX_STOP_CHARS = 256
"""Length of one stop sequence."""
KNOWN_FIELDS = frozenset(
    {
        "message",
        "messages",
        "sessionId",
        "clientId",
        "requestId",
        "systemPrompt",
        "temperature",
        "topP",
        "topK",
        "maxTokens",
        "stop",
        "seed",
        "jsonSchema",
        "stream",
        "replyTopic",
        "deadlineMs",
        "v",
        "priority",
    }
)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


class Dialect(StrEnum):
    """Reply dialect: classic plain text (old clients) or v2 JSON."""

    CLASSIC = "classic"
    V2 = "v2"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one prefix (PROTOCOL section 1-3)."""

    prefix: str = ""

    def user_input(self, project: str) -> str:
        """Request topic."""
        return f"{self.prefix}{project}/user_input"

    def user_input_sessions(self, project: str) -> str:
        """Request topic variant with the session in the topic (subscription filter)."""
        return f"{self.prefix}{project}/user_input/+"

    def classic_reply(self, project: str, session_id: str) -> str:
        """Classic reply topic."""
        return f"{self.prefix}{project}/assistant_response/{session_id}"

    def v2_reply(self, project: str, who: str) -> str:
        """v2 reply topic (clientId, else sessionId)."""
        return f"{self.prefix}{project}/response/{who}"

    def cancel(self, project: str) -> str:
        """Cancellation topic."""
        return f"{self.prefix}{project}/cancel"

    def session_reset(self, project: str) -> str:
        """Session-reset topic."""
        return f"{self.prefix}{project}/session/reset"

    def control_kind(self, topic: str) -> tuple[str, str] | None:
        """("cancel" | "reset", project) for a control topic, else None."""
        if not topic.startswith(self.prefix):
            return None
        parts = topic[len(self.prefix) :].split("/")
        if len(parts) == 2 and parts[1] == "cancel":  # noqa: PLR2004 - {project}/cancel
            return "cancel", parts[0]
        if parts[1:] == ["session", "reset"]:
            return "reset", parts[0]
        return None

    def reply_prefix(self, project: str, dialect: Dialect) -> str:
        """Where a payload `replyTopic` must live for its dialect."""
        kind = "assistant_response" if dialect is Dialect.CLASSIC else "response"
        return f"{self.prefix}{project}/{kind}/"

    def split_request(self, topic: str) -> tuple[str, str | None] | None:
        """(project, session-in-topic) of a request topic, or None when it is not one."""
        if not topic.startswith(self.prefix):
            return None
        parts = topic[len(self.prefix) :].split("/")
        if len(parts) == 2 and parts[1] == "user_input":  # noqa: PLR2004 - {project}/user_input
            return parts[0], None
        if len(parts) == 3 and parts[1] == "user_input":  # noqa: PLR2004 - {project}/user_input/{session}
            return parts[0], parts[2]
        return None


@dataclass(frozen=True, slots=True)
class Route:
    """Where and how to answer one request."""

    project: str
    dialect: Dialect
    topic: str
    session_id: str
    client_id: str | None = None
    request_id: str | None = None
    correlation_data: bytes | None = None

    @property
    def owner(self) -> str:
        """Whose namespace the request's session and requestId live in: its v2 clientId, else "" (classic).

        A v2 clientId names the reply topic that, in the shipped deploy, only that account may read;
        classic clients have no identity and share one namespace per project (README, Security).
        """
        return self.client_id or "" if self.dialect is Dialect.V2 else ""


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request, ready for admission."""

    route: Route
    project: Project
    request_id: str
    client_supplied_id: bool
    message: str | None
    messages: tuple[ChatMessage, ...] | None
    system_prompt: str | None
    sampling: Sampling
    stream: bool
    deadline_ms: int | None
    priority: int
    received_at: float
    unknown_fields: tuple[str, ...] = ()

    @property
    def session_key(self) -> tuple[str, str, str]:
        """(project, owner, sessionId): the history key; see `Route.owner`."""
        return self.route.project, self.route.owner, self.route.session_id

    @property
    def dedupe_key(self) -> tuple[str, str, str]:
        """(project, owner, requestId): one client cannot claim, resend or cancel another's requestId."""
        return self.route.project, self.route.owner, self.request_id


@dataclass(frozen=True, slots=True)
class FinalReply:
    """What was published as a request's final reply, kept to answer QoS1 redeliveries."""

    topic: str
    payload: bytes
    correlation_data: bytes | None


class Rejected(Exception):  # noqa: N818 - it is an outcome, not an error of ours
    """A request refused at parse time; `route` is None when no safe reply topic exists."""

    def __init__(self, error: WorkerError, route: Route | None, *, internal: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.route = route
        self.internal = internal
        """True when a bug of ours, not the payload's own fault, refused it (counted apart)."""


def is_valid_id(value: object) -> bool:
    """PROTOCOL id: 1-128 chars of [A-Za-z0-9_.:-]."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def is_safe_topic(topic: object) -> bool:
    """A publishable, non-system topic: no wildcards, no NUL, not `$...`, bounded length."""
    return (
        isinstance(topic, str)
        and 0 < len(topic) <= MAX_TOPIC_CHARS
        and not topic.startswith("$")
        and not any(c in topic for c in "+#\x00")
    )


def is_reply_topic(topic: object, prefix: str) -> bool:
    """A safe topic strictly under `prefix` (a project's reply namespace: what the worker's ACL grants)."""
    return is_safe_topic(topic) and str(topic).startswith(prefix) and len(str(topic)) > len(prefix)


def strip_reasoning(text: str) -> str:
    """Remove `<think>...</think>` blocks (and a reasoning prefix whose opening tag was in the template)."""
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:  # reasoning cut off by max_tokens: nothing after it is an answer
        text = text.split("<think>", 1)[0]
    return text.strip()


def visible_text(project: Project, raw: str) -> str:
    """What the client sees of the raw generated text: reasoning stripped if the project says so, trimmed."""
    return strip_reasoning(raw) if project.strip_reasoning else raw.strip()


class _Parser:
    """One parse; holds the partially known route so every error can be answered when possible."""

    def __init__(self, msg: InboundMessage, projects: dict[str, Project], topics: Topics, max_bytes: int) -> None:
        self.msg = msg
        self.projects = projects
        self.topics = topics
        self.max_bytes = max_bytes
        self.route: Route | None = None

    def fail(self, error: WorkerError) -> Rejected:
        return Rejected(error, self.route)

    def run(self) -> Request:
        split = self.topics.split_request(self.msg.topic)
        if split is None:
            raise self.fail(BadRequestError(f"not a request topic: {self.msg.topic[:80]!r}"))
        project_name, topic_session = split
        if topic_session is not None and not is_valid_id(topic_session):
            raise self.fail(BadRequestError("sessionId in the topic is not a valid id"))
        session = topic_session or DEFAULT_SESSION
        if is_valid_id(project_name):
            self.route = Route(project_name, Dialect.CLASSIC, self.topics.classic_reply(project_name, session), session)
        project = self.projects.get(project_name)
        if project is None:
            raise self.fail(UnknownProjectError(f"this worker does not serve {project_name[:64]!r}"))
        size = len(self.msg.payload)
        if size > ROUTING_PARSE_LIMIT_BYTES:
            raise self.fail(TooLargeError(f"payload is {size} bytes, limit {self.max_bytes}"))
        decoded = decode(self.msg.payload)
        if decoded is None:
            raise self.fail(BadRequestError("payload is not valid UTF-8"))
        # classic clients send the message as plain text (also text that merely starts with "{")
        body = decoded.body if decoded.body is not None else {"message": decoded.text}
        version_error = self._route_from(body, project_name, topic_session)
        if size > self.max_bytes:
            raise self.fail(TooLargeError(f"payload is {size} bytes, limit {self.max_bytes}"))
        if version_error is not None:
            raise self.fail(version_error)
        if decoded.violation is not None:
            raise self.fail(BadRequestError(decoded.violation))
        return self._request(body, project)

    def _route_from(self, body: dict[str, Any], project: str, topic_session: str | None) -> BadRequestError | None:
        """Work out the reply route from the body, validating every id spliced into a topic first.

        Returns the error of an unusable `v` (raised by the caller once the route is known, so it is
        answered to the sender's own session or client, not to the default session).
        """
        session = body.get("sessionId", topic_session or DEFAULT_SESSION)
        if not is_valid_id(session):
            self.route = None  # never splice an invalid id into a topic
            raise self.fail(BadRequestError("sessionId must be 1-128 chars of [A-Za-z0-9_.:-]"))
        if topic_session is not None and session != topic_session:
            raise self.fail(BadRequestError("sessionId in the payload differs from the one in the topic"))
        version = body.get("v")
        version_ok = version is None or (type(version) is int and version in (1, 2))
        v5_topic = self.msg.response_topic
        # a `v` we cannot use still says "versioned client": its error goes out as v2
        v2 = version == 2 or v5_topic is not None or not version_ok  # noqa: PLR2004
        client_id = body.get("clientId")
        client_ok = client_id is None or is_valid_id(client_id)
        dialect = Dialect.V2 if v2 else Dialect.CLASSIC
        who = client_id if client_ok and client_id is not None else session
        topic = self.topics.v2_reply(project, who) if v2 else self.topics.classic_reply(project, session)
        request_id = body.get("requestId")
        request_ok = request_id is None or is_valid_id(request_id)
        self.route = Route(
            project,
            dialect,
            topic,
            session,
            client_id if client_ok else None,
            request_id if request_ok else None,
            self.msg.correlation_data,
        )
        if not client_ok:
            raise self.fail(BadRequestError("clientId must be 1-128 chars of [A-Za-z0-9_.:-]"))
        if not request_ok:
            raise self.fail(BadRequestError("requestId must be 1-128 chars of [A-Za-z0-9_.:-]"))
        self._custom_topic(body.get("replyTopic"), project, v5_topic)
        return None if version_ok else BadRequestError("v must be 1 or 2")

    def _custom_topic(self, reply_topic: object, project: str, v5_topic: str | None) -> None:
        """A client-chosen reply topic: only under the request's own reply prefix (the worker's ACL)."""
        assert self.route is not None  # noqa: S101 - set by _route_from
        if v5_topic is not None:
            prefix = self.topics.reply_prefix(project, Dialect.V2)
            if not is_reply_topic(v5_topic, prefix):
                raise self.fail(BadRequestError(f"Response Topic must be a plain topic under {prefix}"))
            self.route = dataclasses.replace(self.route, topic=v5_topic)
        if reply_topic is None:
            return
        prefix = self.topics.reply_prefix(project, self.route.dialect)
        if not is_reply_topic(reply_topic, prefix):
            raise self.fail(BadRequestError(f"replyTopic must be a plain topic under {prefix} without + or #"))
        if v5_topic is None:
            self.route = dataclasses.replace(self.route, topic=str(reply_topic))

    def _request(self, body: dict[str, Any], project: Project) -> Request:
        assert self.route is not None  # noqa: S101 - set by _route_from
        message, messages = self._text(body, project)
        system_prompt = _opt_str(body, "systemPrompt", self)
        if system_prompt is not None and len(system_prompt) > project.limits.max_message_chars:
            raise self.fail(TooLargeError("systemPrompt is too long"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise self.fail(BadRequestError("stream must be true or false"))
        deadline_ms = _opt_int(body, "deadlineMs", self, minimum=1)
        if self.msg.expiry_s is not None:
            expiry_ms = self.msg.expiry_s * 1000
            deadline_ms = expiry_ms if deadline_ms is None else min(deadline_ms, expiry_ms)
        priority = _opt_int(body, "priority", self) or 0
        request_id = self.route.request_id
        return Request(
            route=self.route,
            project=project,
            request_id=request_id or f"auto-{uuid.uuid4().hex}",
            client_supplied_id=request_id is not None,
            message=message,
            messages=messages,
            system_prompt=system_prompt,
            sampling=self._sampling(body, project),
            stream=stream and self.route.dialect is Dialect.V2,
            deadline_ms=deadline_ms,
            priority=priority,
            received_at=time.monotonic(),
            unknown_fields=tuple(sorted(k for k in body if k not in KNOWN_FIELDS)),
        )

    def _text(self, body: dict[str, Any], project: Project) -> tuple[str | None, tuple[ChatMessage, ...] | None]:
        limit = project.limits.max_message_chars
        if "messages" in body:
            if "message" in body:
                raise self.fail(BadRequestError("send either message or messages, not both"))
            return None, self._messages(body["messages"], limit)
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            raise self.fail(BadRequestError("message must be a non-empty string"))
        if len(message) > limit:
            raise self.fail(TooLargeError(f"message is {len(message)} characters, limit {limit}"))
        return message, None

    def _messages(self, raw: object, limit: int) -> tuple[ChatMessage, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.fail(BadRequestError("messages must be a non-empty list of {role, content}"))
        if len(raw) > MAX_CHAT_MESSAGES:
            raise self.fail(TooLargeError(f"messages has {len(raw)} entries, limit {MAX_CHAT_MESSAGES}"))
        out: list[ChatMessage] = []
        total = 0
        for item in raw:
            if not isinstance(item, dict):
                raise self.fail(BadRequestError("each message must be an object {role, content}"))
            role, content = item.get("role"), item.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise self.fail(BadRequestError("role must be system, user or assistant; content a string"))
            total += len(content)
            out.append(ChatMessage(role, content))
        if total > limit:
            raise self.fail(TooLargeError(f"messages hold {total} characters, limit {limit}"))
        if out[-1].role != "user":
            raise self.fail(BadRequestError("the last message must have role user"))
        return tuple(out)

    def _sampling(self, body: dict[str, Any], project: Project) -> Sampling:
        d, lim = project.defaults, project.limits
        temperature = _opt_float(body, "temperature", self, minimum=0.0)
        top_p = _opt_float(body, "topP", self, minimum=0.0)
        if top_p is not None and not 0 < top_p <= 1:
            raise self.fail(BadRequestError("topP must be in (0, 1]"))
        top_k = _opt_int(body, "topK", self, minimum=-1)
        max_tokens = _opt_int(body, "maxTokens", self, minimum=1)
        seed = _opt_int(body, "seed", self)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list)
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
            or len(stop) > lim.max_stop_sequences
        ):
            raise self.fail(
                BadRequestError(
                    f"stop must be a string or a list of at most {lim.max_stop_sequences}, "
                    f"each 1-{MAX_STOP_CHARS} characters"
                )
            )
        return Sampling(
            json_schema=self._json_schema(body.get("jsonSchema")),
            # `is None`, never `or`: temperature 0 (greedy) must stay 0 (the old script's bug).
            temperature=min(d.temperature if temperature is None else temperature, lim.max_temperature),
            top_p=d.top_p if top_p is None else top_p,
            top_k=d.top_k if top_k in (None, 0) else top_k,
            max_tokens=min(d.max_tokens if max_tokens is None else max_tokens, lim.max_tokens),
            stop=tuple(stop or ()),
            seed=seed,
        )

    def _json_schema(self, schema: object) -> str | None:
        if schema is None:
            return None
        canonical, problem = check_schema(schema)
        if problem is not None:
            raise self.fail(BadRequestError(problem))
        return canonical


def _opt_str(body: dict[str, Any], key: str, p: _Parser) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise p.fail(BadRequestError(f"{key} must be a string"))
    return value


def _opt_int(body: dict[str, Any], key: str, p: _Parser, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**63 - 1:
        raise p.fail(BadRequestError(f"{key} must be an integer"))
    if minimum is not None and value < minimum:
        raise p.fail(BadRequestError(f"{key} must be >= {minimum}"))
    return value


def _opt_float(body: dict[str, Any], key: str, p: _Parser, minimum: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise p.fail(BadRequestError(f"{key} must be a number >= {minimum}"))
    return float(value)


def parse(msg: InboundMessage, projects: dict[str, Project], topics: Topics, max_payload_bytes: int) -> Request:
    """Validate one inbound message into a `Request`; raises `Rejected` (never anything else).

    A bug of ours on some input costs that one request (answered `bad_request` where a route is
    known, logged with its traceback), never the intake.
    """
    parser = _Parser(msg, projects, topics, max_payload_bytes)
    try:
        return parser.run()
    except Rejected:
        raise
    except Exception as exc:
        log.exception("request.parse_failed", topic=msg.topic[:128], size=len(msg.payload))
        raise Rejected(BadRequestError("the payload could not be parsed"), parser.route, internal=True) from exc


@dataclass(frozen=True, slots=True)
class Cancel:
    """`{project}/cancel`: abort `request_id` (only its sender's clientId may, when it gave one)."""

    project: str
    request_id: str
    client_id: str | None

    @property
    def dedupe_key(self) -> tuple[str, str, str]:
        """The in-flight request it names (see `Request.dedupe_key`)."""
        return self.project, self.client_id or "", self.request_id


@dataclass(frozen=True, slots=True)
class Reset:
    """`{project}/session/reset`: forget a session; `confirm` is the v2 route to confirm on, if any.

    With a `client_id` it resets that v2 client's session of this name, else the classic one.
    """

    project: str
    session_id: str
    client_id: str | None
    confirm: Route | None

    @property
    def session_key(self) -> tuple[str, str, str]:
        """The history key it resets (see `Request.session_key`)."""
        return self.project, self.client_id or "", self.session_id


def _control_body(msg: InboundMessage) -> dict[str, Any]:
    decoded = decode(msg.payload)
    if decoded is None or decoded.body is None:
        raise BadRequestError("control payload must be a JSON object")
    if decoded.violation is not None:
        raise BadRequestError(decoded.violation)
    return decoded.body


def parse_control(msg: InboundMessage, kind: str, project: str, topics: Topics) -> Cancel | Reset:
    """Validate a cancel or session-reset message; raises `BadRequestError` only (answered nowhere: no route)."""
    try:
        return _control(msg, kind, project, topics)
    except BadRequestError:
        raise
    except Exception as exc:
        log.exception("control.parse_failed", topic=msg.topic[:128], size=len(msg.payload))
        raise BadRequestError("the control payload could not be parsed") from exc


def _control(msg: InboundMessage, kind: str, project: str, topics: Topics) -> Cancel | Reset:
    body = _control_body(msg)
    client_id = body.get("clientId")
    if client_id is not None and not is_valid_id(client_id):
        raise BadRequestError("clientId must be 1-128 chars of [A-Za-z0-9_.:-]")
    if kind == "cancel":
        request_id = body.get("requestId")
        if not is_valid_id(request_id):
            raise BadRequestError("cancel needs a valid requestId")
        return Cancel(project, str(request_id), client_id)
    session = body.get("sessionId")
    if not is_valid_id(session):
        raise BadRequestError("session reset needs a valid sessionId")
    confirm = None
    if body.get("v") == 2 or msg.response_topic is not None:  # noqa: PLR2004
        topic = topics.v2_reply(project, client_id or str(session))
        if msg.response_topic is not None:
            prefix = topics.reply_prefix(project, Dialect.V2)
            if not is_reply_topic(msg.response_topic, prefix):
                raise BadRequestError(f"Response Topic must be a plain topic under {prefix}")
            topic = msg.response_topic
        confirm = Route(project, Dialect.V2, topic, str(session), client_id, None, msg.correlation_data)
    return Reset(project, str(session), client_id, confirm)


def classic_answer(text: str) -> bytes:
    """Classic reply payload: the answer as plain UTF-8 text."""
    return text.encode("utf-8")


def classic_error(error: WorkerError) -> bytes:
    """Classic error payload: `Error: ` plus a human sentence."""
    return f"Error: {error.message}".encode()


def v2_message(route: Route, seq: int, **fields: Any) -> bytes:  # noqa: ANN401 - JSON values
    """A v2 reply object (PROTOCOL section 3); `None` fields are left out."""
    body: dict[str, Any] = {"v": 2, "requestId": route.request_id, "sessionId": route.session_id, "seq": seq}
    body.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def v2_error(route: Route, seq: int, error: WorkerError, model: str, worker: str) -> bytes:
    """A v2 error reply."""
    err: dict[str, Any] = {"code": str(error.code), "message": error.message}
    if error.retry_after_ms is not None:
        err["retryAfterMs"] = error.retry_after_ms
    return v2_message(route, seq, done=True, finishReason="error", error=err, model=model, worker=worker)
