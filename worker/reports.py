"""Status and telemetry messages (PROTOCOL section 6) as pydantic models.

The worker that publishes them and `vllm-worker fleet` that reads them share these, so they cannot drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

State = Literal["starting", "ready", "draining", "offline"]


class _Wire(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields from newer workers are kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    def to_json(self) -> bytes:
        """Wire bytes."""
        return self.model_dump_json(by_alias=True).encode()


class ParallelReport(_Wire):
    """How the model is split: vLLM's tensor/pipeline parallel sizes, executor backend and the GPUs used."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    backend: str = "mp"
    visible_devices: str | None = None


class StatusReport(_Wire):
    """`vllm-worker/{workerId}/status`, retained; also the Last Will (state offline)."""

    state: State
    worker: str
    projects: list[str]
    model: str
    quantization: str
    version: str
    since: str
    parallel: ParallelReport | None = None
    """Absent from workers older than the parallel settings."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """project -> the LoRA adapter its requests run with (projects without one are absent)."""


class GpuReport(_Wire):
    """One GPU as NVML sees it."""

    index: int
    name: str
    mem_used_mib: int
    mem_total_mib: int
    util_pct: int
    process_mem_mib: int


class EngineReport(_Wire):
    """Engine load and speed (vLLM stat-logger aggregates)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    prompt_tok_per_s: float = 0.0
    gen_tok_per_s: float = 0.0
    ttft_ms_p50: float = 0.0
    tpot_ms_p50: float = 0.0
    preemptions: int = 0


class ProjectReport(_Wire):
    """Per-project counters since start."""

    requests: int = 0
    errors: int = 0
    rejected: int = 0
    sessions: int | None = 0
    """Sessions this worker holds; null when they live in Redis (shared by the fleet)."""


class ProcessReport(_Wire):
    """The worker's process tree (the engine core is a child process)."""

    rss_mib: int
    uptime_s: int


class StateReport(_Wire):
    """Where sessions, dedupe and rate limits live, and whether that backend answers."""

    backend: str
    healthy: bool
    latency_ms: float | None = None
    degraded: bool = False
    """The backend is unreachable: stateful turns are refused, dedupe and rate limits are per worker."""


class TelemetryReport(_Wire):
    """`vllm-worker/{workerId}/telemetry`, every telemetry_interval_s, QoS 0."""

    ts: str
    worker: str
    model: str
    quantization: str
    gpus: list[GpuReport] = Field(default_factory=list)
    engine: EngineReport = Field(default_factory=EngineReport)
    projects: dict[str, ProjectReport] = Field(default_factory=dict)
    process: ProcessReport
    state: StateReport | None = None
    """Absent from workers older than the state layer."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """project -> LoRA adapter loaded for it."""
