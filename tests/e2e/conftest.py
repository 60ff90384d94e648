"""One real worker process (vLLM CPU engine on the demo model, embedded broker) per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from support import MODEL_DIR, ROOT, WorkerProcess, free_port

READY_TIMEOUT_S = 240


def _pump(w: WorkerProcess, ready: threading.Event) -> None:
    assert w.proc.stderr is not None
    for line in w.proc.stderr:
        w.lines.append(line)
        if "vllm-worker: ready" in line:
            ready.set()


@pytest.fixture(scope="session")
def worker_process() -> Iterator[WorkerProcess]:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"demo model missing at {MODEL_DIR}: run `make model` (make test does it)")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_WORKER_WORKER__TELEMETRY_INTERVAL_S": "1"}
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "--port",
        str(port),
        "--worker-id",
        "e2e-worker",
        "--projects",
        "maze",
        "driving",
        "general",
        "--model",
        str(MODEL_DIR),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    w = WorkerProcess(proc, port)
    ready = threading.Event()
    pump = threading.Thread(target=_pump, args=(w, ready), daemon=True)
    pump.start()
    if not ready.wait(READY_TIMEOUT_S):
        proc.kill()
        pytest.fail(f"worker not ready within {READY_TIMEOUT_S} s:\n{w.log()[-4000:]}")
    w.start_s = time.monotonic() - started
    print(f"\n[e2e] worker ready in {w.start_s:.1f} s (process start to ready)", file=sys.stderr)
    yield w
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    pump.join(10)
    assert proc.stderr is not None
    proc.stderr.close()
