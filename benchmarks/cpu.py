"""CPU-seconds per process group during one benchmark level (issue 16): where the cores go.

Groups: `engine` (vLLM's engine-core process and its workers), `front-end` (the worker, or vLLM's API
server), `broker` (Mosquitto), `client` (this load generator). A group is a set of root pids and, where
asked, their descendants; a level's figure is the change of user + system time across the level.
AsyncLLM always runs its engine core in a child process; VLLM_ENABLE_V1_MULTIPROCESSING only decides
whether the model runs in that process (0, both cores) or in a further worker process (1). Either way
the server's descendants are the engine and the server process itself is the front-end. In the direct
arm the front-end is the load generator and AsyncLLM's front together (one process).
"""

from __future__ import annotations

import contextlib

import psutil


def group_cpu_s(groups: dict[str, tuple[list[int], bool]]) -> dict[str, float]:
    """User + system CPU-seconds so far per group: name -> (root pids, include descendants)."""
    out: dict[str, float] = {}
    for name, (roots, descendants) in groups.items():
        total = 0.0
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                procs = proc.children(recursive=True) if descendants else [proc]
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        times = p.cpu_times()
                        total += times.user + times.system
        out[name] = total
    return out


def front_and_engine(pid: int) -> dict[str, tuple[list[int], bool]]:
    """A server process (worker or API server): itself as front-end, its descendants as the engine."""
    return {"front-end": ([pid], False), "engine": ([pid], True)}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after - before, per group."""
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in after}
