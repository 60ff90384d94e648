"""What `model.dtype = "auto"` runs on a CPU: bfloat16 where the CPU has bf16 instructions, else float32.

Measured (issue 30): on AVX-512 without avx512_bf16/AMX, the demo model ran 50.7 tok/s in bfloat16 and
99.5 tok/s in float32 at concurrency 8: bf16 arithmetic is emulated there. So `auto` picks float32 on such
a CPU, when the weights at 4 bytes per parameter and the KV cache in float32 fit in RAM; else bfloat16
(slower, but it fits). On a GPU, `auto` stays vLLM's choice. The CPU flags are read once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.engine.plan import param_counts

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
GIB = 2**30
RAM_SHARE = 0.75
"""Of the machine's RAM, what float32 weights + KV cache may take (the rest: runtime, OS, the broker)."""


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    """The dtype the engine runs, and why (said at start-up and in status)."""

    dtype: str
    reason: str


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def choose(
    configured: str, model_config: Mapping[str, Any], *, flags: frozenset[str], ram_gib: float, kv_gib: float
) -> DtypeChoice:
    """The CPU dtype for `configured` ("auto" decides; anything else is kept); `kv_gib`: the KV cache at 4 bytes."""
    if configured != "auto":
        return DtypeChoice(configured, "configured (model.dtype)")
    if flags & BF16_FLAGS:
        return DtypeChoice("bfloat16", f"the CPU has bf16 instructions ({', '.join(sorted(flags & BF16_FLAGS))})")
    try:
        weights_gib = 4 * sum(param_counts(model_config)) / GIB
    except (KeyError, TypeError, ValueError):
        return DtypeChoice("bfloat16", "no bf16 instructions, but the model's size is unknown: kept bfloat16")
    need, room = weights_gib + kv_gib, RAM_SHARE * ram_gib
    if need <= room:
        return DtypeChoice(
            "float32",
            f"no bf16 instructions on this CPU (bf16 would be emulated, about half as fast); float32 weights "
            f"{weights_gib:.1f} GiB + KV {kv_gib:.1f} GiB fit in {room:.0f} GiB",
        )
    return DtypeChoice(
        "bfloat16", f"no bf16 instructions, but float32 ({need:.1f} GiB) would not fit in {room:.0f} GiB of RAM"
    )
