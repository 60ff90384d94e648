"""Models bigger than one GPU: vLLM's own tensor and pipeline parallelism (DESIGN section 5).

`Layout` is what the worker asks vLLM for (`tensor_parallel_size`, `pipeline_parallel_size`,
`distributed_executor_backend`); `check` refuses, before anything loads and in one sentence, a layout
vLLM would refuse later or that cannot run here; `rank_bytes` sizes the largest rank the way vLLM
shards a decoder (read from vLLM 0.32's source):
- attention heads split by TP; KV heads split by TP, or replicated (one per rank) when TP >= KV heads
  (`QKVParallelLinear`); MLP columns/rows split by TP;
- vocabulary padded to a multiple of 64, then split by TP (`VocabParallelEmbedding`, `ParallelLMHead`);
- layers split by PP as `get_pp_indices` does (the remainder goes to the ranks before the last); the
  embedding lives on the first rank, the LM head on the last (a tied head is a second copy there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from worker.errors import ConfigError

VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128  # vLLM's GPTQ_MARLIN_MIN_THREAD_N / _K: per-shard minimum sizes
Backend = Literal["mp", "ray"]


@dataclass(frozen=True, slots=True)
class Layout:
    """How one model is split: `tp` GPUs per stage, `pp` stages, launched by `backend`."""

    tp: int = 1
    pp: int = 1
    backend: Backend = "mp"

    @property
    def world(self) -> int:
        """GPUs (or CPU ranks) the model needs."""
        return self.tp * self.pp

    @property
    def label(self) -> str:
        """e.g. `tp2`, `tp4-pp2 (ray)`."""
        text = f"tp{self.tp}" + (f"-pp{self.pp}" if self.pp > 1 else "")
        return text + (" (ray)" if self.backend == "ray" else "")


@dataclass(frozen=True, slots=True)
class Shape:
    """The architecture facts sharding depends on (from config.json)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Shape:
        """Read from a HF config; missing keys are a ConfigError."""
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                inter=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config.json lacks what sharding needs: {exc}") from exc


def pp_partitions(layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as vLLM's `get_pp_indices` assigns them (without VLLM_PP_LAYER_PARTITION)."""
    parts = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        parts[-i] += 1
    return parts


def check(
    layout: Layout,
    config: Mapping[str, Any],
    *,
    gpus: int | None,
    cpu_cores: int,
    method: str = "none",
    group_size: int = 128,
) -> None:
    """Refuse a layout that cannot work, before load. `gpus`: visible GPUs (None: CPU host)."""
    check_shape(layout, config, method=method, group_size=group_size)
    _check_devices(layout, gpus, cpu_cores)


def check_shape(layout: Layout, config: Mapping[str, Any], *, method: str = "none", group_size: int = 128) -> None:
    """The part of `check` that needs only the model: heads, KV heads, layers, quantized shard sizes."""
    s = Shape.of(config)
    _check_split(s, layout)
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin") and layout.tp > 1:
        _check_marlin_shards(s, layout.tp, group_size)


def _check_split(s: Shape, layout: Layout) -> None:
    if layout.tp < 1 or layout.pp < 1:
        raise ConfigError("tensor_parallel_size and pipeline_parallel_size must be at least 1")
    if s.heads % layout.tp:
        raise ConfigError(
            f"the model's {s.heads} attention heads are not divisible by tensor_parallel_size {layout.tp}; "
            f"use one of {', '.join(str(t) for t in _divisors(s.heads))}"
        )
    if s.kv_heads % layout.tp and layout.tp % s.kv_heads:
        raise ConfigError(
            f"tensor_parallel_size {layout.tp} must divide the model's {s.kv_heads} KV heads or be a multiple "
            "of them (vLLM replicates KV heads only in whole copies)"
        )
    if layout.pp > s.layers:
        raise ConfigError(f"pipeline_parallel_size {layout.pp} exceeds the model's {s.layers} layers")
    if s.layers % layout.pp and not os.environ.get("VLLM_PP_LAYER_PARTITION"):
        raise ConfigError(
            f"the model's {s.layers} layers do not split evenly into {layout.pp} pipeline stages "
            f"(vLLM would use {pp_partitions(s.layers, layout.pp)}); pick a divisor or set VLLM_PP_LAYER_PARTITION"
        )


def _check_devices(layout: Layout, gpus: int | None, cpu_cores: int) -> None:
    if gpus is None and layout.backend == "ray":
        raise ConfigError(
            "vLLM's CPU backend cannot run the ray executor (it says: current platform cpu does not support "
            'ray): use distributed_executor_backend = "mp" on CPU hosts'
        )
    if layout.backend == "ray":
        return  # the cluster's GPUs are checked by `check_ray` (it connects)
    if gpus is None:
        if cpu_cores < layout.world:
            raise ConfigError(
                f"{layout.label} runs {layout.world} CPU ranks, each bound to its own cores, but this machine "
                f"has {cpu_cores} usable core(s)"
            )
    elif gpus < layout.world:
        raise ConfigError(
            f"{layout.label} needs {layout.world} GPUs on this host but {gpus} are visible "
            '(set visible_devices, or use distributed_executor_backend = "ray" across nodes)'
        )


def _check_marlin_shards(s: Shape, tp: int, group_size: int) -> None:
    """AWQ/GPTQ (Marlin) kernels need every shard's sizes aligned: checked for each split linear layer."""
    column = {"qkv": s.heads * s.head_dim // tp, "gate_up": s.inter // tp}  # output split: n per shard
    row = {"o_proj": s.heads * s.head_dim // tp, "down_proj": s.inter // tp}  # input split: k per shard
    for name, n in column.items():
        if n % MARLIN_MIN_N:
            raise ConfigError(f"{name} shards of {n} outputs are not a multiple of {MARLIN_MIN_N} at tp {tp}")
    for name, k in row.items():
        if k % MARLIN_MIN_K or (group_size > 0 and k % group_size):
            raise ConfigError(
                f"{name} shards of {k} inputs at tp {tp} are not a multiple of {MARLIN_MIN_K} and of the "
                f"checkpoint's group size {group_size}: the quantized kernels cannot split it; lower the tp"
            )


def check_ray(layout: Layout, address: str | None = None) -> None:
    """With `ray`: a cluster must answer and hold `world` GPUs (raises ConfigError otherwise)."""
    try:
        import ray  # noqa: PLC0415 - optional: only multi-node deployments install it
    except ImportError as exc:
        raise ConfigError("distributed_executor_backend = \"ray\" needs ray: pip install 'ray[default]'") from exc
    try:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", ignore_reinit_error=True)
        gpus = int(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call,unused-ignore]
    except Exception as exc:
        raise ConfigError(f"no Ray cluster answers ({type(exc).__name__}): start `ray start --head` first") from exc
    if gpus and gpus < layout.world:
        raise ConfigError(f"{layout.label} needs {layout.world} GPUs but the Ray cluster has {gpus}")


@dataclass(frozen=True, slots=True)
class RankBytes:
    """What the largest rank holds: weight bytes, and KV-cache bytes per token."""

    weights: float
    kv_per_token: int


def rank_bytes(
    config: Mapping[str, Any], layout: Layout, *, bytes_per_weight: float, embed_bytes: float, kv_bytes: int
) -> RankBytes:
    """Per-GPU sizes under `layout` (see the module docstring); the maximum over pipeline stages."""
    s = Shape.of(config)
    tp = layout.tp
    heads_r = s.heads // tp if s.heads % tp == 0 else -(-s.heads // tp)
    kv_r = max(1, s.kv_heads // tp)
    per_layer = s.hidden * s.head_dim * (2 * heads_r + 2 * kv_r) + 3 * s.hidden * -(-s.inter // tp)
    vocab_r = -(-s.vocab // VOCAB_PADDING) * VOCAB_PADDING // tp
    vocab_matrix = vocab_r * s.hidden * embed_bytes
    stages = pp_partitions(s.layers, layout.pp)
    worst_w, worst_kv = 0.0, 0
    for rank, layers in enumerate(stages):
        weights = layers * per_layer * bytes_per_weight
        if rank == 0:
            weights += vocab_matrix  # embedding
        if rank == len(stages) - 1 and (not s.tied or len(stages) > 1):
            weights += vocab_matrix  # LM head (a tied one is a copy when it is not on the first rank)
        worst_w = max(worst_w, weights)
        worst_kv = max(worst_kv, layers * kv_r * s.head_dim * 2 * kv_bytes)
    return RankBytes(worst_w, worst_kv)


def cpu_binding(layout: Layout, cores: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world` CPU ranks: the cores split into equal, disjoint ranges."""
    per = len(cores) // layout.world
    groups = [cores[i * per : (i + 1) * per] for i in range(layout.world)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and d <= 16]  # noqa: PLR2004 - GPUs per node
