"""The control topic against hostile adapter directories: every load gets exactly one typed reply naming
the cause, whatever adapter_config.json and the safetensors header hold, and nothing escapes `handle`.
Control is driven directly (FakeEngine, a list for the reply topic); test_adapters_hostile.py runs the
same through a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from support import make_adapter, until

from worker.engine import adapters
from worker.engine.adapters import AdapterTable
from worker.engine.fake import FakeEngine
from worker.errors import ConfigError, ErrorCode
from worker.serving.control import READ_TIMEOUT_S, Control

DEMO = {  # the demo model's dimensions (SmolLM2-135M), which make_adapter shapes for
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
}
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class Harness:
    """A Control on a FakeEngine whose reply topic is a list."""

    def __init__(self, adapters_dir: Path, engine: FakeEngine | None = None, **options: Any) -> None:
        self.replies: list[dict[str, Any]] = []
        self.engine = engine or FakeEngine()
        self.table = AdapterTable()

        async def publish(body: bytes) -> None:
            self.replies.append(json.loads(body))

        async def changed() -> None:
            return None

        self.control = Control(
            self.engine,
            self.table,
            ["maze"],
            adapters_dir=adapters_dir,
            model_config=DEMO,
            max_lora_rank=16,
            publish=publish,
            changed=changed,
            **options,
        )

    async def load(self, name: str, request_id: str = "r") -> dict[str, Any]:
        """Send one load and return its reply, asserting it is the only one."""
        before = len(self.replies)
        body = {"action": "load", "project": "maze", "adapter": name, "requestId": request_id}
        await self.control.handle(json.dumps(body).encode())
        assert len(self.replies) == before + 1, self.replies[before:]
        return self.replies[-1]


def refused(reply: dict[str, Any], says: str, code: str = "bad_request") -> None:
    assert reply["ok"] is False, reply
    assert reply["requestId"] == "r"
    assert reply["error"]["code"] == code
    assert says in reply["error"]["message"], reply["error"]["message"]


@pytest.fixture
def lab(tmp_path) -> Path:
    return tmp_path / "adapters"


def with_config(lab: Path, name: str, content: bytes | dict[str, Any]) -> str:
    """A valid adapter whose adapter_config.json is replaced by `content`."""
    out = make_adapter(lab / name)
    data = json.dumps(content).encode() if isinstance(content, dict) else content
    (out / CONFIG).write_bytes(data)
    return name


def with_weights(lab: Path, name: str, content: bytes) -> str:
    out = make_adapter(lab / name)
    (out / WEIGHTS).write_bytes(content)
    return name


def good_config(**changes: object) -> dict[str, Any]:
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    return {k: v for k, v in {**config, **changes}.items() if v is not ...}


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b'{"r": 1e400, "target_modules": ["q_proj", "v_proj"]}', "r must be a positive integer, got 1e400"),
        (good_config(r=-1), "r must be a positive integer, got -1"),
        (good_config(r="4"), 'r must be a positive integer, got "4"'),
        (good_config(r=True), "r must be a positive integer, got true"),
        (good_config(r=4.0), "r must be a positive integer, got 4.0"),
        (b'{"r": NaN}', "not JSON (NaN is not JSON)"),
        (good_config(r=...), "r (the LoRA rank) is missing"),
        (good_config(target_modules=5), "target_modules must be a list of module names, got 5"),
        (good_config(target_modules=[1, 2]), "target_modules must be a list of module names, got [1, 2]"),
        (good_config(target_modules={"q_proj": 1}), "target_modules must be a list of module names, got an object"),
        (good_config(lora_alpha="x"), 'lora_alpha must be a finite number, got "x"'),
        (good_config(lora_alpha=float("inf")), "not JSON (Infinity is not JSON)"),
        (good_config(peft_type="IA3"), 'peft_type must be LORA, got "IA3"'),
        (b"[4]", "expected a JSON object, got [4]"),
        (b'{"r": \xff}', "not UTF-8 (byte 6)"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (b'{"r": 4, "pad": "' + b"x" * 2**20 + b'"}', "larger than 1 MiB"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_a_hostile_adapter_config_gets_one_typed_refusal_naming_the_cause(lab, content, says):
    h = Harness(lab)
    refused(await h.load(with_config(lab, "bad", content)), f"bad/adapter_config.json: {says}")
    assert h.engine.adapters == {}
    assert h.table.names() == {}


class Parts(NamedTuple):
    """make_adapter's valid safetensors file, taken apart."""

    length: int
    header: bytes
    data: bytes


def parts_of(lab: Path) -> Parts:
    raw = (make_adapter(lab / "template") / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return Parts(length, raw[8 : 8 + length], raw[8 + length :])


def nested(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def framed(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def entry(dtype: str, shape: str, offsets: str) -> bytes:
    return f'{{"t": {{"dtype": {dtype}, "shape": {shape}, "data_offsets": {offsets}}}}}'.encode()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (framed(nested(100_000)), "JSON nested too deeply"),
        (framed(b"[" * 50_000), "JSON nested too deeply"),
        (lambda p: struct.pack("<Q", p.length) + p.header + p.data[: len(p.data) // 2], "data bytes (truncated?)"),
        (lambda p: struct.pack("<Q", p.length) + p.header[: p.length // 2], "truncated (the header says"),
        (lambda p: struct.pack("<Q", p.length + 10**6) + p.header + p.data, "truncated (the header says"),
        (lambda p: struct.pack("<Q", 2**63) + p.header + p.data, "over the 64 MiB limit"),
        (b"\x01\x02", "truncated (2 bytes; the header length alone takes 8)"),
        (framed(b"\xff\xfe"), "not UTF-8"),
        (framed(b"[1, 2]"), "the header must be a JSON object, got [1, 2]"),
        (framed(b'{"t": 5}'), 'tensor "t" is described by 5, not an object'),
        (framed(entry("[]", "[]", "[0, 0]")), "has dtype []"),
        (framed(entry('"F32"', "[1.5]", "[0, 0]")), "shape [1.5]"),
        (framed(entry('"F32"', "[1]", "[4, 0]"), bytes(4)), "data_offsets [4, 0], not [begin, end]"),
        (framed(entry('"F32"', "[2]", "[0, 4]"), bytes(4)), "holds 4 bytes, not the 2 F32"),
        (framed(entry('"F32"', "[1]", '"x"')), 'data_offsets "x", not [begin, end]'),
    ],
)
async def test_a_hostile_safetensors_file_gets_one_typed_refusal_naming_the_cause(lab, content, says):
    h = Harness(lab)
    data = content(parts_of(lab)) if callable(content) else content
    reply = await h.load(with_weights(lab, "bad", data))
    refused(reply, says)
    assert reply["error"]["message"].startswith("bad/adapter_model.safetensors: ")
    assert h.engine.adapters == {}


async def test_a_fifo_where_a_file_belongs_is_refused_without_blocking(lab):
    h = Harness(lab)
    for name, file in (("fifo-config", CONFIG), ("fifo-weights", WEIGHTS)):
        out = make_adapter(lab / name)
        (out / file).unlink()
        os.mkfifo(out / file)
        refused(await h.load(name), f"{name}/{file} is a FIFO, not a regular file")
    make_adapter(lab / "good")
    assert (await h.load("good"))["ok"] is True  # the worker goes on: nothing is stuck on the FIFO


def test_a_fifo_swapped_in_after_the_check_does_not_block_the_open(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="is a FIFO"):
        adapters._open_regular(tmp_path / "fifo", "fifo")  # O_NONBLOCK: a blocking open would hang here


async def test_directories_and_symlinks_out_of_adapters_dir_are_refused(lab, tmp_path):
    h = Harness(lab)
    out = make_adapter(lab / "dir-config")
    (out / CONFIG).unlink()
    (out / CONFIG).mkdir()
    refused(await h.load("dir-config"), "dir-config/adapter_config.json is a directory, not a regular file")
    outside = make_adapter(tmp_path / "elsewhere")
    link = make_adapter(lab / "link-config")
    (link / CONFIG).unlink()
    (link / CONFIG).symlink_to(outside / CONFIG)
    refused(await h.load("link-config"), "link-config/adapter_config.json points outside")
    (lab / "link-dir").symlink_to(outside)
    refused(await h.load("link-dir"), "adapter 'link-dir' points outside")
    (lab / "loop").symlink_to(lab / "loop")
    refused(await h.load("loop"), "adapter 'loop' under")
    (lab / "gone").symlink_to(lab / "nowhere")
    refused(await h.load("gone"), "no adapter 'gone'")


async def test_a_load_on_a_worker_without_lora_says_how_to_enable_it(lab):
    h = Harness(lab, lora_enabled=False)
    make_adapter(lab / "good")
    refused(await h.load("good"), "LoRA is not enabled on this worker: set model.enable_lora = true")
    assert h.engine.adapters == {}


async def test_a_hung_read_costs_a_timeout_reply_and_never_a_frozen_worker(lab, monkeypatch):
    release = threading.Event()
    real_check = adapters.check

    def hung(*args: Any, **kwargs: Any) -> int:  # stands in for a read stuck on a dead NFS server
        if not release.is_set():
            release.wait(timeout=30)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(adapters, "check", hung)
    h = Harness(lab, read_timeout_s=0.05)
    make_adapter(lab / "good")
    try:
        refused(await h.load("good"), "adapter 'good': reading its files took over 0.05 s (a hung mount?)")
        refused(await h.load("good"), "a read of adapter files is still stuck after 0.05 s")  # no second thread
    finally:
        release.set()
    await until(lambda: not h.control._reads.busy)
    h.control._reads._timeout_s = READ_TIMEOUT_S  # the mount is back: a real read gets the usual deadline
    assert (await h.load("good"))["ok"] is True


class BrokenEngine(FakeEngine):
    """An engine whose load raises what the Engine contract does not allow: stands in for our own bug."""

    async def load_adapter(self, adapter: adapters.Adapter) -> None:
        raise ZeroDivisionError(adapter.name)


async def test_our_own_bug_gets_a_typed_reply_and_one_traceback(lab):
    h = Harness(lab, BrokenEngine())
    make_adapter(lab / "good")
    with capture_logs() as logs:
        for _ in range(3):
            refused(
                await h.load("good"), "internal error applying the control message (ZeroDivisionError)", "engine_error"
            )
    crashes = [e for e in logs if e["event"] == "control.crashed"]
    assert len(crashes) == 3
    assert [("exc_info" in e) for e in crashes] == [True, False, False]  # the traceback once, then a count
    assert crashes[-1]["times"] == 3


async def test_a_refusal_logs_one_info_line_without_a_traceback(lab):
    h = Harness(lab)
    with capture_logs() as logs:
        refused(await h.load(with_config(lab, "bad", good_config(target_modules=5))), "target_modules")
    assert [(e["event"], e["log_level"], "exc_info" in e) for e in logs] == [("control.refused", "info", False)]


async def test_a_failing_reply_topic_or_status_never_raises_out_of_handle(lab):
    async def broken_publish(body: bytes) -> None:
        raise ConnectionError(body[:10])

    async def broken_changed() -> None:
        raise ConnectionError

    engine, table = FakeEngine(), AdapterTable()
    make_adapter(lab / "good")
    control = Control(
        engine,
        table,
        ["maze"],
        adapters_dir=lab,
        model_config=DEMO,
        max_lora_rank=16,
        publish=broken_publish,
        changed=broken_changed,
    )
    with capture_logs() as logs:
        await control.handle(b'{"action": "load", "project": "maze", "adapter": "good"}')
        await control.handle(b"not json")
    assert table.names() == {"maze": "good"}
    assert [e["event"] for e in logs if e["log_level"] != "info"] == [
        "control.status_failed",
        "control.reply_failed",
        "control.reply_failed",
    ]


# Generative: random adapter_config.json and safetensors contents, from random bytes to valid files with
# one field replaced by a random JSON value. Every load gets exactly one reply; a refusal is typed.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONFIGS = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda key, value: json.dumps(good_config(**{key: value})).encode(),
        st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type"]),
        JSON,
    ),
    st.integers(1, 5000).map(lambda depth: b'{"r": ' + b"[" * depth + b"]" * depth + b"}"),
    st.just(b'{"r": 1e400}'),
)


@st.composite
def safetensors(draw: st.DrawFn) -> bytes | None:
    """None keeps make_adapter's valid file; otherwise a header of random bytes, JSON or nesting, framed
    with a random or honest length prefix and followed by random data."""
    kind = draw(st.sampled_from(["valid", "bytes", "json", "nested", "entry"]))
    if kind == "valid":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "nested":
        depth = draw(st.integers(1, 20_000))
        header = b'{"t": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "json":
        header = json.dumps(draw(JSON)).encode()
    else:
        entry = {"dtype": draw(JSON | st.just("F32")), "shape": draw(JSON), "data_offsets": draw(JSON)}
        header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": entry}).encode()
    length = draw(st.sampled_from([len(header)]) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=32))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("template") / "random")


@settings(max_examples=75, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.tuples(CONFIGS, st.none()) | st.tuples(st.none(), safetensors()) | st.tuples(CONFIGS, safetensors()))
def test_every_load_of_random_adapter_files_gets_exactly_one_typed_reply(tmp_path_factory, template, files):
    config, weights = files
    lab = tmp_path_factory.mktemp("adapters")
    out = Path(shutil.copytree(template, lab / "random"))
    if config is not None:
        (out / CONFIG).write_bytes(config)
    if weights is not None:
        (out / WEIGHTS).write_bytes(weights)
    h = Harness(lab)
    reply = asyncio.run(h.load("random"))  # asserts exactly one reply
    assert reply["requestId"] == "r"
    if reply["ok"]:
        assert h.table.names() == {"maze": "random"}
    else:
        assert reply["error"]["code"] == ErrorCode.BAD_REQUEST  # the files are bad, never the engine
        assert reply["error"]["message"].startswith("random")
        assert h.table.names() == {}
