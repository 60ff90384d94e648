"""The worker's loop choice: uvloop when installed (auto), asyncio on request, a clear error when missing."""

from __future__ import annotations

import asyncio
import sys

import pytest

from worker.errors import ConfigError
from worker.transport.eventloop import loop_factory, run


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_where_it_is_installed():
    pytest.importorskip("uvloop")
    assert run(_loop_module(), "auto").startswith("uvloop")


def test_asyncio_on_request():
    assert loop_factory("asyncio") is None
    assert run(_loop_module(), "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")
