"""py-spy around one benchmark level (issue 16): where a server's front-end spends its CPU.

`bench --profile DIR` records the server process (the worker, or vLLM's API server) with py-spy for
the whole of each level, as collapsed stacks (`DIR/{arm}-c{concurrency}.txt`), and summarises them:
the functions with the most samples on top of the stack (self) and anywhere in it (inclusive), per
thread. py-spy is meant to drop idle threads, but here it kept threads blocked in a queue get, a
select or paho's loop, so the shares include waiting: read a top row such as `_worker
(concurrent/futures/thread.py)` or `select` as idle. Needs ptrace rights (root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
_TID = re.compile(r"^(?:process \d+:\s*)?thread \(\w+\):?\s*")


def available() -> str | None:
    """The py-spy executable, or None (the bench then says so and runs without profiles)."""
    venv = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "py-spy"
    return shutil.which("py-spy") or (str(venv) if venv.exists() else None)


@contextlib.contextmanager
def recording(pid: int, out: Path) -> Iterator[None]:
    """py-spy record on `pid` while the block runs; SIGINT makes it write `out` and exit."""
    exe = available()
    if exe is None:
        yield
        return
    cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--threads", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _frame(raw: str) -> str:
    """`func (pkg/file.py:123)` -> `func (pkg/file.py)`: a function is one row whatever its line."""
    return _LINE.sub(")", raw)


def summarize(path: Path, top: int = 15) -> dict[str, object]:
    """Samples per thread and the top functions by self and inclusive samples (percent of all)."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        head, *frames = stack.split(";")
        thread = _TID.sub("", head) or "(unnamed thread)"
        body = [_frame(f) for f in frames]
        total += n
        threads[thread] += n
        if body:
            own[body[-1]] += n
        for f in set(body):
            anywhere[f] += n

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)] if total else []

    return {"samples": total, "threads": share(threads), "self": share(own), "inclusive": share(anywhere)}


def markdown(name: str, summary: dict[str, object]) -> str:
    """A short report of one profile (what the bench prints and writes next to it)."""
    lines = [f"### {name}: {summary['samples']} samples (100/s)", ""]
    for key in ("threads", "self", "inclusive"):
        rows = summary[key]
        assert isinstance(rows, list)
        lines += [f"{key}:"] + [f"  {pct:5.1f}%  {what}" for what, pct in rows] + [""]
    return "\n".join(lines)
