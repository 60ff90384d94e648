"""Status and telemetry messages (PROTOCOL section 6) as pydantic models.

The worker that publishes them and `vllm-worker fleet` that reads them share these, so they cannot drift.
Every field is bounded: what `fleet` and the console read comes from anyone who can publish on the broker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

State = Literal["starting", "ready", "draining", "offline"]

# Field size limits, generous for real workers (ids and project names <= 128 chars, a model is a directory
# name or a configured name) and small enough that a hostile report cannot hold megabytes.
ID_CHARS = 256
NAME_CHARS = 1024
WORD_CHARS = 64
MAX_ENTRIES = 256
MAX_GPUS = 64
MAX_CLIENTS = 16
MAX_INT = 2**53
Id = Annotated[str, Field(max_length=ID_CHARS)]
"""Worker ids and project names (a hostname is at most 253 characters)."""
Name = Annotated[str, Field(max_length=NAME_CHARS)]
"""Models, adapters, GPU names, device lists."""
Word = Annotated[str, Field(max_length=WORD_CHARS)]
"""Quantization methods, versions, timestamps, backend names."""
Int = Annotated[int, Field(ge=-MAX_INT, le=MAX_INT)]
"""Counters and sizes: exact in JavaScript too, and never a 4,000-digit number."""


class _Wire(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields from newer workers are kept."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    def to_json(self) -> bytes:
        """Wire bytes."""
        return self.model_dump_json(by_alias=True).encode()


class ParallelReport(_Wire):
    """How the model is split: vLLM's tensor/pipeline parallel sizes, executor backend and the GPUs used."""

    tensor_parallel_size: Int = 1
    pipeline_parallel_size: Int = 1
    backend: Word = "mp"
    visible_devices: Name | None = None


class StatusReport(_Wire):
    """`vllm-worker/{workerId}/status`, retained; also the Last Will (state offline)."""

    state: State
    worker: Id
    projects: list[Id] = Field(max_length=MAX_ENTRIES)
    model: Name
    quantization: Word
    version: Word
    since: Word
    parallel: ParallelReport | None = None
    """Absent from workers older than the parallel settings."""
    adapters: dict[Id, Name] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    """project -> the LoRA adapter its requests run with (projects without one are absent)."""
    dtype: Word = ""
    """The dtype the engine runs (`auto` resolved on CPU); empty from older workers."""
    dtype_reason: Name = ""
    """Why that dtype (e.g. the CPU has no bf16 instructions)."""


class GpuReport(_Wire):
    """One GPU as NVML sees it."""

    index: Int
    name: Name
    mem_used_mib: Int
    mem_total_mib: Int
    util_pct: Int
    process_mem_mib: Int


class EngineReport(_Wire):
    """Engine load and speed (vLLM stat-logger aggregates)."""

    running: Int = 0
    waiting: Int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    prompt_tok_per_s: float = 0.0
    gen_tok_per_s: float = 0.0
    ttft_ms_p50: float = 0.0
    tpot_ms_p50: float = 0.0
    preemptions: Int = 0


class ProjectReport(_Wire):
    """Per-project counters since start."""

    requests: Int = 0
    errors: Int = 0
    rejected: Int = 0
    prompt_tokens: Int = 0
    """Tokens this worker spent for the project since it started (`vllm-worker usage` without Redis)."""
    completion_tokens: Int = 0
    cached_tokens: Int = 0
    tokens_today: Int = 0
    """Prompt + completion tokens this worker spent for the project today (UTC)."""
    top_clients: dict[Id, Int] = Field(default_factory=dict, max_length=MAX_CLIENTS)
    """The clients that spent the most tokens (prompt + completion) here since start, at most 16."""
    sessions: Int | None = 0
    """Sessions this worker holds; null when they live in Redis (shared by the fleet)."""


class ProcessReport(_Wire):
    """The worker's process tree (the engine core is a child process)."""

    rss_mib: Int
    uptime_s: Int
    unacked: Int = 0
    """Inbound QoS1 messages taken from the broker and not acknowledged yet: requests in flight (share
    group) or waiting for the intake; it returns to 0 when the worker is idle, else a message is stuck."""


class StateReport(_Wire):
    """Where sessions, dedupe and rate limits live, and whether that backend answers."""

    backend: Word
    healthy: bool
    latency_ms: float | None = None
    degraded: bool = False
    """The backend is unreachable: stateful turns are refused, dedupe and rate limits are per worker."""


class TelemetryReport(_Wire):
    """`vllm-worker/{workerId}/telemetry`, every telemetry_interval_s, QoS 0."""

    ts: Word
    worker: Id
    model: Name
    quantization: Word
    gpus: list[GpuReport] = Field(default_factory=list, max_length=MAX_GPUS)
    engine: EngineReport = Field(default_factory=EngineReport)
    projects: dict[Id, ProjectReport] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    process: ProcessReport
    state: StateReport | None = None
    """Absent from workers older than the state layer."""
    adapters: dict[Id, Name] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    """project -> LoRA adapter loaded for it."""
    affinity: bool | None = None
    """Whether the worker invites sticky turns now (on, and its engine not loaded); absent when affinity is off."""
