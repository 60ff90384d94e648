"""A stateless request's `messages`: the whole chat, validated entry by entry (tool calls and results too)."""

from __future__ import annotations

from worker.errors import BadRequestError, TooLargeError
from worker.protocol.messages import ChatMessage
from worker.protocol.tools import parse_message_calls
from worker.protocol.topics import is_valid_id

MAX_CHAT_MESSAGES = 256
"""Entries of a stateless `messages` list."""


def parse_chat(raw: object, limit: int) -> tuple[ChatMessage, ...]:
    """Validate the list; raises `BadRequestError` / `TooLargeError` (`limit`: characters of all contents)."""
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("messages must be a non-empty list of {role, content}")
    if len(raw) > MAX_CHAT_MESSAGES:
        raise TooLargeError(f"messages has {len(raw)} entries, limit {MAX_CHAT_MESSAGES}")
    out = [_message(item) for item in raw]
    if sum(len(m.content) for m in out) > limit:
        raise TooLargeError(f"messages hold more than {limit} characters")
    if out[-1].role not in ("user", "tool"):
        raise BadRequestError("the last message must have role user (or tool, answering calls)")
    return tuple(out)


def _message(item: object) -> ChatMessage:
    """One entry: {role, content}, an assistant's `toolCalls`, a tool's `toolCallId`."""
    if not isinstance(item, dict):
        raise BadRequestError("each message must be an object {role, content}")
    role, content = item.get("role"), item.get("content")
    if role == "assistant" and content is None and "toolCalls" in item:
        content = ""
    if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
        raise BadRequestError("role must be system, user, assistant or tool; content a string")
    if role == "tool":
        call = item.get("toolCallId")
        if not is_valid_id(call):
            raise BadRequestError("a tool message needs the toolCallId it answers")
        return ChatMessage("tool", content, tool_call_id=str(call))
    if role == "assistant" and item.get("toolCalls") is not None:
        return ChatMessage("assistant", content, tool_calls=parse_message_calls(item["toolCalls"]))
    return ChatMessage(role, content)
