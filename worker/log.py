"""Logging: structlog key-value events (`noun.past_verb`), secrets redacted at every level.

Prompts and answers are logged only at DEBUG. Any key that looks like a secret is replaced, and
`SecretStr` values never render (pydantic prints them as `**********`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from worker.config import LogConfig

SECRET_KEY = re.compile(
    r"(^|_)(pass|passwd|password|secret|token|api_?key|private_?key|key_?file|credentials?)$", re.IGNORECASE
)
REDACTED = "***"


class SinkGuard:
    """A stdout/stderr whose reader may vanish (`worker | head`, a log shipper that died).

    A write to a closed pipe raises BrokenPipeError wherever it happens: in a signal handler it kept
    SIGTERM from ever stopping the worker. Here the first failed write points the file descriptor at
    /dev/null, so every later writer (print, logging, structlog, the interpreter's exit flush) succeeds
    silently and shutdown and serving go on.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        """Write, or drop silently once the reader is gone."""
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # EPIPE, EIO, a closed file
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        """Flush, or drop silently once the reader is gone."""
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._to_devnull()

    def _to_devnull(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # drains the buffered text into /dev/null

    def isatty(self) -> bool:
        """Whether the underlying stream is a terminal."""
        with contextlib.suppress(OSError, ValueError):
            return self._stream.isatty()
        return False

    def fileno(self) -> int:
        """The underlying descriptor (subprocesses inherit it)."""
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - everything else is the wrapped stream's
        return getattr(self._stream, name)


def guard_std_streams() -> None:
    """Make stdout and stderr survive a vanished reader (see `SinkGuard`); idempotent."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SinkGuard):
            setattr(sys, name, SinkGuard(stream))


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:  # noqa: ANN401
    """Structlog processor: blank every value whose key names a secret."""
    for key in list(event):
        if SECRET_KEY.search(key):
            event[key] = REDACTED
    return event


class TracebackLimiter:
    """Structlog processor: at most `per_window` full tracebacks per event name per `window_s`.

    A bug of ours that some input triggers would otherwise log a ~28 KiB traceback per message on the
    event loop (~87 ms each: 40 of them delayed a normal request by 3.5 s). Past the limit the event keeps
    one line (`error` = the exception's type and message, cut) and counts what it left out.
    """

    def __init__(
        self, per_window: int = 5, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_window = per_window
        self._window_s = window_s
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:  # noqa: ANN401
        """Pass the traceback, or replace it by one line once this event's budget is spent."""
        exc_info = event.get("exc_info")
        if not exc_info:
            return event
        name = str(event.get("event"))[:64]
        now = self._clock()
        start, count = self._windows.get(name, (now, 0))
        if now - start > self._window_s:
            start, count = now, 0
        if len(self._windows) >= MAX_LIMITED_EVENTS and name not in self._windows:
            self._windows.clear()  # bounded: event names are ours, but never trust a count
        self._windows[name] = (start, count + 1)
        if count < self._per_window:
            return event
        exc = sys.exc_info()[1] if exc_info is True else exc_info[1] if isinstance(exc_info, tuple) else exc_info
        del event["exc_info"]
        event["error"] = f"{type(exc).__name__}: {exc}"[:200]
        event["traceback_suppressed"] = count + 1 - self._per_window
        return event


MAX_LIMITED_EVENTS = 256


def setup(cfg: LogConfig) -> None:
    """Configure structlog (and stdlib logging for vLLM/paho) once per process."""
    level = getattr(logging, cfg.level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if cfg.json_format
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            TracebackLimiter(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.INFO), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    for noisy in ("amqtt", "transitions"):  # amqtt logs each client's state machine at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_engine(level: str) -> None:
    """Keep vLLM, torch and transformers to errors unless `--log-level debug` (then everything they say).

    Their INFO and advice lines (engine config dump, Triton, NUMA, LD_PRELOAD, load progress bars) buried
    the worker's own `ready`. Uses the libraries' own switches, set before vllm is imported so that its
    engine-core child inherits them; explicit settings in the environment win.
    """
    debug = level == "debug"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if debug else "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "INFO" if debug else "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if debug else "error")
    if debug:
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")  # the engine-core child
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("vllm", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
