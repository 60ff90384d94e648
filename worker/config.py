"""Worker configuration: one pydantic tree, loaded with precedence defaults < file < env < flags.

Env variables are `VLLM_WORKER_<SECTION>__<FIELD>` (e.g. `VLLM_WORKER_BROKER__PASSWORD`); lists and
tables are given as JSON (`VLLM_WORKER_WORKER__PROJECTS='["maze"]'`). pydantic-settings reads and merges
the layers (`_Layered`); `load` validates the result as one `WorkerConfig`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from worker.errors import ConfigError

ENV_PREFIX = "VLLM_WORKER_"
ROOT = Path(__file__).resolve().parent.parent
"""The source checkout (or install prefix); relative paths fall back to it when absent from the cwd."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BrokerConfig(_Section):
    """Where the worker's MQTT traffic goes."""

    url: str | None = None
    """`mqtt://host:port` or `mqtts://host:port`; None runs the embedded broker."""
    embedded_host: str = "127.0.0.1"
    embedded_port: int = 1883
    username: str | None = None
    password: SecretStr | None = None
    password_file: str | None = None
    """Read the password from this file (a container secret) when `password` is not set."""
    ca_file: str | None = None
    cert_file: str | None = None
    """Client certificate for mqtts:// brokers that require one (with `key_file`)."""
    key_file: str | None = None
    client_id: str | None = None
    keepalive_s: int = 30
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    connect_timeout_s: float = 15.0
    session_expiry_s: int = Field(3600, ge=0)
    """A worker's MQTT 5 session (its unacked requests) survives a restart this long; 0 = clean sessions."""
    max_queued_replies: int = Field(10_000, gt=0)
    """Replies buffered while the broker is unreachable; beyond this they are dropped and logged."""

    @field_validator("embedded_host")
    @classmethod
    def _loopback_only(cls, host: str) -> str:
        if not (host in {"localhost", "::1"} or host.startswith("127.")):
            raise ValueError(
                "the embedded broker has no authentication, so it binds loopback only; "
                "run Mosquitto (deploy/) to serve other machines"
            )
        return host

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is None or url == "":
            return None
        parts = urlsplit(url)
        if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
            raise ValueError(f"broker url must look like mqtt://host:port or mqtts://host:port, got {url!r}")
        return url

    def secret(self) -> str | None:
        """The password: `password`, else the content of `password_file` (stripped), else None."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file:
            try:
                return Path(self.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read broker.password_file {self.password_file}: {exc.strerror}") from exc
        return None

    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) of the broker to connect to."""
        if self.url is None:
            return self.embedded_host, self.embedded_port, False
        parts = urlsplit(self.url)
        tls = parts.scheme == "mqtts"
        return parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883), tls


class ModelConfig(_Section):
    """The model and how vLLM loads it."""

    path: str = "models/smollm2-135m-instruct"
    """A local HF model directory (no hub downloads at run time)."""
    name: str | None = None
    """Name reported on the wire; defaults to the directory name."""
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    max_model_len: int = Field(2048, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    """Tokens per engine step (prefill chunking); None = vLLM's default."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    visible_devices: str | None = None
    enforce_eager: bool | None = None
    """None = eager on CPU (13 s start vs 110 s for torch.compile there), compiled on GPU."""
    cpu_kvcache_space_gib: int | None = Field(None, gt=0)
    """KV cache on CPU in GiB (VLLM_CPU_KVCACHE_SPACE); None = sized by the planner for max_num_seqs."""
    chat_template: str | None = None
    """A Jinja chat template file rendered instead of the model's own (e.g. one that renders tools)."""
    tool_call_parser: str | None = "auto"
    """vLLM's tool-call parser (`--tool-call-parser` names: hermes, llama3_json, mistral, ...); `auto`
    chooses from the chat template (`engine/chat_templates.py`); None: requests with tools are refused."""
    reasoning_parser: str | None = None
    """vLLM's reasoning parser (`--reasoning-parser` names: deepseek_r1, qwen3, ...): reasoning is split off
    by it instead of the `<think>` filter, and a project that keeps reasoning gets it as v2 `reasoning`."""
    enable_prefix_caching: bool = True
    block_size: int | None = Field(None, ge=1, le=1024)
    """KV-cache block size in tokens; None: vLLM's (128 on CPU, 16 on most GPUs). The prefix cache reuses
    whole blocks, so smaller blocks reuse more of a conversation (on CPU keep it a multiple of 32)."""
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    """"priority" lets a request's `priority` field (lower first) reorder the engine's waiting queue."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs one model's layers are split across (vLLM's TP); heads must divide by it."""
    pipeline_parallel_size: int = Field(1, ge=1, le=64)
    """Pipeline stages (vLLM's PP), e.g. one per node with `ray`."""
    distributed_executor_backend: Literal["mp", "ray"] = "mp"
    """How vLLM starts the ranks when TP x PP > 1: processes on this host (mp), or a Ray cluster (ray)."""
    enable_lora: bool | None = None
    """Serve LoRA adapters; None = when a served project names one (true also allows hot-loading later)."""
    max_loras: int = Field(4, ge=1, le=64)
    """Adapters in one batch (vLLM's max_loras): each slot costs GPU memory (see `vllm-worker plan`)."""
    max_lora_rank: int = Field(16, ge=1, le=512)
    max_cpu_loras: int | None = Field(None, ge=1)
    """Adapters kept loaded in host memory (vLLM's max_cpu_loras; None = max_loras)."""
    adapters_dir: str = "models/adapters"
    """Hot swap (control topic) loads adapters from directories under this one only."""


class GenerationConfig(_Section):
    """Worker-wide generation limits (each project may narrow them)."""

    max_tokens: int = Field(1024, gt=0)
    """Worker-wide cap on answer length (the old --max_tokens); projects and requests may ask for less."""
    ignore_eos: bool = False
    """Benchmarks only: always generate maxTokens tokens (fixed output length across arms)."""


class SessionsConfig(_Section):
    """Per-(project, session) chat history (kept where `state.url` says)."""

    max_history_tokens: int = Field(1024, ge=0)
    max_sessions: int = Field(10_000, gt=0)
    idle_ttl_s: float = Field(3600.0, gt=0)


class WorkerSection(_Section):
    """What this worker serves and its intake limits."""

    projects: list[str] = Field(default_factory=lambda: ["maze", "driving"])
    topics_dir: str = "topics"
    topic_prefix: str = ""
    id: str | None = None
    max_payload_bytes: int = Field(256 * 1024, gt=0)
    max_inflight: int = Field(256, gt=0)
    """Requests accepted at once (running + waiting in the engine); more get `overloaded`."""
    max_inflight_per_session: int = Field(8, gt=0)
    """Turns of one session accepted at once (they run one after another); more get `overloaded`."""
    max_inflight_per_client: int = Field(128, gt=0)
    """Requests of one client (v2 clientId, else sessionId) accepted at once; more get `overloaded`."""
    retry_after_ms: int = Field(500, ge=0)
    stream_interval_ms: int = Field(50, ge=0)
    """v2 streaming: at most one chunk per this many ms ..."""
    stream_max_tokens: int = Field(16, gt=0)
    """... or per this many tokens, whichever comes first."""
    dedupe_window_s: float = Field(600.0, ge=0)
    """A requestId seen within this window is not generated again (its final reply is re-sent)."""
    dedupe_max_entries: int = Field(10_000, gt=0)
    """Bound on cached final replies (oldest forgotten first; on Redis per project, fleet-wide)."""
    dedupe_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    """Bound on their bytes (key + topic + payload + correlation data; on Redis as stored, per project)."""
    share_group: str = Field("vllm-worker", pattern=r"^[A-Za-z0-9_.-]*$")
    """MQTT 5 shared-subscription group: workers of a group split each project ("" = every worker gets all)."""
    receive_maximum: int | None = Field(None, gt=0)
    """MQTT 5 ReceiveMaximum: unacked requests the broker may hand this worker (None = 2 x max_num_seqs)."""
    takeover_after_s: float = Field(30.0, ge=0)
    """A peer whose status says offline this long has its broker session (its queued share) served and
    ended by one live worker (share group on MQTT 5 with Redis state only; 0 = never)."""
    affinity: bool = True
    """Session affinity (docs/protocol.md section 4a): a v2 session's next turn may come straight to the worker
    holding its KV cache, on `{project}/worker/{id}/user_input`. On only with Redis state (a resend must be
    deduplicated fleet-wide)."""
    affinity_max_waiting: int = Field(4, ge=0)
    """Shed affinity (stop inviting sticky turns) while more requests than this wait in the engine."""
    affinity_max_kv_usage: float = Field(0.8, ge=0, le=1)
    """... or while the engine's KV cache is fuller than this."""
    telemetry_interval_s: float = Field(5.0, gt=0)
    """Period of `vllm-worker/{id}/telemetry` messages."""
    project_telemetry: bool = False
    homeassistant_discovery: bool = False
    """Publish retained Home Assistant MQTT discovery configs: this worker's sensors show up by themselves."""
    homeassistant_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """Home Assistant's discovery prefix (its MQTT integration's setting)."""
    """Also publish `{project}/telemetry`, narrowed to each project, for project dashboards."""
    drain_timeout_s: float = Field(5.0, ge=0)
    """In-flight requests get this long to finish on SIGTERM/Ctrl-C; the rest are answered `shutting_down`."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """`auto`: uvloop where installed (it comes with vLLM; less CPU per streamed chunk), else asyncio."""


class StateConfig(_Section):
    """Where sessions, dedupe and rate-limit budgets live: this process, or Redis/Valkey for a fleet."""

    url: SecretStr = SecretStr("memory")
    """`memory` (one worker; lost on restart) or `redis://[:password@]host:port/db` / `rediss://...` (shared)."""
    lease_s: float = Field(10.0, ge=0.3, le=300)
    """Redis: a session lock or requestId claim of a worker that died is released after this long."""
    op_timeout_s: float = Field(1.0, gt=0, le=30)
    """Redis: one operation (connect included) fails after this long, and the backend counts as down."""
    key_prefix: str = Field("vw", pattern=r"^[A-Za-z0-9_.:-]{1,32}$")
    """Redis: every key starts `{key_prefix}/{topic_prefix}{project}/`."""
    usage_retention_days: int = Field(35, ge=1, le=3660)
    """Usage counters per UTC day are kept this long (Redis: as the keys' TTL)."""
    usage_max_clients: int = Field(1000, ge=1, le=1_000_000)
    """Clients counted by name per project and day; the rest count together as `(other)`."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: SecretStr) -> SecretStr:
        value = url.get_secret_value()
        parts = urlsplit(value)
        if value != "memory" and (parts.scheme not in {"redis", "rediss"} or not parts.hostname):
            raise ValueError("state url must be `memory` or look like redis://host:port/db or rediss://host:port/db")
        return url


class LogConfig(_Section):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    json_format: bool = False


class ModelEntry(ModelConfig):
    """One of several models on one GPU (`[[models]]`): a model config plus the projects it serves."""

    projects: list[str] = Field(min_length=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # type: ignore[assignment]
    """None = the planner's split."""


class WorkerConfig(_Section):
    """The whole configuration of one worker process."""

    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    log: LogConfig = Field(default_factory=LogConfig)
    models: list[ModelEntry] = Field(default_factory=list)
    """Several models on one GPU: the worker supervises one process per entry (see `supervisor`)."""

    def for_model(self, index: int, utilization: float | None) -> WorkerConfig:
        """The single-model config of entry `index` (what its child process runs)."""
        entry = self.models[index]
        model = ModelConfig.model_validate(
            {
                **entry.model_dump(exclude={"projects", "gpu_memory_utilization"}),
                "gpu_memory_utilization": entry.gpu_memory_utilization or utilization or 0.9,
            }
        )
        worker = self.worker.model_copy(update={"projects": entry.projects})
        return self.model_copy(update={"model": model, "worker": worker, "models": []})


def resolve_path(path: str) -> Path:
    """A relative path as given if it exists under the cwd, else under the checkout root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    fallback = ROOT / p
    return fallback if fallback.exists() else p


class _Layered(BaseSettings, WorkerConfig):
    """`WorkerConfig` read through pydantic-settings: flags > `VLLM_WORKER_*` env > TOML file > defaults.

    pydantic-settings deep-merges the layers (a flag sets one field of a section, not the section), parses
    env values of lists and tables as JSON, and nests on `__`; the result is validated once, as a whole.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False, extra="forbid", toml_file=None
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The precedence, first wins: CLI flags (init), the environment, the TOML file; no .env, no secrets dir."""
        del dotenv_settings, file_secret_settings
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load(file: Path | None = None, flags: Mapping[str, Any] | None = None) -> WorkerConfig:
    """Build the config: defaults < TOML `file` < `VLLM_WORKER_*` environment < CLI `flags` (nested dicts)."""
    if file is not None:
        try:
            tomllib.loads(file.read_text(encoding="utf-8"))  # a missing or broken file is an error, not "no file"
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from exc
    layered = type("_FromFile", (_Layered,), {"model_config": {**_Layered.model_config, "toml_file": file}})
    try:
        values = layered(**(flags or {}))
    except SettingsError as exc:
        raise ConfigError(f"invalid environment variable: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration:\n{exc}") from exc
    return WorkerConfig.model_validate(dict(values))
