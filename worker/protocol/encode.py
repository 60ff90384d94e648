"""Reply payloads: classic plain text and v2 JSON (PROTOCOL sections 2-3), and what a client sees of a text."""

from __future__ import annotations

import json
import re
from typing import Any

from worker.errors import WorkerError
from worker.projects import Project
from worker.protocol.messages import Route

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


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
