"""Killing vLLM's engine-core process: in-flight requests get engine_error, the worker exits non-zero."""

from __future__ import annotations

import asyncio
import json

import psutil
import pytest
from conftest import launch_worker
from support import peer

from worker.client import Client
from worker.config import BrokerConfig

pytestmark = pytest.mark.e2e


async def test_engine_core_killed_mid_request_gives_engine_error_and_exit_1():
    with launch_worker("--projects", "general", worker_id="doomed") as w:
        core = [
            c
            for c in psutil.Process(w.proc.pid).children(recursive=True)
            if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()
        ]
        assert core, "expected vLLM's EngineCore child process"
        async with peer(w.port, ["vllm-worker/doomed/status"], client_id="death-watch") as watch:
            async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{w.port}")) as client:
                reply = None
                async for chunk in client.stream("general", "Tell a very long story.", maxTokens=1500, timeout_s=60):
                    if chunk.seq == 1:  # the first chunk: it is generating now
                        for proc in core:
                            proc.kill()
                    reply = chunk.reply
                assert reply is not None
            code = await asyncio.to_thread(w.proc.wait, 30)
            await watch.wait_for(lambda got: any(json.loads(m.payload)["state"] == "offline" for m in got))
    assert reply.error_code == "engine_error"
    assert code == 1
    assert "engine died" in w.log()
