"""Topic names and the id rules that make it safe to splice client values into them (PROTOCOL 1-3, 7)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from worker.message import is_mqtt_text
from worker.projects import tool_topic_problem

ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

DEFAULT_SESSION = "default"
MAX_TOPIC_CHARS = 512


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

    def direct_input(self, project: str, worker_id: str) -> str:
        """A worker's own request topic, outside every shared filter: a sticky session's turns come here."""
        return f"{self.prefix}{project}/worker/{worker_id}/user_input"

    def is_direct(self, topic: str) -> bool:
        """Whether a request topic is a worker's own (`direct_input`), not the shared one."""
        parts = topic[len(self.prefix) :].split("/") if topic.startswith(self.prefix) else []
        return len(parts) == 4 and parts[1] == "worker" and parts[3] == "user_input"  # noqa: PLR2004

    def tool_results(self, project: str, worker_id: str) -> str:
        """Where devices answer this worker's tool calls (the per-worker namespace `{project}/worker/{id}/`)."""
        return f"{self.prefix}{project}/worker/{worker_id}/tool_result"

    def capabilities(self, project: str) -> str:
        """Devices' retained capability announcements (subscription filter)."""
        return f"{self.prefix}{project}/capabilities/+"

    def device_tool(self, project: str, device: str, tool: str) -> str:
        """Where an announced tool of a device is called."""
        return f"{self.prefix}{project}/tools/{device}/{tool}"

    def is_tool_topic(self, project: str, topic: str) -> bool:
        """A topic a project's tool may be called on: under the project, outside its reserved subtrees."""
        head = f"{self.prefix}{project}/"
        if not is_safe_topic(topic) or not topic.startswith(head) or len(topic) == len(head):
            return False
        return tool_topic_problem(project, topic[len(self.prefix) :]) is None

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
        if self.is_direct(topic):
            return parts[0], None
        return None


def is_valid_id(value: object) -> bool:
    """PROTOCOL id: 1-128 chars of [A-Za-z0-9_.:-]."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def is_safe_topic(topic: object) -> bool:
    """A publishable, non-system topic: valid MQTT 5 text, no wildcards, not `$...`, bounded length."""
    return (
        isinstance(topic, str)
        and 0 < len(topic) <= MAX_TOPIC_CHARS
        and not topic.startswith("$")
        and "+" not in topic
        and "#" not in topic
        and is_mqtt_text(topic)
    )


def is_reply_topic(topic: object, *prefixes: str) -> bool:
    """A safe topic strictly under one of `prefixes`: a project's reply namespace, what the ACL grants.

    Checked before every publish, chunks included, so safety is tested once for all prefixes.
    """
    if not is_safe_topic(topic):
        return False
    text = str(topic)
    return any(text.startswith(p) and len(text) > len(p) for p in prefixes)
