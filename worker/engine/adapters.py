"""Per-project LoRA adapters: a PEFT directory checked against the served model; who runs which now.

`AdapterTable` keeps each project's current adapter, so a hot swap never changes a request in flight.

The check reads only `adapter_config.json` and the safetensors header (no torch): rank against
`model.max_lora_rank`, target modules the model has, and every LoRA matrix's shape against the model's
dimensions, which is what tells an adapter made for another base model (a name would not: the same
model is often saved under different paths).

A control message makes the worker open these files, so they are untrusted input: only regular files
(under `root` when given) are opened, with O_NONBLOCK so a FIFO swapped in after the check cannot block
the open, reads are bounded, and every field vLLM relies on is type- and range-checked here, so a bad
file is refused with its cause (`ConfigError`, one sentence) instead of failing in the engine as a bare
`Exception`. The check blocks (a hung mount can stall it): the control topic runs it off the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

from worker.errors import ConfigError

MAX_CONFIG_BYTES = 2**20
MAX_HEADER_BYTES = 64 * 2**20
MAX_DIMS = 8  # a LoRA matrix has 2; more is not an adapter, and bounds the product below
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Adapter:
    """One loaded adapter: `id` is unique for the process (vLLM keys its LoRA cache by it)."""

    name: str
    path: str
    id: int
    rank: int


class FloatText(str):
    """A JSON float kept as written: `1e400` would become inf, and a refusal should quote the file."""

    __slots__ = ()


def check(path: Path, model_config: Mapping[str, Any], *, max_lora_rank: int, root: Path | None = None) -> int:
    """Refuse (ConfigError naming the file and the cause) an adapter that does not fit the served model.

    Returns its rank. `root`: the files must resolve under it (the control topic's `adapters_dir`).
    """
    rank, targets = _read_config(path, root)
    if rank > max_lora_rank:
        raise ConfigError(f"{path.name}: LoRA rank {_show(rank)} exceeds model.max_lora_rank {max_lora_rank}")
    unknown = [t for t in targets if t not in LINEAR and t != "all-linear"]
    if unknown:
        shown = ", ".join(_show(t) for t in unknown[:5]) + (", ..." if len(unknown) > 5 else "")  # noqa: PLR2004
        raise ConfigError(f"{path.name}: targets {shown}, which the model does not have")
    shapes = _read_header(path / "adapter_model.safetensors", root)
    try:
        dims, layers = _module_dims(model_config), int(model_config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(f"{path.name}: cannot compare it with the served model ({exc})") from exc
    _check_shapes(path, shapes, dims, layers, rank)
    return rank


def _read_config(path: Path, root: Path | None) -> tuple[int, list[str]]:
    """adapter_config.json's rank and target modules, each checked for the type vLLM expects."""
    where = f"{path.name}/adapter_config.json"
    with _open(path / "adapter_config.json", root, where) as (f, _size):
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, not a PEFT config")
    config = _json(data, where)
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {_show(config)}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{where}: peft_type must be LORA, got {_show(config['peft_type'])}")
    if "r" not in config:
        raise ConfigError(f"{where}: r (the LoRA rank) is missing")
    rank = config["r"]
    if not _is_int(rank) or rank < 1:
        raise ConfigError(f"{where}: r must be a positive integer, got {_show(rank)}")
    alpha = config.get("lora_alpha", 8)
    if not (_is_int(alpha) or (isinstance(alpha, FloatText) and math.isfinite(float(alpha)))):
        raise ConfigError(f"{where}: lora_alpha must be a finite number, got {_show(alpha)}")
    targets = config.get("target_modules")
    targets = [] if targets in (None, "") else [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) and not isinstance(t, FloatText) for t in targets):
        raise ConfigError(f"{where}: target_modules must be a list of module names, got {_show(targets)}")
    return rank, targets


def _read_header(file: Path, root: Path | None) -> dict[str, list[int]]:
    """Each tensor's shape from the safetensors header, once the header and every tensor fit in the file."""
    where = f"{file.parent.name}/{file.name}"
    with _open(file, root, where) as (f, size):
        if size < 8:  # noqa: PLR2004 - the u64 header length
            raise ConfigError(f"{where}: truncated ({size} bytes; the header length alone takes 8)")
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise ConfigError(f"{where}: header of {length} bytes, over the {MAX_HEADER_BYTES // 2**20} MiB limit")
        if 8 + length > size:
            raise ConfigError(f"{where}: truncated (the header says {length} bytes, {size - 8} follow)")
        raw = f.read(length)
    if len(raw) < length:
        raise ConfigError(f"{where}: truncated while reading (the file shrank)")
    header = _json(raw, where)
    if not isinstance(header, dict):
        raise ConfigError(f"{where}: the header must be a JSON object, got {_show(header)}")
    data_bytes = size - 8 - length
    return {name: _tensor(where, name, info, data_bytes) for name, info in header.items() if name != "__metadata__"}


def _tensor(where: str, name: str, info: object, data_bytes: int) -> list[int]:
    """The shape of one header entry whose dtype, shape and data_offsets safetensors would accept."""
    entry = f"{where}: tensor {_show(name)}"
    if not isinstance(info, dict):
        raise ConfigError(f"{entry} is described by {_show(info)}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ConfigError(f"{entry} has dtype {_show(dtype)}, not one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise ConfigError(f"{entry} has shape {_show(shape)}, not a list of up to {MAX_DIMS} sizes")
    begin, end = offsets if isinstance(offsets, list) and len(offsets) == 2 else (None, None)  # noqa: PLR2004
    if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end):
        raise ConfigError(f"{entry} has data_offsets {_show(offsets)}, not [begin, end]")
    if end > data_bytes:
        raise ConfigError(f"{entry} ends at byte {end}, past the {data_bytes} data bytes (truncated?)")
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ConfigError(f"{entry} holds {end - begin} bytes, not the {math.prod(shape)} {dtype} its shape needs")
    return shape


@contextlib.contextmanager
def _open(file: Path, root: Path | None, where: str) -> Iterator[tuple[BinaryIO, int]]:
    """A regular file (not a FIFO, directory or device; under `root` when given) and its size."""
    try:
        resolved = file.resolve(strict=True)
        if root is not None and not resolved.is_relative_to(root.resolve()):
            raise ConfigError(f"{where} points outside {root}")
        kind = _kind(resolved.stat().st_mode)
        if kind is not None:
            raise ConfigError(f"{where} is {kind}, not a regular file")
        f = _open_regular(resolved, where)
    except FileNotFoundError:
        raise ConfigError(f"{where} is missing") from None
    except (OSError, RuntimeError) as exc:  # permission, a symlink loop (RuntimeError before 3.13)
        raise ConfigError(f"{where}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    with f:
        try:
            yield f, os.fstat(f.fileno()).st_size
        except OSError as exc:  # EIO from a failing disk or mount
            raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})") from None


def _open_regular(resolved: Path, where: str) -> BinaryIO:
    """Open without blocking (O_NONBLOCK: a FIFO swapped in after the stat opens at once) and re-check."""
    fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    kind = _kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise ConfigError(f"{where} is {kind}, not a regular file")
    return open(fd, "rb")  # noqa: PTH123 - an fd; the caller closes it


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is (for the refusal)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def _json(data: bytes, where: str) -> object:
    """JSON text with floats kept as written and NaN/Infinity refused (not JSON)."""

    def constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(data.decode("utf-8"), parse_float=FloatText, parse_constant=constant)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError; an integer of over 4300 digits
        raise ConfigError(f"{where}: not JSON ({str(exc)[:120]})") from None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object, *, nested: bool = False) -> str:
    """A short rendering of a JSON value for a refusal (bounded, whatever the file holds)."""
    if isinstance(value, str):
        short = value if len(value) <= 40 else value[:40] + "..."  # noqa: PLR2004
        return short if isinstance(value, FloatText) else json.dumps(short)
    if value is None or isinstance(value, int):  # bool is an int
        text = json.dumps(value)
        return text if len(text) <= 40 else f"an integer of {len(text)} digits"  # noqa: PLR2004
    if isinstance(value, list) and not nested:
        items = ", ".join(_show(v, nested=True) for v in value[:5])
        return f"[{items}{', ...' if len(value) > 5 else ''}]"  # noqa: PLR2004
    if isinstance(value, dict) and not nested:
        return f"an object of {len(value)} keys"
    return "[...]" if isinstance(value, list) else "{...}"


def _check_shapes(
    path: Path, shapes: Mapping[str, list[int]], dims: Mapping[str, tuple[int, int]], layers: int, rank: int
) -> None:
    """lora_A is [rank, in], lora_B is [out, rank], with in/out those of the model's module."""
    for name, shape in shapes.items():
        parts = name.split(".")
        if "lora_A" not in parts and "lora_B" not in parts:
            continue
        module = next((p for p in parts if p in dims), None)
        layer = next((p for p, q in itertools.pairwise(parts) if _digits(p) and q in ("self_attn", "mlp")), "0")
        if module is None or len(shape) != 2:  # noqa: PLR2004 - a matrix
            raise ConfigError(f"{path.name}: {_show(name)} is not a LoRA matrix of this model")
        if len(layer.lstrip("0")) > len(str(layers)) or int(layer) >= layers:
            raise ConfigError(f"{path.name}: made for a deeper model (layer {layer[:12]}; this one has {layers})")
        fan_in, fan_out = dims[module]
        expected = [rank, fan_in] if "lora_A" in parts else [fan_out, rank]
        if shape != expected:
            raise ConfigError(
                f"{path.name}: made for another base model ({module} {'in' if 'lora_A' in parts else 'out'} "
                f"size {shape[1] if 'lora_A' in parts else shape[0]}, this model's is "
                f"{fan_in if 'lora_A' in parts else fan_out})"
            )


def _digits(part: str) -> bool:
    """A layer index: ASCII digits only ("²" passes str.isdigit but not int())."""
    return part.isascii() and part.isdigit()


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
