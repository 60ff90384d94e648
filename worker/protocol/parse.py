"""bytes -> `Request` (or a typed `Rejected` carrying the safe route to answer on), and control commands.

The reply route is worked out once, from validated ids only; every bound of PROTOCOL section 1 is
checked before anything is built. Parsing never raises anything but `Rejected` / `BadRequestError`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

import structlog

from worker.errors import BadRequestError, TooLargeError, UnknownProjectError, WorkerError
from worker.message import InboundMessage
from worker.projects import Project
from worker.protocol.chat import parse_chat
from worker.protocol.messages import Cancel, ChatMessage, Rejected, Request, Reset, Route, Sampling
from worker.protocol.payload import decode
from worker.protocol.schemas import check_schema
from worker.protocol.tools import ToolResult, ToolSet, parse_results, parse_tools
from worker.protocol.topics import DEFAULT_SESSION, Dialect, Topics, is_reply_topic, is_valid_id

log = structlog.get_logger(__name__)

ROUTING_PARSE_LIMIT_BYTES = 1024 * 1024
"""Payloads over max size are still parsed (to find a v2 reply route) up to this size."""
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
        "tools",
        "toolChoice",
        "toolResults",
    }
)
TOOL_FIELDS = ("tools", "toolChoice", "toolResults")


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
        error = version_error or _violation(self.msg, decoded.violation)
        if error is not None:
            raise self.fail(error)
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
        own = self.route.topic
        if v5_topic is not None:
            prefix = self.topics.reply_prefix(project, Dialect.V2)
            if not is_reply_topic(v5_topic, prefix):
                raise self.fail(BadRequestError(f"Response Topic must be a plain topic under {prefix}"))
            self.route = dataclasses.replace(self.route, topic=v5_topic, own_topic=own)
        if reply_topic is None:
            return
        prefix = self.topics.reply_prefix(project, self.route.dialect)
        if not is_reply_topic(reply_topic, prefix):
            raise self.fail(
                BadRequestError(f"replyTopic must be a plain topic under {prefix}: no + or #, valid MQTT text")
            )
        if v5_topic is None:
            self.route = dataclasses.replace(self.route, topic=str(reply_topic), own_topic=own)

    def _request(self, body: dict[str, Any], project: Project) -> Request:
        assert self.route is not None  # noqa: S101 - set by _route_from
        tools, results = self._tools(body, project)
        message, messages = self._text(body, project, results)
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
            tools=tools,
            tool_results=results,
        )

    def _tools(self, body: dict[str, Any], project: Project) -> tuple[ToolSet | None, tuple[ToolResult, ...]]:
        """`tools`, `toolChoice`, `toolResults` (v2 only: a classic reply has no place for a tool call)."""
        assert self.route is not None  # noqa: S101 - set by _route_from
        if not any(body.get(field) is not None for field in TOOL_FIELDS):
            return None, ()
        if self.route.dialect is not Dialect.V2:
            raise self.fail(BadRequestError("tools, toolChoice and toolResults need the v2 protocol (v: 2)"))
        if "toolResults" in body and "messages" in body:
            raise self.fail(
                BadRequestError("toolResults answer a session's turn; stateless chats send role tool messages")
            )
        try:
            return parse_tools(body.get("tools"), body.get("toolChoice")), parse_results(
                body.get("toolResults"), project.limits.max_message_chars
            )
        except (BadRequestError, TooLargeError) as err:
            raise self.fail(err) from None

    def _text(
        self, body: dict[str, Any], project: Project, results: tuple[ToolResult, ...]
    ) -> tuple[str | None, tuple[ChatMessage, ...] | None]:
        limit = project.limits.max_message_chars
        if "messages" in body:
            if "message" in body:
                raise self.fail(BadRequestError("send either message or messages, not both"))
            try:
                return None, parse_chat(body["messages"], limit)
            except (BadRequestError, TooLargeError) as err:
                raise self.fail(err) from None
        message = body.get("message")
        if results and message in (None, ""):
            return None, None  # the turn is the tool results alone
        if not isinstance(message, str) or not message.strip():
            raise self.fail(BadRequestError("message must be a non-empty string"))
        if len(message) > limit:
            raise self.fail(TooLargeError(f"message is {len(message)} characters, limit {limit}"))
        return message, None

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


def _violation(msg: InboundMessage, payload_violation: str | None) -> WorkerError | None:
    """The first bound broken by the packet (its MQTT properties) or by the payload, as the error to answer."""
    if msg.violation is not None:
        return TooLargeError(msg.violation)
    return BadRequestError(payload_violation) if payload_violation is not None else None


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


def _control_body(msg: InboundMessage) -> dict[str, Any]:
    if msg.violation is not None:
        raise BadRequestError(msg.violation)
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
    reset_id = body.get("requestId")
    if reset_id is not None and not is_valid_id(reset_id):
        raise BadRequestError("requestId must be 1-128 chars of [A-Za-z0-9_.:-]")
    confirm = None
    if body.get("v") == 2 or msg.response_topic is not None:  # noqa: PLR2004
        topic = topics.v2_reply(project, client_id or str(session))
        if msg.response_topic is not None:
            prefix = topics.reply_prefix(project, Dialect.V2)
            if not is_reply_topic(msg.response_topic, prefix):
                raise BadRequestError(f"Response Topic must be a plain topic under {prefix}")
            topic = msg.response_topic
        confirm = Route(project, Dialect.V2, topic, str(session), client_id, None, msg.correlation_data)
    return Reset(project, str(session), client_id, confirm, reset_id)
