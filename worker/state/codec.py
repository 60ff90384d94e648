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
from worker.state.base import Turn

log = structlog.get_logger(__name__)
MAX_TOKEN_DIGITS = 9


def encode_turn(turn: Turn) -> str:
    """`<tokens>` newline `<json [user, assistant, requestId]>` (the APPEND script reads the tokens)."""
    return f"{turn.tokens}\n" + json.dumps([turn.user, turn.assistant, turn.request_id])


def redact(url: str) -> str:
    """The URL without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def decode_turn(item: bytes) -> Turn | None:
    """`<tokens>` newline `<json [user, assistant, requestId]>`, or None when it is not that (never raises)."""
    try:
        head, _, body = item.partition(b"\n")
        user, assistant, *rest = json.loads(body)
        rid = rest[0] if rest else None
        texts = isinstance(user, str) and isinstance(assistant, str) and (rid is None or isinstance(rid, str))
        if texts and head.isdigit() and len(head) <= MAX_TOKEN_DIGITS:
            return Turn(user, assistant, int(head), rid)
    except (ValueError, TypeError):
        pass
    return None


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
