"""VRAM planner: what N models need on one GPU, and the `gpu_memory_utilization` to give each.

Estimates from each model's `config.json` (architecture facts only):
- weights: linear layers at the method's bits plus its scale/zero overhead (AWQ/GPTQ: fp16 scale + 4-bit
  zero per group), embeddings and lm_head kept in 16-bit (as AWQ/GPTQ checkpoints do);
- KV cache per token: layers x kv_heads x head_dim x 2 (K and V) x KV dtype bytes;
- runtime overhead per engine: CUDA context, activations, CUDA graphs (RUNTIME_OVERHEAD_GIB, a typical
  figure for vLLM with 7-33B models), per GPU;
- with tensor/pipeline parallelism, everything per GPU as vLLM shards it (`parallel.rank_bytes`): the
  largest rank must fit one card.
A plan fits when every engine gets weights + overhead + KV for at least `min_seqs` full-length sequences
within the usable budget; the surplus is split in proportion to what each engine could use
(max_num_seqs full sequences).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.config import resolve_path
from worker.engine.adapters import lora_bytes
from worker.engine.parallel import Layout, check_shape, rank_bytes
from worker.errors import ConfigError

GIB = 2**30
GB = 10**9
RUNTIME_OVERHEAD_GIB = 2.0
USABLE_FRACTION = 0.95  # leave headroom for the driver and fragmentation
ALIASES_DIR = "config/models"
# bytes per weight of a linear layer, and per-group overhead in bytes (scale fp16 + packed zero point)
METHODS: dict[str, tuple[float, float]] = {
    "fp16": (2.0, 0.0),
    "bf16": (2.0, 0.0),
    "fp8": (1.0, 0.0),
    "int8": (1.0, 0.0),
    "awq": (0.5, 2.5),
    "gptq": (0.5, 2.5),
    "bnb4": (0.5, 0.0),  # nf4; its absmax overhead is BNB4_EXTRA_BYTES per weight
    "bnb8": (1.0, 0.0),
}
BNB4_EXTRA_BYTES = 0.0159  # ~0.127 bits per weight of double-quantized absmax (QLoRA paper)
KV_BYTES = {
    "auto": 2,
    "fp16": 2,
    "bf16": 2,
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model to place: a local dir or alias, with a quantization method."""

    name: str
    config: Mapping[str, Any]
    method: str = "fp16"
    group_size: int = 128


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """The planner's figures for one model."""

    name: str
    method: str
    params_b: float
    weights_gib: float
    kv_bytes_per_token: int
    kv_gib_per_seq: float
    overhead_gib: float
    min_need_gib: float
    gpu_memory_utilization: float
    budget_gib: float
    max_full_seqs: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    """Weights, KV and budget figures are per GPU; the model takes tp x pp GPUs."""
    lora_gib: float = 0.0
    """LoRA slots vLLM reserves (max_loras x max_lora_rank on every linear layer), included in weights_gib."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The whole placement."""

    gpu_mem_gib: float
    usable_gib: float
    max_model_len: int
    max_num_seqs: int
    kv_dtype: str
    fits: bool
    models: list[ModelPlan]
    advice: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Machine-readable form (`--json`)."""
        return json.dumps(asdict(self), indent=2)


def parse_size(text: str) -> float:
    """'96GiB', '80GB', '48G' or a number of GiB -> GiB."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read memory size {text!r}; use e.g. 96GiB or 80GB")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    scale = {
        "G": GIB,
        "GB": GB,
        "GIB": GIB,
        "T": 2**40,
        "TB": 10**12,
        "TIB": 2**40,
        "M": 2**20,
        "MB": 10**6,
        "MIB": 2**20,
    }
    if unit not in scale:
        raise ConfigError(f"unknown unit in {text!r}")
    return value * scale[unit] / GIB


def spec_from_config(name: str, config: Mapping[str, Any], method: str) -> ModelSpec:
    """A spec for a model whose config is already loaded; `method` as the quantization pre-flight names it."""
    method = {"none": "fp16", "bitsandbytes": "bnb4", "compressed-tensors": "int8"}.get(method, method)
    qc = config.get("quantization_config") or {}
    group = int(qc.get("group_size", 128) or 128) if isinstance(qc, Mapping) else 128
    return ModelSpec(name, config, method if method in METHODS else "fp16", group if group > 0 else 128)


def load_spec(arg: str) -> ModelSpec:
    """`path-or-alias[:method]`: a local HF dir (config.json) or a bundled alias in config/models/."""
    name, _, method = arg.partition(":")
    path = resolve_path(name)
    alias = resolve_path(ALIASES_DIR) / f"{name}.json"
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    elif alias.is_file():
        config = json.loads(alias.read_text(encoding="utf-8"))
    else:
        known = sorted(p.stem for p in resolve_path(ALIASES_DIR).glob("*.json"))
        raise ConfigError(f"{name}: no local config.json and no alias; known aliases: {', '.join(known)}")
    qc = config.get("quantization_config") or {}
    detected = str(qc.get("quant_method", "")).lower() if isinstance(qc, Mapping) else ""
    method = (method or detected or "fp16").lower()
    method = {"bitsandbytes": "bnb4", "awq_marlin": "awq", "gptq_marlin": "gptq", "bfloat16": "bf16"}.get(
        method, method
    )
    if method not in METHODS:
        raise ConfigError(f"{name}: unknown method {method!r}; one of {', '.join(METHODS)}")
    group = int(qc.get("group_size", 128) or 128) if isinstance(qc, Mapping) else 128
    return ModelSpec(Path(name).name, config, method, group if group > 0 else 128)


def param_counts(config: Mapping[str, Any]) -> tuple[int, int]:
    """(linear-layer params, embedding + lm_head params) of a decoder-only transformer."""
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * inter  # gate, up, down
    embed = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attn + mlp), embed


def weight_bytes(spec: ModelSpec, layout: Layout = Layout()) -> float:  # noqa: B008 - frozen dataclass
    """Weights in bytes for the spec's method, on the largest GPU of `layout` (all of them at tp=pp=1)."""
    per_weight, per_group = METHODS[spec.method]
    extra = BNB4_EXTRA_BYTES if spec.method == "bnb4" else per_group / spec.group_size
    embed_bytes = 1.0 if spec.method in ("fp8", "int8", "bnb8") else 2.0
    return rank_bytes(
        spec.config, layout, bytes_per_weight=per_weight + extra, embed_bytes=embed_bytes, kv_bytes=2
    ).weights


def kv_bytes_per_token(config: Mapping[str, Any], kv_dtype: str, layout: Layout = Layout()) -> int:  # noqa: B008
    """K and V for one token across all layers (on the largest GPU of `layout`)."""
    return rank_bytes(
        config, layout, bytes_per_weight=0, embed_bytes=0, kv_bytes=KV_BYTES.get(kv_dtype, 2)
    ).kv_per_token


def plan(
    specs: list[ModelSpec],
    gpu_mem_gib: float,
    *,
    max_model_len: int,
    max_num_seqs: int,
    kv_dtype: str = "auto",
    min_seqs: int = 4,
    layout: Layout = Layout(),  # noqa: B008 - frozen dataclass
    lora: tuple[int, int] | None = None,
) -> Plan:
    """Place `specs` on GPUs of `gpu_mem_gib` each (one, or tp x pp per model); see the module docstring.

    `lora`: (max_loras, max_lora_rank) when the engines serve LoRA adapters: their slots count as weights.
    """
    usable = gpu_mem_gib * USABLE_FRACTION
    rows = []
    lora_gibs = []
    for spec in specs:
        check_shape(layout, spec.config, method=spec.method, group_size=spec.group_size)
        slots = lora_bytes(spec.config, max_loras=lora[0], max_rank=lora[1]) / GIB / layout.world if lora else 0.0
        lora_gibs.append(slots)
        weights = weight_bytes(spec, layout) / GIB + slots
        per_tok = kv_bytes_per_token(spec.config, kv_dtype, layout)
        per_seq = per_tok * max_model_len / GIB
        rows.append((spec, weights, per_tok, per_seq, weights + RUNTIME_OVERHEAD_GIB + min_seqs * per_seq))
    need = sum(r[4] for r in rows)
    fits = need <= usable
    surplus = max(0.0, usable - need)
    demand = [max(0.0, (max_num_seqs - min_seqs) * r[3]) for r in rows]
    total_demand = sum(demand) or 1.0
    models = []
    for (spec, weights, per_tok, per_seq, min_need), want, slots in zip(rows, demand, lora_gibs, strict=True):
        budget = min_need + min(want, surplus * want / total_demand) if fits else min_need
        seqs = max(0, math.floor((budget - weights - RUNTIME_OVERHEAD_GIB) / per_seq)) if per_seq else 0
        linear, embed = param_counts(spec.config)
        models.append(
            ModelPlan(
                name=spec.name,
                method=spec.method,
                params_b=round((linear + embed) / 1e9, 2),
                weights_gib=round(weights, 2),
                kv_bytes_per_token=per_tok,
                kv_gib_per_seq=round(per_seq, 3),
                overhead_gib=RUNTIME_OVERHEAD_GIB,
                min_need_gib=round(min_need, 2),
                gpu_memory_utilization=round(budget / gpu_mem_gib, 3),
                budget_gib=round(budget, 2),
                max_full_seqs=min(seqs, max_num_seqs),
                tensor_parallel_size=layout.tp,
                pipeline_parallel_size=layout.pp,
                lora_gib=round(slots, 3),
            )
        )
    return Plan(
        gpu_mem_gib,
        round(usable, 2),
        max_model_len,
        max_num_seqs,
        kv_dtype,
        fits,
        models,
        _advice(fits=fits, models=models, need=need, usable=usable, kv=kv_dtype, seqs=max_num_seqs),
    )


def _advice(*, fits: bool, models: list[ModelPlan], need: float, usable: float, kv: str, seqs: int) -> list[str]:
    out: list[str] = []
    if not fits:
        out.append(f"does not fit: needs {need:.1f} GiB of {usable:.1f} GiB usable")
        dense = [m.name for m in models if m.method in ("fp16", "bf16")]
        if dense:
            out.append(f"quantize {', '.join(dense)} (e.g. name:awq: ~3.5x smaller weights)")
        out.append("or shorten --max-model-len, or lower the guaranteed sequences")
    if kv not in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        out.append("--kv-dtype fp8 halves KV-cache memory (twice the concurrent sequences)")
    short = [m.name for m in models if fits and m.max_full_seqs < seqs]
    if short:
        out.append(
            f"{', '.join(short)}: fewer than {seqs} full-length sequences fit; vLLM still batches "
            "more when requests are shorter than max_model_len"
        )
    return out


def check_single(
    spec: ModelSpec,
    gpu_mem_gib: float,
    utilization: float,
    max_model_len: int,
    layout: Layout = Layout(),  # noqa: B008 - frozen dataclass
) -> None:
    """Fail before load when one engine's share of a GPU cannot hold its (per-GPU) weights and one sequence."""
    weights = weight_bytes(spec, layout) / GIB
    per_seq = kv_bytes_per_token(spec.config, "auto", layout) * max_model_len / GIB
    budget = gpu_mem_gib * utilization
    if weights + RUNTIME_OVERHEAD_GIB + per_seq > budget:
        raise ConfigError(
            f"{spec.name} ({spec.method}, {layout.label}) needs ~{weights:.1f} GiB of weights + "
            f"{RUNTIME_OVERHEAD_GIB:.0f} GiB runtime + {per_seq:.1f} GiB KV for one {max_model_len}-token "
            "sequence per GPU, but gets "
            f"{budget:.1f} GiB ({utilization:.2f} x {gpu_mem_gib:.0f} GiB). Quantize it (AWQ ~3.5x smaller), "
            "raise --gpu-memory-utilization, or shorten --max-model-len (see `vllm-worker plan`)."
        )


def cpu_kv_space_gib(
    config: Mapping[str, Any], *, max_model_len: int, max_num_seqs: int, kv_dtype: str, ram_gib: float
) -> int:
    """VLLM_CPU_KVCACHE_SPACE for max_num_seqs full sequences, within [1, a quarter of RAM] GiB."""
    need = kv_bytes_per_token(config, kv_dtype) * max_model_len * max_num_seqs / GIB
    return int(min(max(1, math.ceil(need)), max(1, ram_gib // 4)))
