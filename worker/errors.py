"""Typed errors: one class per wire error code of PROTOCOL section 3.

A `WorkerError` travels from the step that found the problem to the replier, which turns it into a
classic `Error: ...` text or a v2 `error` object. Anything that is not a `WorkerError` becomes
`engine_error` at the service boundary.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    """The wire strings of PROTOCOL section 3, exactly."""

    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    CONTEXT_TOO_LONG = "context_too_long"
    UNKNOWN_PROJECT = "unknown_project"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    ENGINE_ERROR = "engine_error"
    SHUTTING_DOWN = "shutting_down"
    STATE_UNAVAILABLE = "state_unavailable"
    QUOTA_EXCEEDED = "quota_exceeded"


class WorkerError(Exception):
    """Base of every error a client can see. `detail` is safe to send (never secrets)."""

    code: ClassVar[ErrorCode]
    public_message: ClassVar[str]

    def __init__(self, detail: str = "", *, retry_after_ms: int | None = None) -> None:
        super().__init__(detail or self.public_message)
        self.detail = detail
        self.retry_after_ms = retry_after_ms

    @property
    def message(self) -> str:
        """Human sentence for the wire: the public message plus the detail, if any."""
        return f"{self.public_message}: {self.detail}" if self.detail else self.public_message


class BadRequestError(WorkerError):
    """Malformed payload or invalid field."""

    code, public_message = ErrorCode.BAD_REQUEST, "Bad request"


class TooLargeError(WorkerError):
    """Payload or prompt over the configured limits."""

    code, public_message = ErrorCode.TOO_LARGE, "Request too large"


class ContextTooLongError(WorkerError):
    """Prompt plus maxTokens exceeds the model's context window."""

    code, public_message = ErrorCode.CONTEXT_TOO_LONG, "Prompt too long for the model's context"


class UnknownProjectError(WorkerError):
    """The topic names a project this worker does not serve."""

    code, public_message = ErrorCode.UNKNOWN_PROJECT, "Unknown project"


class RateLimitedError(WorkerError):
    """The (project, client) token bucket is empty."""

    code, public_message = ErrorCode.RATE_LIMITED, "Rate limit exceeded, please slow down"


class QuotaExceededError(WorkerError):
    """The client's or the project's daily token or request budget is used up (until the next UTC midnight)."""

    code, public_message = ErrorCode.QUOTA_EXCEEDED, "Daily quota used up"


class OverloadedError(WorkerError):
    """The admission queue is full."""

    code, public_message = ErrorCode.OVERLOADED, "Server is overloaded, please retry later"


class ExpiredError(WorkerError):
    """The request's deadline passed before generation finished."""

    code, public_message = ErrorCode.EXPIRED, "Request deadline expired"


class RequestCancelledError(WorkerError):
    """The client cancelled the request."""

    code, public_message = ErrorCode.CANCELLED, "Request cancelled"


class EngineError(WorkerError):
    """The engine failed this request (or died)."""

    code, public_message = ErrorCode.ENGINE_ERROR, "The model failed to generate an answer"


class ShuttingDownError(WorkerError):
    """The worker is draining and could not finish this request."""

    code, public_message = ErrorCode.SHUTTING_DOWN, "Server is shutting down, please retry later"


class StateUnavailableError(WorkerError):
    """The shared state backend (Redis) is unreachable, so this session's history cannot be read or kept."""

    code, public_message = ErrorCode.STATE_UNAVAILABLE, "Conversation state is unavailable, please retry later"


class ConfigError(Exception):
    """Invalid configuration found before start; the CLI prints it and exits with code 2."""


class EngineDeadError(Exception):
    """The engine process is gone: every in-flight request fails and the worker exits non-zero."""


class PublishError(Exception):
    """A message could not be published (its topic is not MQTT text, the client refused it): nothing was sent.

    Not a wire code: the replier answers it on the sender's own route, where one exists.
    """
