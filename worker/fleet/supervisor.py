"""Several models on one GPU: one worker process per model, launched and supervised here.

Why processes, not several engines in one process: each vLLM engine already runs its own engine-core
process, allocates its own CUDA context and sizes its KV cache from `gpu_memory_utilization`; in
separate processes a crash, an out-of-memory or a restart of one model never takes the other down, the
request paths stay independent (no shared event loop or GIL between two busy engines), and each child is
exactly the single-model worker that is already tested. The supervisor only does what one process cannot:
split the GPU with the planner, run the embedded broker once for all, forward SIGTERM (children drain),
and restart a child that dies, with backoff (a crash loop ends with exit 1 for systemd/compose to see).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from worker.config import ModelEntry, WorkerConfig, resolve_path
from worker.engine import plan as planner
from worker.engine.parallel import Layout
from worker.fleet.telemetry import GpuProbe
from worker.transport.broker import EmbeddedBroker

log = structlog.get_logger(__name__)

Say = Callable[[str], None]
MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
MAX_BACKOFF_S = 30.0


def split_gpu(cfg: WorkerConfig) -> list[float | None]:
    """gpu_memory_utilization per model from the planner (None on CPU, or where the config sets one)."""
    gpus = GpuProbe().collect(set())
    if not gpus:
        return [None] * len(cfg.models)
    return plan_models(cfg, [g.mem_total_mib / 1024 for g in gpus])


def plan_models(cfg: WorkerConfig, gpu_total_gib: list[float]) -> list[float | None]:
    """Plan each group of models that share GPUs (same `visible_devices`) on those GPUs' size.

    A model may span GPUs (tensor/pipeline parallel); models on disjoint GPUs are planned apart, models on
    the same GPUs together (with one layout); partly overlapping device sets are refused: the planner could
    not give each GPU a budget.
    """
    from worker.errors import ConfigError  # noqa: PLC0415

    groups: dict[str, list[int]] = {}
    for index, entry in enumerate(cfg.models):
        groups.setdefault(entry.visible_devices or "0", []).append(index)
    device_sets = {key: _devices(key) for key in groups}
    _check_disjoint(device_sets)
    result: list[float | None] = [None] * len(cfg.models)
    for key, indices in groups.items():
        entries = [cfg.models[i] for i in indices]
        layout = _group_layout(key, entries, device_sets[key], len(gpu_total_gib))
        specs = []
        for entry in entries:
            config = json.loads((resolve_path(entry.path) / "config.json").read_text(encoding="utf-8"))
            method = entry.quantization if entry.quantization not in ("auto", "none") else "none"
            specs.append(planner.spec_from_config(Path(entry.path).name, config, method))
        planned = planner.plan(
            specs,
            min(gpu_total_gib[d] for d in device_sets[key]),
            max_model_len=max(e.max_model_len for e in entries),
            max_num_seqs=max(e.max_num_seqs for e in entries),
            layout=layout,
        )
        if not planned.fits:
            raise ConfigError(f"the models on GPUs {key!r} do not fit: " + "; ".join(planned.advice))
        for i, entry, m in zip(indices, entries, planned.models, strict=True):
            result[i] = entry.gpu_memory_utilization or m.gpu_memory_utilization
    return result


def _group_layout(key: str, entries: list[ModelEntry], devices: set[int], host_gpus: int) -> Layout:
    """The one layout of the models on GPUs `key`, checked against the GPUs named and present."""
    from worker.errors import ConfigError  # noqa: PLC0415

    layouts = {Layout(e.tensor_parallel_size, e.pipeline_parallel_size) for e in entries}
    if len(layouts) > 1:
        raise ConfigError(f"models sharing GPUs {key!r} must use the same tensor/pipeline parallel sizes")
    layout = layouts.pop()
    if len(devices) < layout.world or max(devices, default=0) >= host_gpus:
        raise ConfigError(
            f"{layout.label} needs {layout.world} GPU(s): visible_devices {key!r} names {len(devices)}, "
            f"and this host has GPUs 0-{host_gpus - 1}"
        )
    return layout


def _check_disjoint(device_sets: dict[str, set[int]]) -> None:
    from worker.errors import ConfigError  # noqa: PLC0415

    keys = list(device_sets)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if device_sets[a] & device_sets[b]:
                raise ConfigError(
                    f"models on GPUs {a!r} and {b!r} overlap: models sharing a GPU need one visible_devices"
                )


def _devices(visible_devices: str) -> set[int]:
    return {int(p) for p in visible_devices.replace(" ", "").split(",") if p.isdigit()}


class Supervisor:
    """Runs and watches one child worker per `[[models]]` entry."""

    def __init__(self, cfg: WorkerConfig, config_file: Path, base_id: str, extra_args: list[str], say: Say) -> None:
        self._cfg = cfg
        self._file = config_file
        self._base_id = base_id
        self._extra = extra_args
        self._say = say
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._restarts: dict[int, list[float]] = {}
        self.exit_code = 0

    def _argv(self, index: int, broker_url: str, utilization: float | None) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "worker",
            "--config",
            str(self._file),
            "--model-index",
            str(index),
            "--worker-id",
            f"{self._base_id}-m{index}",
            "--broker",
            broker_url,
            *self._extra,
        ]
        if utilization is not None:
            argv += ["--gpu-memory-utilization", f"{utilization:.3f}"]
        return argv

    async def run(self, stop: asyncio.Event) -> int:
        """Supervise until `stop`; then SIGTERM every child and wait for their drain."""
        utilizations = await asyncio.to_thread(split_gpu, self._cfg)
        async with contextlib.AsyncExitStack() as stack:
            url = self._cfg.broker.url
            if url is None:
                broker = await stack.enter_async_context(EmbeddedBroker(self._cfg.broker))
                url = f"mqtt://{self._cfg.broker.embedded_host}:{broker.port}"
            for i, util in enumerate(utilizations):
                await self._start(i, url, util)
            watchers = set()
            for i in self._children:  # a watcher that fails would leave its model dead: stop loudly
                task = asyncio.create_task(self._watch(i, url, utilizations[i], stop))  # supervised: _watcher_ended
                task.add_done_callback(lambda t: self._watcher_ended(t, stop))
                watchers.add(task)
            await stop.wait()
            await self._terminate_all()
            for task in watchers:
                task.cancel()
        return self.exit_code

    async def _start(self, index: int, url: str, utilization: float | None) -> None:
        entry = self._cfg.models[index]
        self._say(f"model {index} ({entry.path}, projects {', '.join(entry.projects)}) starting")
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which forwards one SIGTERM (drain).
        self._children[index] = await asyncio.create_subprocess_exec(
            *self._argv(index, url, utilization), start_new_session=True
        )

    def _watcher_ended(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("supervisor.watcher_failed", exc_info=task.exception())
        self._say("internal error: a model watcher failed; stopping with status 1")
        self.exit_code = 1
        stop.set()

    async def _watch(self, index: int, url: str, utilization: float | None, stop: asyncio.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            code = await self._children[index].wait()
            if stop.is_set():
                return
            now = time.monotonic()
            recent = [t for t in self._restarts.get(index, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= MAX_RESTARTS:
                log.error("supervisor.crash_loop", model=index, exit_code=code)
                self._say(
                    f"model {index} keeps crashing ({MAX_RESTARTS} restarts in {RESTART_WINDOW_S:.0f} s): stopping"
                )
                self.exit_code = 1
                stop.set()
                return
            self._restarts[index] = [*recent, now]
            log.warning("supervisor.child_died", model=index, exit_code=code, restart_in_s=backoff)
            self._say(f"model {index} exited with {code}: restarting in {backoff:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            if stop.is_set():
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            await self._start(index, url, utilization)

    async def _terminate_all(self) -> None:
        alive = [p for p in self._children.values() if p.returncode is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        grace = self._cfg.worker.drain_timeout_s + 15
        waits = [asyncio.create_task(p.wait()) for p in alive]  # supervised: awaited on the next line
        _, pending = await asyncio.wait(waits, timeout=grace)
        for proc in alive:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=5)
        codes = [p.returncode for p in self._children.values()]
        if any(c not in (0, None) for c in codes) and self.exit_code == 0:
            self.exit_code = 1
