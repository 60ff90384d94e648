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
import warnings
from collections.abc import MutableMapping
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
