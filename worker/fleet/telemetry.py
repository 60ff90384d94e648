"""Telemetry collectors: GPUs via NVML, the process tree via psutil. The only importer of pynvml.

Collection is blocking (NVML calls, /proc reads), so `collect_*` run in a thread (`asyncio.to_thread`).
No NVML (no driver, no GPU, CPU-only host) degrades to an empty GPU list with one warning, never an
error and never a warning per interval.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import psutil
import structlog

from worker.engine.base import EngineStats
from worker.fleet.reports import EngineReport, GpuReport, ProcessReport

log = structlog.get_logger(__name__)

MIB = 1024 * 1024


class GpuProbe:
    """NVML, initialised lazily once; `available` turns False for good after the first failure."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.available: bool | None = None  # None = not tried yet

    def _init(self) -> bool:
        if self.available is not None:
            return self.available
        try:
            import pynvml  # noqa: PLC0415 - optional at run time: absent driver must not break import

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.available = True
        except Exception as exc:  # noqa: BLE001 - NVMLError_*, ImportError, OSError: all mean "no GPU"
            log.info("telemetry.no_gpu", reason=f"{type(exc).__name__}: {exc}")  # a CPU host: normal
            self.available = False
        return self.available

    def collect(self, pids: set[int], only: set[int] | None = None) -> list[GpuReport]:
        """Memory and utilisation per GPU (`only` those indices: the engine's), and what `pids` hold on each.

        `pids` is the worker's process tree, so every engine rank on this host is counted (blocking call).
        """
        if not self._init():
            return []
        nv = self._nvml
        try:
            gpus = []
            for index in range(nv.nvmlDeviceGetCount()):
                if only is not None and index not in only:
                    continue
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                try:
                    util = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nv.NVMLError:
                    util = 0  # not supported on some (MIG, vGPU) devices
                gpus.append(
                    GpuReport(
                        index=index,
                        name=_text(nv.nvmlDeviceGetName(handle)),
                        mem_used_mib=int(mem.used) // MIB,
                        mem_total_mib=int(mem.total) // MIB,
                        util_pct=util,
                        process_mem_mib=_process_mem(nv, handle, pids) // MIB,
                    )
                )
        except Exception as exc:  # noqa: BLE001 - a driver hiccup must not kill telemetry
            log.warning("telemetry.gpu_read_failed", reason=f"{type(exc).__name__}: {exc}")
            return []
        return gpus

    def close(self) -> None:
        """Release NVML."""
        if self.available and self._nvml is not None:
            self._nvml.nvmlShutdown()
            self.available = None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _process_mem(nv: Any, handle: Any, pids: set[int]) -> int:  # noqa: ANN401 - pynvml is untyped
    try:
        procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
    except nv.NVMLError:
        return 0
    return sum(int(p.usedGpuMemory or 0) for p in procs if p.pid in pids)


def process_tree_pids() -> set[int]:
    """Pids of this process and its children (vLLM's engine core holds the GPU memory)."""
    me = psutil.Process(os.getpid())
    pids = {me.pid}
    with contextlib.suppress(psutil.Error):
        pids.update(c.pid for c in me.children(recursive=True))
    return pids


def collect_process(started_monotonic: float) -> ProcessReport:
    """RSS of the whole process tree and uptime (blocking: reads /proc)."""
    rss = 0
    for pid in process_tree_pids():
        try:
            rss += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return ProcessReport(rss_mib=rss // MIB, uptime_s=int(time.monotonic() - started_monotonic))


def engine_report(stats: EngineStats) -> EngineReport:
    """EngineStats (engine side) -> the wire model."""
    return EngineReport(
        running=stats.running,
        waiting=stats.waiting,
        kv_cache_usage=round(stats.kv_cache_usage, 4),
        prefix_cache_hit_rate=round(stats.prefix_cache_hit_rate, 4),
        prompt_tok_per_s=round(stats.prompt_tok_per_s, 1),
        gen_tok_per_s=round(stats.gen_tok_per_s, 1),
        ttft_ms_p50=round(stats.ttft_ms_p50, 1),
        tpot_ms_p50=round(stats.tpot_ms_p50, 1),
        preemptions=stats.preemptions,
    )
