"""Reply payloads: classic plain text and v2 JSON (PROTOCOL sections 2-3), and what a client sees of a text."""

from __future__ import annotations

import json
from typing import Any

from worker.errors import WorkerError
from worker.projects import Project
from worker.protocol.messages import Route

OPEN, CLOSE = "<think>", "</think>"


def strip_reasoning(text: str) -> str:
    """Remove `<think>...</think>` blocks, in one pass from left to right (as a stream sees them).

    A `</think>` with no opening tag means everything before it was reasoning whose tag sat in the
    template; an unclosed `<think>` (cut off by maxTokens) hides the rest. Tags are matched as written:
    removing a block never forms a new tag (a regex substitution would turn `<<think></think>think>` into
    `<think>`), so the streamed text (`replies.VisibleText`) agrees with this one.
    """
    out: list[str] = []
    pos, inside = 0, False
    while True:
        if inside:
            end = text.find(CLOSE, pos)
            if end < 0:
                break
            pos, inside = end + len(CLOSE), False
            continue
        start, stray = text.find(OPEN, pos), text.find(CLOSE, pos)
        if stray >= 0 and (start < 0 or stray < start):
            out, pos = [], stray + len(CLOSE)
            continue
        if start < 0:
            out.append(text[pos:])
            break
        out.append(text[pos:start])
        pos, inside = start + len(OPEN), True
    return "".join(out).strip()


def visible_text(project: Project, raw: str) -> str:
    """What the client sees of the raw generated text: reasoning stripped if the project says so, trimmed."""
    return strip_reasoning(raw) if project.strip_reasoning else raw.strip()


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
