"""The wire protocol (PROTOCOL.md sections 1-4): topics and ids, value types, parsing, reply encoding.

`parse` turns an `InboundMessage` into a validated `Request`, or raises `Rejected` carrying the typed
error and, when one can be derived safely, the `Route` to answer on. The names below are the
package's public surface; the submodules hold one concept each.
"""

from worker.protocol.encode import classic_answer, classic_error, strip_reasoning, v2_error, v2_message, visible_text
from worker.protocol.messages import (
    Cancel,
    ChatMessage,
    FinalReply,
    Rejected,
    Request,
    Reset,
    Role,
    Route,
    Sampling,
)
from worker.protocol.parse import KNOWN_FIELDS, parse, parse_control
from worker.protocol.topics import DEFAULT_SESSION, Dialect, Topics, is_reply_topic, is_safe_topic, is_valid_id

__all__ = [
    "DEFAULT_SESSION",
    "KNOWN_FIELDS",
    "Cancel",
    "ChatMessage",
    "Dialect",
    "FinalReply",
    "Rejected",
    "Request",
    "Reset",
    "Role",
    "Route",
    "Sampling",
    "Topics",
    "classic_answer",
    "classic_error",
    "is_reply_topic",
    "is_safe_topic",
    "is_valid_id",
    "parse",
    "parse_control",
    "strip_reasoning",
    "v2_error",
    "v2_message",
    "visible_text",
]
