"""Hostile adapter directories through a real worker (fake engine, embedded broker): every control
message gets exactly one typed reply naming the cause, a FIFO or a deeply nested header freezes nothing,
and the project's old adapter keeps serving throughout."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from support import ROOT, bodies, make_adapter, peer, running_worker

CONTROL = "vllm-worker/test-worker/control"
DEMO = {  # the demo model's config.json, as much as the adapter check reads (no weights needed)
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
}


@pytest.fixture
def lab(tmp_path) -> dict[str, Path]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(DEMO))
    adapters = tmp_path / "adapters"
    make_adapter(adapters / "maze-a")
    topics = tmp_path / "topics"
    topics.mkdir()
    for project in ("maze", "driving"):
        shutil.copy(ROOT / "topics" / f"{project}.toml", topics / f"{project}.toml")
    maze = topics / "maze.toml"
    maze.write_text(f'adapter = "{adapters / "maze-a"}"\n' + maze.read_text())
    return {"adapters": adapters, "topics": topics, "model": model, "outside": make_adapter(tmp_path / "outside")}


def hostile(adapters: Path, outside: Path) -> dict[str, str]:
    """Adapter directories that each break one rule; name -> what the refusal must say."""

    def adapter(name: str, config: bytes | None = None, weights: bytes | None = None) -> Path:
        out = make_adapter(adapters / name)
        if config is not None:
            (out / "adapter_config.json").write_bytes(config)
        if weights is not None:
            (out / "adapter_model.safetensors").write_bytes(weights)
        return out

    adapter("r-inf", b'{"r": 1e400, "target_modules": ["q_proj"]}')
    adapter("targets-5", b'{"r": 4, "target_modules": 5}')
    deep = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
    adapter("deep-header", weights=struct.pack("<Q", len(deep)) + deep)
    whole = (adapters / "maze-a" / "adapter_model.safetensors").read_bytes()
    adapter("truncated", weights=whole[: len(whole) - 1000])
    for name, file in (("fifo-config", "adapter_config.json"), ("fifo-weights", "adapter_model.safetensors")):
        (adapter(name) / file).unlink()
        os.mkfifo(adapters / name / file)
    (adapter("escape") / "adapter_config.json").unlink()
    (adapters / "escape" / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    return {
        "r-inf": "r-inf/adapter_config.json: r must be a positive integer, got 1e400",
        "targets-5": "targets-5/adapter_config.json: target_modules must be a list of module names, got 5",
        "deep-header": "deep-header/adapter_model.safetensors: JSON nested too deeply",
        "truncated": "data bytes (truncated?)",
        "fifo-config": "fifo-config/adapter_config.json is a FIFO, not a regular file",
        "fifo-weights": "fifo-weights/adapter_model.safetensors is a FIFO, not a regular file",
        "escape": "escape/adapter_config.json points outside",
    }


async def test_every_hostile_adapter_gets_one_typed_reply_and_the_worker_keeps_serving(lab):
    expected = hostile(lab["adapters"], lab["outside"])
    settings = {
        "worker": {"topics_dir": str(lab["topics"])},
        "model": {"adapters_dir": str(lab["adapters"]), "path": str(lab["model"])},
    }
    async with running_worker(**settings) as w, peer(w.port, ["maze/response/app", f"{CONTROL}/reply"]) as p:
        for name in expected:
            await p.publish(CONTROL, {"action": "load", "project": "maze", "adapter": name, "requestId": name})
        await p.publish("maze/user_input", {"v": 2, "clientId": "app", "message": "still", "requestId": "q"})
        await p.publish(CONTROL, {"action": "load", "project": "maze", "adapter": "maze-a", "requestId": "last"})
        replies = lambda: bodies(p.received, f"{CONTROL}/reply")  # noqa: E731
        last_in = lambda: any(r["requestId"] == "last" for r in replies())  # noqa: E731
        await p.wait_for(lambda got: last_in() and bool(bodies(got, "maze/response/app")))
        assert bodies(p.received, "maze/response/app")[0]["text"] == "[maze-a] echo 1: still"
    got = {r["requestId"]: r for r in replies()}
    assert sorted(r["requestId"] for r in replies()) == sorted([*expected, "last"])  # exactly one reply each
    for name, says in expected.items():
        assert got[name]["ok"] is False
        assert got[name]["error"]["code"] == "bad_request"
        assert says in got[name]["error"]["message"], got[name]["error"]["message"]
    assert got["last"]["ok"] is True  # handled in order, after every hostile one
