"""`run`: the worker's event loop, uvloop where it is installed.

uvloop is what vLLM's own API server runs on. Its loop, written in C, costs less CPU per streamed chunk
than asyncio's (pahoio's selector callbacks, `call_soon`, timers): 6% less in `benchmarks/bus_cpu.py`
(publisher and subscriber), 20% for a publisher alone; in single bench runs the worker's front-end CPU
per 1,000 tokens went from 1.47 to 1.25 at concurrency 1 and from 0.20 to 0.18 at 32. On a GPU host that
CPU is the front-end's budget. asyncio remains the fallback (`worker.event_loop`) and is what in-process
tests run on, so the worker must stay correct on both.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from worker.errors import ConfigError

T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory: uvloop's for `auto` (when installed) and `uvloop`; None means asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("worker.event_loop is uvloop, but uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
