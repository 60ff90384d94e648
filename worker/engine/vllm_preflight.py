"""Pre-flight against this host and the installed vLLM: what the engine will run on, checked before it loads.

The checks read the model's config, the device (CPU or which GPU), and what the installed vLLM supports
(quantization methods, kernels, KV-cache dtypes), then refuse with a `ConfigError` what cannot start:
an unsupported method, a context too long, a split the model or the host cannot take, a model that does
not fit. vLLM is imported here only inside the functions that ask it (after the environment is set).
"""

from __future__ import annotations

import importlib.util
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from worker.config import ModelConfig
from worker.engine import parallel
from worker.engine import plan as planner
from worker.engine.cpu_dtype import DtypeChoice, choose, cpu_flags
from worker.engine.quantization import Device, QuantPlan, VllmSupport, check_context, plan
from worker.errors import ConfigError

log = structlog.get_logger(__name__)


def prepare_environment(cfg: ModelConfig, *, on_cpu: bool, kv_space_gib: int = 1) -> None:
    """Set the env vars vLLM reads at import/start; explicit user settings win (setdefault)."""
    if cfg.visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.visible_devices
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's indices = NVML's (telemetry)
    if on_cpu:
        # MP=0 drops the extra Worker process on CPU: start 24 s -> 13 s, and both cores compute.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gib or kv_space_gib))


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is visible, without importing vllm or torch (cheap, pre-import)."""
    return Path("/dev/nvidiactl").exists() or bool(os.environ.get("VLLM_WORKER_ASSUME_GPU"))


def layout_of(cfg: ModelConfig) -> parallel.Layout:
    """How the model is split across GPUs (or CPU ranks)."""
    return parallel.Layout(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.distributed_executor_backend)


@dataclass(frozen=True, slots=True)
class Checked:
    """What the pre-flight decided: the quantization plan and the dtype the engine runs."""

    plan: QuantPlan
    dtype: DtypeChoice


def preflight(cfg: ModelConfig, model_dir: Path, model_name: str) -> Checked:
    """Validate model dir, context length, quantization, the split and the fit; set vLLM's environment."""
    try:
        model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    on_cpu = not gpu_present()
    ram_gib = psutil.virtual_memory().total / 2**30
    dtype = cpu_dtype(cfg, model_config, ram_gib) if on_cpu else DtypeChoice(cfg.dtype, "vLLM's choice on GPU")
    auto_kv = cfg.kv_cache_dtype == "auto" and dtype.dtype == "float32"  # the KV cache follows the model
    kv_space = planner.cpu_kv_space_gib(
        model_config,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        kv_dtype="float32" if auto_kv else cfg.kv_cache_dtype,
        ram_gib=ram_gib,
    )
    prepare_environment(cfg, on_cpu=on_cpu, kv_space_gib=kv_space)
    log.info("engine.dtype", dtype=dtype.dtype, reason=dtype.reason)
    check_context(cfg, model_config)
    device = device_of_host()
    quant_plan = plan(cfg, model_config, device, vllm_support())
    log.info("engine.quantization", method=quant_plan.method, kernel=quant_plan.kernel, notes=list(quant_plan.notes))
    layout = layout_of(cfg)
    spec = planner.spec_from_config(model_name, model_config, quant_plan.method)
    cores = sorted(os.sched_getaffinity(0))
    parallel.check(
        layout,
        model_config,
        gpus=gpu_count() if device.kind == "cuda" else None,
        cpu_cores=len(cores),
        method=quant_plan.method,
        group_size=spec.group_size,
    )
    if layout.backend == "ray":
        parallel.check_ray(layout)
    if layout.world > 1 and on_cpu:  # one disjoint core range per rank, or they fight for the same cores
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", parallel.cpu_binding(layout, cores))
    if layout.world > 1:
        log.info("engine.parallel", layout=layout.label, cpu_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
    if device.kind == "cuda":
        planner.check_single(spec, gpu_total_gib(), cfg.gpu_memory_utilization, cfg.max_model_len, layout)
    else:
        log.info("engine.cpu_kv_cache", gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
    return Checked(quant_plan, dtype)


def cpu_dtype(cfg: ModelConfig, model_config: dict[str, Any], ram_gib: float) -> DtypeChoice:
    """`model.dtype` on CPU (`cpu_dtype.choose`); a quantized checkpoint keeps vLLM's choice."""
    if model_config.get("quantization_config") or cfg.quantization not in ("auto", "none"):
        return DtypeChoice(cfg.dtype, "a quantized model: vLLM's choice")
    kv_fp32 = planner.kv_bytes_per_token(model_config, "float32") * cfg.max_model_len * cfg.max_num_seqs / 2**30
    return choose(cfg.dtype, model_config, flags=cpu_flags(), ram_gib=ram_gib, kv_gib=kv_fp32)


def device_of_host() -> Device:
    """CPU, or the GPU vLLM will use with its compute capability."""
    from vllm.platforms import current_platform  # noqa: PLC0415

    if current_platform.is_cpu():
        return Device("cpu")
    capability = current_platform.get_device_capability()
    return Device("cuda", capability.to_int() if capability else None, str(current_platform.get_device_name()))


def gpu_count() -> int:
    """GPUs vLLM sees (after CUDA_VISIBLE_DEVICES)."""
    from vllm.platforms import current_platform  # noqa: PLC0415

    return int(current_platform.device_count())


def gpu_total_gib() -> float:
    """Memory of the first GPU vLLM sees, in GiB."""
    from vllm.platforms import current_platform  # noqa: PLC0415

    return float(current_platform.get_device_total_memory()) / 2**30


def vllm_support() -> VllmSupport:
    """What the installed vLLM offers, read from vLLM itself."""
    from vllm.config.cache import CacheDType  # noqa: PLC0415
    from vllm.model_executor.layers.quantization import (  # noqa: PLC0415
        QUANTIZATION_METHODS,
        get_quantization_config,
    )
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (  # noqa: PLC0415
        MARLIN_SUPPORTED_GROUP_SIZES,
    )

    min_capability: dict[str, int] = {}
    for method in QUANTIZATION_METHODS:
        try:
            min_capability[method] = int(get_quantization_config(method).get_min_capability())
        except Exception:  # noqa: BLE001, S112 - some methods need optional packages to even describe themselves
            continue
    plugin = importlib.util.find_spec("vllm_bnb_plugin") is not None
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    return VllmSupport(
        methods=frozenset(QUANTIZATION_METHODS),
        min_capability=min_capability,
        marlin_group_sizes=frozenset(MARLIN_SUPPORTED_GROUP_SIZES),
        bnb_plugin=plugin and bnb,
        kv_cache_dtypes=frozenset(typing.get_args(CacheDType)),
    )
