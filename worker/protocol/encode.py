"""Reply payloads: classic plain text and v2 JSON (PROTOCOL sections 2-3), and what a client sees of a text."""

from __future__ import annotations

import json
from typing import Any

from worker.errors import WorkerError
from worker.projects import Project
from worker.protocol.messages import Route

OPEN, CLOSE = "<think>", "</think>"


class ReasoningFilter:
    """Drops `<think>...</think>` blocks from text fed piece by piece, each character looked at once.

    Tags are matched as written, left to right: removing a block never forms a new tag (a regex
    substitution would turn `<<think></think>think>` into `<think>`). An unclosed `<think>` (cut off by
    maxTokens) hides the rest. A `</think>` with no opening tag means everything before it was reasoning
    whose opening tag sat in the template: `feed` then says the text shown so far is void. The end of a
    piece that may begin a tag is held back until the next piece (or `final`).
    """

    def __init__(self) -> None:
        self._pending = ""
        self._inside = False

    def feed(self, text: str, *, final: bool = False) -> tuple[str, bool]:
        """(visible text of this piece, whether a stray `</think>` voided everything visible before it)."""
        self._pending += text
        out: list[str] = []
        voided = False
        while True:
            if self._inside:
                end = self._pending.find(CLOSE)
                if end < 0:
                    self._pending = "" if final else self._pending[-(len(CLOSE) - 1) :]
                    break
                self._pending, self._inside = self._pending[end + len(CLOSE) :], False
                continue
            start, stray = self._pending.find(OPEN), self._pending.find(CLOSE)
            if stray >= 0 and (start < 0 or stray < start):
                out, voided = [], True
                self._pending = self._pending[stray + len(CLOSE) :]
                continue
            if start >= 0:
                out.append(self._pending[:start])
                self._pending, self._inside = self._pending[start + len(OPEN) :], True
                continue
            keep = 0 if final else _partial_tag(self._pending)
            out.append(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            break
        return "".join(out), voided


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that begins `<think>` or `</think>`."""
    if "<" not in text[-(len(CLOSE) - 1) :]:
        return 0  # the common case, one token at a time: no tag can be starting
    for size in range(min(len(text), len(CLOSE) - 1), 0, -1):
        tail = text[-size:]
        if OPEN.startswith(tail) or CLOSE.startswith(tail):
            return size
    return 0


def strip_reasoning(text: str) -> str:
    """The answer without its reasoning (see `ReasoningFilter`), trimmed; what streams show agrees with it."""
    return ReasoningFilter().feed(text, final=True)[0].strip()


def visible_text(project: Project, raw: str) -> str:
    """What the client sees of the raw generated text: reasoning stripped if the project says so, trimmed."""
    return strip_reasoning(raw) if project.strip_reasoning else raw.strip()


def classic_answer(text: str) -> bytes:
    """Classic reply payload: the answer as plain UTF-8 text."""
    return text.encode("utf-8")


CLASSIC_ERROR_PREFIX = "Error: "
"""What starts every classic error reply (clients test for it: examples/README.md)."""


def classic_error(error: WorkerError) -> bytes:
    """Classic error payload: `Error: ` plus a human sentence."""
    return f"{CLASSIC_ERROR_PREFIX}{error.message}".encode()


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
