"""Two models on one host: the supervisor runs one worker process per [[models]] entry (fake engines)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import psutil
from support import MODEL_DIR, ROOT, free_port, peer, wait_port

from worker.client import Client
from worker.config import BrokerConfig, load


def write_config(tmp_path, worker_id: str):
    path = tmp_path / "two.toml"
    path.write_text(
        f'[worker]\nid = "{worker_id}"\ndrain_timeout_s = 1.0\n\n'
        f'[[models]]\npath = "{MODEL_DIR}"\nprojects = ["maze"]\n\n'
        f'[[models]]\npath = "{MODEL_DIR}"\nprojects = ["driving", "racing"]\n'
    )
    return path


def ready(got, worker_id: str) -> bool:
    return any(m.topic == f"vllm-worker/{worker_id}/status" and json.loads(m.payload)["state"] == "ready" for m in got)


def test_config_for_model_entry_is_a_single_model_config(tmp_path):
    cfg = load(write_config(tmp_path, "sv"))
    child = cfg.for_model(1, 0.3)
    assert child.worker.projects == ["driving", "racing"]
    assert child.model.gpu_memory_utilization == 0.3
    assert child.models == []


async def test_supervisor_serves_each_model_restarts_a_dead_one_and_stops_cleanly(tmp_path):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "--config",
        str(write_config(tmp_path, "sv")),
        "--engine",
        "fake",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await asyncio.to_thread(wait_port, port, proc, 30)  # the supervisor's embedded broker comes up first
        async with peer(port, ["vllm-worker/+/status"], client_id="sv-watch") as watch:
            await watch.wait_for(lambda got: ready(got, "sv-m0") and ready(got, "sv-m1"), timeout_s=30)
            async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}")) as client:
                maze = await client.ask("maze", "hi")
                driving = await client.ask("racing", "go")
            assert maze.raw["worker"] == "sv-m0"
            assert driving.raw["worker"] == "sv-m1"
            children = psutil.Process(proc.pid).children()
            victim = next(c for c in children if "sv-m1" in " ".join(c.cmdline()))
            watch.received.clear()
            victim.kill()
            await watch.wait_for(lambda got: ready(got, "sv-m1"), timeout_s=30)  # restarted
            async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}")) as client:
                assert (await client.ask("driving", "again")).ok
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert "model 1 exited" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
