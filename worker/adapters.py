"""Per-project LoRA adapters: a PEFT directory checked against the served model; who runs which now.

`AdapterTable` keeps each project's current adapter, so a hot swap never changes a request in flight.

The check reads only `adapter_config.json` and the safetensors header (no torch): rank against
`model.max_lora_rank`, target modules the model has, and every LoRA matrix's shape against the model's
dimensions, which is what tells an adapter made for another base model (a name would not: the same
model is often saved under different paths).
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

MAX_HEADER_BYTES = 64 * 2**20
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class Adapter:
    """One loaded adapter: `id` is unique for the process (vLLM keys its LoRA cache by it)."""

    name: str
    path: str
    id: int
    rank: int


def check(path: Path, model_config: Mapping[str, Any], *, max_lora_rank: int) -> int:
    """Refuse (ConfigError, one sentence) an adapter that does not fit the served model; returns its rank."""
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        rank = int(config["r"])
        targets = config.get("target_modules") or []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a PEFT LoRA directory (adapter_config.json: {exc})") from exc
    if rank > max_lora_rank:
        raise ConfigError(f"{path.name}: LoRA rank {rank} exceeds model.max_lora_rank {max_lora_rank}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in LINEAR and t != "all-linear"]
    if unknown:
        raise ConfigError(f"{path.name}: targets {', '.join(map(str, unknown))}, which the model does not have")
    try:
        _check_shapes(path, _header(path / "adapter_model.safetensors"), model_config, rank)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path.name}: cannot compare it with the served model ({exc})") from exc
    return rank


def _header(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > MAX_HEADER_BYTES:
                raise ConfigError(f"{file}: safetensors header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{file}: unreadable LoRA weights ({exc})") from exc
    if not isinstance(header, dict):
        raise ConfigError(f"{file}: unreadable LoRA weights")
    return header


def _check_shapes(path: Path, header: dict[str, Any], model_config: Mapping[str, Any], rank: int) -> None:
    """lora_A is [rank, in], lora_B is [out, rank], with in/out those of the model's module."""
    dims = _module_dims(model_config)
    layers = int(model_config["num_hidden_layers"])
    for name, info in header.items():
        parts = name.split(".")
        if name == "__metadata__" or ("lora_A" not in parts and "lora_B" not in parts):
            continue
        module = next((p for p in parts if p in dims), None)
        layer = next((int(p) for p, q in itertools.pairwise(parts) if p.isdigit() and q in ("self_attn", "mlp")), 0)
        shape = info.get("shape") if isinstance(info, dict) else None
        if module is None or not isinstance(shape, list) or len(shape) != 2:  # noqa: PLR2004 - a matrix
            raise ConfigError(f"{path.name}: {name} is not a LoRA matrix of this model")
        if layer >= layers:
            raise ConfigError(f"{path.name}: made for a deeper model (layer {layer}; this one has {layers})")
        fan_in, fan_out = dims[module]
        expected = [rank, fan_in] if "lora_A" in parts else [fan_out, rank]
        if shape != expected:
            raise ConfigError(
                f"{path.name}: made for another base model ({module} {'in' if 'lora_A' in parts else 'out'} "
                f"size {shape[1] if 'lora_A' in parts else shape[0]}, this model's is "
                f"{fan_in if 'lora_A' in parts else fan_out})"
            )


def _module_dims(c: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    kv = int(c.get("num_key_value_heads") or heads) * head_dim
    inter = int(c["intermediate_size"])
    q = heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def lora_bytes(model_config: Mapping[str, Any], *, max_loras: int, max_rank: int, dtype_bytes: int = 2) -> int:
    """GPU memory vLLM sets aside for LoRA: `max_loras` slots of rank `max_rank` on every linear layer."""
    per_layer = sum(max_rank * (fan_in + fan_out) for fan_in, fan_out in _module_dims(model_config).values())
    return max_loras * per_layer * int(model_config["num_hidden_layers"]) * dtype_bytes


@dataclass
class AdapterTable:
    """Which adapter each project runs now, and how many requests still run on each one.

    `acquire` at the start of a request and `release` at its end: a replaced adapter stays loaded until
    its last request finishes, then `release` says it can be unloaded.
    """

    current: dict[str, Adapter] = field(default_factory=dict)
    _users: dict[int, int] = field(default_factory=dict)
    _retired: dict[int, Adapter] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def new(self, name: str, path: Path, rank: int) -> Adapter:
        """An adapter with a fresh id (vLLM caches LoRAs by id: a replacement must not reuse one)."""
        return Adapter(name, str(path), next(self._ids), rank)

    def acquire(self, project: str) -> Adapter | None:
        """The project's adapter for one request (None: the base model)."""
        adapter = self.current.get(project)
        if adapter is not None:
            self._users[adapter.id] = self._users.get(adapter.id, 0) + 1
        return adapter

    def release(self, adapter: Adapter | None) -> Adapter | None:
        """The request is done; returns the adapter when it was retired and this was its last request."""
        if adapter is None:
            return None
        left = self._users.get(adapter.id, 1) - 1
        if left > 0:
            self._users[adapter.id] = left
            return None
        self._users.pop(adapter.id, None)
        return self._retired.pop(adapter.id, None)

    def replace(self, project: str, adapter: Adapter | None) -> Adapter | None:
        """Make `adapter` the project's (None: back to the base model); returns the old one when idle now."""
        old = self.current.pop(project, None)
        if adapter is not None:
            self.current[project] = adapter
        if old is None or old.id == (adapter.id if adapter else None):
            return None
        if self._users.get(old.id):
            self._retired[old.id] = old  # unloaded by `release` once its last request ends
            return None
        return old

    def names(self) -> dict[str, str]:
        """Project -> adapter name (status, telemetry)."""
        return {project: a.name for project, a in sorted(self.current.items())}
