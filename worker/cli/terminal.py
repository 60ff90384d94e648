"""What a person at a terminal sees of the CLI: status lines on stderr and the exit codes."""

from __future__ import annotations

import sys

EXIT_CONFIG = 2
"""Invalid configuration, refused credentials, an unusable model: fixed by the operator, not by a restart."""


def say(message: str) -> None:
    """A human status line (stderr, so stdout stays clean for answers and JSON)."""
    print(f"vllm-worker: {message}", file=sys.stderr, flush=True)
