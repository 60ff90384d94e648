"""Real worker processes (vLLM CPU engine, embedded broker): one shared per test session, plus
`launch_worker` for tests that need their own (quantized models, engine death)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def launch_worker(*args: str, worker_id: str = "e2e-worker") -> Iterator[WorkerProcess]:
    """Start `python -m worker` on a free port; yields once it printed `ready`; kills what is left."""
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"demo model missing at {MODEL_DIR}: run `make model` (make test does it)")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_WORKER_WORKER__TELEMETRY_INTERVAL_S": "1"}
    cmd = [sys.executable, "-m", "worker", "--port", str(port), "--worker-id", worker_id, *args]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    w = WorkerProcess(proc, port)
    ready = threading.Event()
    pump = threading.Thread(target=_pump, args=(w, ready), daemon=True)
    pump.start()
    try:
        if not ready.wait(READY_TIMEOUT_S) or proc.poll() is not None:
            pytest.fail(f"worker not ready within {READY_TIMEOUT_S} s:\n{w.log()[-4000:]}")
        w.start_s = time.monotonic() - started
        print(f"\n[e2e] worker {' '.join(args)} ready in {w.start_s:.1f} s (process start to ready)", file=sys.stderr)
        yield w
    finally:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        pump.join(10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture(scope="session")
def worker_process() -> Iterator[WorkerProcess]:
    with launch_worker("--projects", "maze", "driving", "general", "--model", str(MODEL_DIR)) as w:
        yield w
