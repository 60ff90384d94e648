"""The README's shell examples that need no model run as written (only the broker port is added), against
a fake-engine worker on the embedded broker: what a newcomer pastes must work."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest
from support import ROOT, free_port, running_worker, wait_port

README = (ROOT / "README.md").read_text()


def shell_lines(prefixes: tuple[str, ...]) -> list[str]:
    """Command lines of the README's ```bash blocks that start with one of `prefixes` (comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command.startswith(prefixes):
                lines.append(command)
    return lines


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        msg = f"{tool} is not installed (apt-get install mosquitto-clients; `make test` does it as root)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


async def run(command: str, port: int) -> str:
    argv = shlex.split(command)
    if argv[0].endswith("vllm-worker"):
        argv = [str(ROOT / argv[0]), *argv[1:], "--broker", f"mqtt://127.0.0.1:{port}"]
    else:
        argv = [argv[0], "-p", str(port), *argv[1:]]
    out = await asyncio.to_thread(subprocess.run, argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (command, out.stderr)
    return out.stdout


async def test_the_second_terminal_asks_keep_their_session():
    asks = shell_lines((".venv/bin/vllm-worker ask",))
    assert len(asks) == 2, asks
    async with running_worker(projects=["maze", "driving"]) as w:
        outputs = [await run(ask, w.port) for ask in asks]
    assert outputs[0].strip() == "echo 1: Which way is out?"
    assert outputs[1].strip() == "echo 2: And after that?"  # the second turn saw the first (same session)


async def test_the_classic_mosquitto_examples_get_their_answers():
    need("mosquitto_pub")
    subscribe = shell_lines(("mosquitto_sub",))
    publishes = shell_lines(("mosquitto_pub",))
    assert len(subscribe) == 1
    assert len(publishes) == 2, publishes
    async with running_worker(projects=["maze", "driving"]) as w:
        # -d: its debug lines say when the broker granted the subscription (SUBACK); -C 2: exit after two
        argv = ["stdbuf", "-oL", *shlex.split(subscribe[0].removesuffix("&").strip())]
        argv += ["-p", str(w.port), "-C", "2", "-W", "30", "-d"]
        sub = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert sub.stdout is not None
            await asyncio.to_thread(_until_line, sub.stdout, "received SUBACK")
            for command in publishes:
                await run(command, w.port)
            out, _ = await asyncio.to_thread(sub.communicate, timeout=40)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait(5)
    answers = sorted(line for line in out.splitlines() if line.startswith("maze/"))
    assert answers == [
        "maze/assistant_response/default echo 1: Wall ahead, opening left. Which way?",
        "maze/assistant_response/robot-7 echo 1: Which way?",
    ]


def _until_line(stream: Any, marker: str) -> None:
    for line in stream:
        if marker in line:
            return
    msg = f"mosquitto_sub ended before printing {marker!r}"
    raise AssertionError(msg)


def test_an_ask_typed_while_the_worker_starts_waits_for_it_and_is_answered():
    """`make run` in one terminal, `vllm-worker ask` in the second before the engine is up (the broker already
    listens): the request would reach a broker nobody subscribed on yet and be dropped. The ask waits for a
    worker whose status is ready for the project, then asks: the events come in that order."""
    port = free_port()
    env = {**os.environ, "VLLM_WORKER_FAKE_START_S": "3", "VLLM_WORKER_BROKER__EMBEDDED_PORT": str(port)}
    worker = subprocess.Popen(
        [str(ROOT / ".venv/bin/vllm-worker"), "--engine", "fake", "--projects", "maze"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, worker)  # the broker listens; the engine is still starting
        ask = shell_lines((".venv/bin/vllm-worker ask",))[0]
        argv = [str(ROOT / shlex.split(ask)[0]), *shlex.split(ask)[1:], "--broker", f"mqtt://127.0.0.1:{port}"]
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    finally:
        worker.terminate()
        worker.wait(20)
    assert out.returncode == 0, out.stderr
    assert "waiting for a worker serving maze..." in out.stderr  # said while the engine started
    assert out.stdout.strip() == "echo 1: Which way is out?"  # then answered, once


async def test_the_fleet_snapshot_of_the_tour_lists_the_worker():
    lines = [line for line in shell_lines((".venv/bin/vllm-worker fleet",)) if "--once" in line]
    assert len(lines) == 1, lines
    async with running_worker(projects=["maze"]) as w:
        out = await run(lines[0], w.port)
    assert "test-worker" in out
    assert "ready" in out
