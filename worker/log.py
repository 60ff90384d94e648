"""Logging: structlog key-value events (`noun.past_verb`), secrets redacted at every level.

Prompts and answers are logged only at DEBUG. Any key that looks like a secret is replaced, and
`SecretStr` values never render (pydantic prints them as `**********`).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from worker.config import LogConfig

SECRET_KEY = re.compile(
    r"(^|_)(pass|passwd|password|secret|token|api_?key|private_?key|key_?file|credentials?)$", re.IGNORECASE
)
REDACTED = "***"


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
