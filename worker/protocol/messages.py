"""The protocol's value types: requests, routes, control commands, final replies, and the chat types.

The chat types (`ChatMessage`, `Sampling`) are owned here: the engine imports them, never the reverse,
so the wire format does not depend on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.errors import WorkerError
from worker.projects import Project
from worker.protocol.tools import ToolCall, ToolResult, ToolSet
from worker.protocol.topics import Dialect

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn: an assistant's may carry the tool calls it made; a `tool` one answers `tool_call_id`."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class Sampling:
    """Resolved sampling parameters (already clamped to the project's limits)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    json_schema: str | None = None
    """Constrain the answer to this JSON schema (serialised), via vLLM structured outputs."""


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
    own_topic: str | None = None
    """The sender's own reply topic (from its validated ids) when `topic` is one it chose (`replyTopic`,
    Response Topic): where an error goes if the chosen topic cannot be published to."""

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
    tools: ToolSet | None = None
    """The functions the model may call (v2)."""
    tool_results: tuple[ToolResult, ...] = ()
    """Answers to the calls the session's last turn made (v2, stateful); `message` is then optional."""

    @property
    def uses_tools(self) -> bool:
        """Whether the model may call a tool in this request."""
        return self.tools is not None and self.tools.active

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
    request_id: str | None = None
    """With one, the reset is applied once fleet-wide: a late copy (queued for a paused or reconnecting
    worker, redelivered, or received by every worker) is ignored instead of wiping later turns."""

    @property
    def session_key(self) -> tuple[str, str, str]:
        """The history key it resets (see `Request.session_key`)."""
        return self.project, self.client_id or "", self.session_id

    @property
    def dedupe_key(self) -> tuple[str, str, str] | None:
        """Its key in the requestId dedupe (`reset:` keeps it apart from requests), or None without an id."""
        if self.request_id is None:
            return None
        return self.project, self.client_id or "", f"reset:{self.request_id}"


class Rejected(Exception):  # noqa: N818 - it is an outcome, not an error of ours
    """A request refused at parse time; `route` is None when no safe reply topic exists."""

    def __init__(self, error: WorkerError, route: Route | None, *, internal: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.route = route
        self.internal = internal
        """True when a bug of ours, not the payload's own fault, refused it (counted apart)."""
