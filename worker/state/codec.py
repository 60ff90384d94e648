"""How the Redis backend writes its values: turns, cached final replies, and URLs for logs (never raises on reads).

Everything read back from Redis is treated as untrusted (another version of the worker, a hand edit):
an unreadable item is skipped, never raised.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit, urlunsplit

import structlog

from worker.protocol import FinalReply
from worker.protocol.tools import ToolCall, ToolResult
from worker.state.base import Turn

log = structlog.get_logger(__name__)
MAX_TOKEN_DIGITS = 9


def encode_turn(turn: Turn) -> str:
    """`<tokens>` newline `<json [user, assistant, requestId, {tools}?]>` (the APPEND script reads the tokens)."""
    body: list[object] = [turn.user, turn.assistant, turn.request_id]
    if turn.tool_calls or turn.tool_results:
        body.append(
            {
                "calls": [[c.id, c.name, c.arguments] for c in turn.tool_calls],
                "results": [[r.tool_call_id, r.content] for r in turn.tool_results],
            }
        )
    return f"{turn.tokens}\n" + json.dumps(body)


def redact(url: str) -> str:
    """The URL without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def decode_turn(item: bytes) -> Turn | None:
    """`<tokens>` newline `<json [user, assistant, requestId, {tools}?]>`, or None if not that (never raises)."""
    try:
        head, _, body = item.partition(b"\n")
        user, assistant, *rest = json.loads(body)
        rid = rest[0] if rest else None
        texts = isinstance(user, str) and isinstance(assistant, str) and (rid is None or isinstance(rid, str))
        tools = rest[1] if len(rest) > 1 else {}
        if texts and head.isdigit() and len(head) <= MAX_TOKEN_DIGITS and isinstance(tools, dict):
            calls = tuple(ToolCall(*_strings(c, 3)) for c in tools.get("calls", ()))
            results = tuple(ToolResult(*_strings(r, 2)) for r in tools.get("results", ()))
            return Turn(user, assistant, int(head), rid, calls, results)
    except (ValueError, TypeError):
        pass
    return None


def _strings(item: object, count: int) -> list[str]:
    """A list of exactly `count` strings, else ValueError (items read back from Redis are untrusted)."""
    if not isinstance(item, list) or len(item) != count or not all(isinstance(x, str) for x in item):
        raise ValueError(item)
    return item


def encode_final(final: FinalReply) -> str:
    """A cached final reply as JSON (payload and correlation data in base64)."""
    data = {
        "t": final.topic,
        "p": base64.b64encode(final.payload).decode(),
        "c": base64.b64encode(final.correlation_data).decode() if final.correlation_data is not None else None,
    }
    return json.dumps(data)


def decode_final(raw: object) -> FinalReply | None:
    """The cached final reply, or None when it is unreadable (never raises)."""
    try:
        data = json.loads(raw if isinstance(raw, (bytes, str)) else b"")
        corr = data["c"]
        return FinalReply(
            str(data["t"]), base64.b64decode(data["p"]), base64.b64decode(corr) if corr is not None else None
        )
    except (ValueError, TypeError, KeyError):
        log.warning("state.bad_cached_reply")
        return None
