"""Quantization pre-flight: decide what vLLM gets and refuse, before the engine loads, what cannot work.

vLLM fails late (after minutes of loading) or silently falls back for several misconfigurations, and
some methods moved: bitsandbytes left vLLM's tree in 0.32 (the `vllm-bnb-plugin` package brings it
back), `squeezellm` is gone. `plan()` is table-driven over (requested method, what the checkpoint says,
device) and raises `ConfigError` with one actionable sentence. The list of methods and their minimum GPU
capabilities come from the installed vLLM (`VllmSupport`, filled by the engine adapter), never a hand copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.config import ModelConfig
from worker.errors import ConfigError

AWQ = frozenset({"awq", "awq_marlin", "auto_awq"})
GPTQ = frozenset({"gptq", "gptq_marlin", "auto_gptq"})
REMOVED = {
    "squeezellm": "squeezellm was removed from vLLM; use a pre-quantized AWQ or GPTQ model instead",
    "marlin": "the standalone 'marlin' method was removed; use --quantization awq or gptq (Marlin is automatic)",
    "gguf": "GGUF left vLLM's tree in 0.32; convert the model to a HF directory first",
}
MARLIN_MIN_CAPABILITY = 75  # vLLM 0.32 marlin_utils.query_marlin_supported_quant_types
FP8_NATIVE_CAPABILITY = 89  # Ada/Hopper: FP8 tensor cores; below that vLLM runs FP8 weights through Marlin (W8A16)
PLUGIN_HINT = "pip install --no-deps vllm-bnb-plugin (--no-deps: its bare `vllm` requirement would pull CUDA vLLM)"


@dataclass(frozen=True, slots=True)
class Device:
    """Where the engine runs."""

    kind: Literal["cpu", "cuda"]
    capability: int | None = None  # e.g. 89 for compute capability 8.9
    name: str = "cpu"


@dataclass(frozen=True, slots=True)
class VllmSupport:
    """What the installed vLLM can do."""

    methods: frozenset[str]
    min_capability: Mapping[str, int] = field(default_factory=dict)
    marlin_group_sizes: frozenset[int] = frozenset({-1, 32, 64, 128})
    bnb_plugin: bool = False
    kv_cache_dtypes: frozenset[str] = frozenset({"auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16"})


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """The decision: `engine_arg` goes to vLLM's `quantization=`; `kernel` is logged and reported."""

    method: str
    engine_arg: str | None
    kernel: str
    notes: tuple[str, ...] = ()


def checkpoint_method(model_config: Mapping[str, Any]) -> str | None:
    """The checkpoint's own quant_method (config.json `quantization_config`), normalised; None if dense."""
    qc = model_config.get("quantization_config")
    if not isinstance(qc, Mapping):
        return None
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    return {"compressed-tensors": "compressed-tensors", "auto-round": "auto-round"}.get(
        method, method.replace("-", "_")
    )


def _family(method: str) -> str:
    if method in AWQ:
        return "awq"
    if method in GPTQ:
        return "gptq"
    return method


def _marlin_kernel(family: str, qc: Mapping[str, Any], device: Device, support: VllmSupport) -> tuple[str, str]:
    group = int(qc.get("group_size", -1) or -1)
    bits = int(qc.get("bits", qc.get("w_bit", 4)) or 4)
    if device.kind == "cpu":
        return family, f"{family} on CPU (CPUWNA16 kernel)"
    if (
        device.capability is not None
        and device.capability >= MARLIN_MIN_CAPABILITY
        and group in support.marlin_group_sizes
        and bits in (4, 8)
    ):
        return (
            f"{family}_marlin",
            f"{family}_marlin (Marlin kernels, ~5x faster than the plain {family} kernel)",
        )
    reason = f"Marlin needs compute capability >= 7.5, 4/8 bits and group size in {sorted(support.marlin_group_sizes)}"
    return family, f"{family} (plain kernel: {reason})"


def _capability(device: Device) -> str:
    return f"{device.name} has {(device.capability or 0) / 10:.1f}"


def _plan_bnb(cfg: ModelConfig, ckpt: str | None, device: Device, support: VllmSupport) -> QuantPlan:
    if ckpt not in (None, "bitsandbytes"):
        raise ConfigError(f"model {cfg.path} is already quantized with {ckpt}; use --quantization auto")
    if not support.bnb_plugin:
        raise ConfigError(f"bitsandbytes is not in vLLM 0.32's tree any more; install the plugin: {PLUGIN_HINT}")
    how = "pre-quantized nf4" if ckpt else "quantized to 4-bit on the fly at load"
    slow = "bitsandbytes runs ~2-2.5x slower than bf16 on CPU (torch fallback); prefer AWQ/GPTQ checkpoints"
    return QuantPlan("bitsandbytes", "bitsandbytes", f"bitsandbytes ({how})", (slow,) if device.kind == "cpu" else ())


def _plan_fp8_on_the_fly(device: Device, support: VllmSupport) -> QuantPlan:
    if device.kind == "cpu":
        raise ConfigError(
            "fp8 weight quantization needs a GPU (it fails on CPU); to save memory on CPU use "
            "--kv-cache-dtype fp8, or a pre-quantized AWQ/GPTQ model"
        )
    need = support.min_capability.get("fp8", MARLIN_MIN_CAPABILITY)
    if device.capability is None or device.capability < need:
        raise ConfigError(f"fp8 needs compute capability >= {need / 10:.1f}; {_capability(device)}")
    if device.capability >= FP8_NATIVE_CAPABILITY:
        return QuantPlan("fp8", "fp8", "fp8 (native FP8 tensor cores)")
    return QuantPlan("fp8", "fp8", "fp8 weight-only through Marlin (W8A16; native FP8 needs compute capability 8.9)")


def _check_name(cfg: ModelConfig, support: VllmSupport) -> str:
    requested = cfg.quantization.lower()
    if cfg.kv_cache_dtype not in support.kv_cache_dtypes:
        raise ConfigError(
            f"kv_cache_dtype {cfg.kv_cache_dtype!r} is unknown to vLLM; use one of {sorted(support.kv_cache_dtypes)}"
        )
    if requested in REMOVED:
        raise ConfigError(REMOVED[requested])
    known = support.methods | {"auto", "none", "bitsandbytes"}
    if requested not in known:
        raise ConfigError(f"unknown quantization method {requested!r}; vLLM supports: {', '.join(sorted(known))}")
    return requested


def plan(cfg: ModelConfig, model_config: Mapping[str, Any], device: Device, support: VllmSupport) -> QuantPlan:
    """Validate the requested quantization against the checkpoint and the device; see the module docstring."""
    requested = _check_name(cfg, support)
    ckpt = checkpoint_method(model_config)
    if ckpt == "bitsandbytes" or requested == "bitsandbytes":
        return _plan_bnb(cfg, ckpt, device, support)
    if requested == "none" and ckpt is not None:
        raise ConfigError(f"model {cfg.path} is pre-quantized with {ckpt}; use --quantization auto (or {ckpt})")
    if requested in ("none", "auto") and ckpt is None:
        return QuantPlan("none", None, "dense (no quantization)")
    requested = ckpt if requested == "auto" and ckpt is not None else requested
    family = _family(requested)
    if ckpt is None and family == "fp8":
        return _plan_fp8_on_the_fly(device, support)
    if ckpt is None:
        raise ConfigError(
            f"model {cfg.path} has no quantization_config: it is not pre-quantized; use --quantization bitsandbytes "
            "(quantizes at load) or a pre-quantized AWQ model (`vllm-worker model quantize --method awq`)"
        )
    if _family(ckpt) != family:
        raise ConfigError(f"model {cfg.path} is quantized with {ckpt}, but --quantization {requested} was asked for")
    need = support.min_capability.get(requested)
    if device.kind == "cuda" and need is not None and (device.capability or 0) < need:
        raise ConfigError(f"{requested} needs compute capability >= {need / 10:.1f}; {_capability(device)}")
    if family in ("awq", "gptq"):
        qc: Mapping[str, Any] = model_config.get("quantization_config") or {}
        method, kernel = _marlin_kernel(family, qc, device, support)
        # On GPU name the Marlin variant (vLLM keeps the slow kernel when plain "awq" is explicit);
        # on CPU let vLLM detect it: every 4-bit format goes to its CPUWNA16 kernel there.
        return QuantPlan(family, method if device.kind == "cuda" else None, kernel)
    return QuantPlan(requested, None, f"{requested} (pre-quantized checkpoint)")


def check_context(cfg: ModelConfig, model_config: Mapping[str, Any]) -> None:
    """max_model_len must not exceed what the model was trained for (rope scaling included)."""
    limit = model_config.get("max_position_embeddings")
    if not isinstance(limit, int):
        return
    scaling = model_config.get("rope_scaling") or {}
    factor = float(scaling.get("factor", 1.0)) if isinstance(scaling, Mapping) else 1.0
    allowed = int(limit * max(factor, 1.0))
    if cfg.max_model_len > allowed:
        raise ConfigError(
            f"max_model_len {cfg.max_model_len} is above the model's limit of {allowed} tokens "
            f"(max_position_embeddings {limit}); use --max-model-len {allowed} or less"
        )
