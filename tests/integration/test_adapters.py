"""Per-project LoRA adapters through a real worker (fake engine, embedded broker): the project's adapter
runs its requests and only its; the control topic loads, replaces and unloads an adapter without a
restart, requests in flight finish on the adapter they started with, and a bad adapter is refused with
a typed error while the old one keeps serving; on the shipped deploy/ only the admin account can swap."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    MODEL_DIR,
    ROOT,
    DeployedMosquitto,
    Peer,
    bodies,
    free_port,
    make_adapter,
    peer,
    running_worker,
    until,
)

from worker.config import BrokerConfig
from worker.engine.fake import FakeEngine
from worker.transport.bus import Bus

CONTROL = "vllm-worker/test-worker/control"


@pytest.fixture
def lab(tmp_path) -> dict[str, Path]:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"demo model missing at {MODEL_DIR}: run `make model` (make test does it)")
    adapters = tmp_path / "adapters"
    for name in ("maze-a", "maze-b"):
        make_adapter(adapters / name)
    make_adapter(adapters / "wrong-base", hidden=1024, kv_out=256)  # another model's shapes
    make_adapter(adapters / "too-big", rank=64)
    topics = tmp_path / "topics"
    topics.mkdir()
    for project in ("maze", "driving"):
        shutil.copy(ROOT / "topics" / f"{project}.toml", topics / f"{project}.toml")
    maze = topics / "maze.toml"
    maze.write_text(f'adapter = "{adapters / "maze-a"}"\n' + maze.read_text())  # a top-level key: first
    return {"adapters": adapters, "topics": topics}


def settings(lab: dict[str, Path]) -> dict[str, dict[str, object]]:
    return {
        "worker": {"topics_dir": str(lab["topics"])},
        "model": {"adapters_dir": str(lab["adapters"]), "path": str(MODEL_DIR)},
    }


async def test_a_projects_adapter_runs_its_requests_only(lab):
    async with running_worker(**settings(lab)) as w, peer(w.port, ["+/response/app", "vllm-worker/+/status"]) as p:
        for project in ("maze", "driving"):
            await p.publish(f"{project}/user_input", {"v": 2, "clientId": "app", "message": "hi", "requestId": project})
        await p.wait_for(lambda got: len(bodies(got, "maze/response/app") + bodies(got, "driving/response/app")) == 2)
    assert bodies(p.received, "maze/response/app")[0]["text"] == "[maze-a] echo 1: hi"
    assert bodies(p.received, "driving/response/app")[0]["text"] == "echo 1: hi"
    status = json.loads(next(m.payload for m in p.received if m.topic.endswith("/status")))
    assert status["adapters"] == {"maze": "maze-a"}
    assert (await w.service.telemetry()).adapters == {"maze": "maze-a"}


async def test_a_hot_swap_lets_running_requests_finish_on_their_adapter(lab):
    engine = FakeEngine(token_delay_s=0.05)
    async with (
        running_worker(engine, **settings(lab)) as w,
        peer(w.port, ["maze/response/app", f"{CONTROL}/reply"]) as p,
    ):
        for i in range(8):
            body = {"v": 2, "clientId": "app", "sessionId": f"s{i}", "message": "long " * 9, "requestId": f"r{i}"}
            await p.publish("maze/user_input", body)
        await until(lambda: engine.running == 8)
        await p.publish(CONTROL, {"action": "load", "project": "maze", "adapter": "maze-b", "requestId": "swap"})
        await p.wait_for(lambda got: bodies(got, f"{CONTROL}/reply"))
        assert bodies(p.received, f"{CONTROL}/reply")[0] == {
            "requestId": "swap",
            "ok": True,
            "project": "maze",
            "adapter": "maze-b",
        }
        finals = lambda: [b for b in bodies(p.received, "maze/response/app") if b.get("done")]  # noqa: E731
        await p.wait_for(lambda _: len(finals()) == 8, timeout_s=20)
        assert all(b["text"].startswith("[maze-a] ") for b in finals())  # the adapter they started with
        assert {a.name for a in engine.adapters.values()} == {"maze-b"}  # maze-a unloaded after the last one
        await p.publish("maze/user_input", {"v": 2, "clientId": "app", "message": "next", "requestId": "after"})
        await p.wait_for(lambda _: len(finals()) == 9)
    assert finals()[-1]["text"] == "[maze-b] echo 1: next"


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ({"action": "load", "project": "maze", "adapter": "wrong-base"}, "made for another base model"),
        ({"action": "load", "project": "maze", "adapter": "too-big"}, "rank 64 exceeds model.max_lora_rank 16"),
        ({"action": "load", "project": "maze", "adapter": ".."}, "must be the name of a directory"),
        ({"action": "load", "project": "maze", "adapter": "absent"}, "no adapter 'absent'"),
        ({"action": "load", "project": "racing", "adapter": "maze-b"}, "project must be one this worker serves"),
        ({"action": "format", "project": "maze"}, 'action must be "load" or "unload"'),
    ],
)
async def test_a_bad_adapter_is_refused_with_a_typed_error_and_the_old_one_kept(lab, command, says):
    async with running_worker(**settings(lab)) as w, peer(w.port, ["maze/response/app", f"{CONTROL}/reply"]) as p:
        await p.publish(CONTROL, {**command, "requestId": "bad"})
        await p.wait_for(lambda got: bodies(got, f"{CONTROL}/reply"))
        reply = bodies(p.received, f"{CONTROL}/reply")[0]
        await p.publish("maze/user_input", {"v": 2, "clientId": "app", "message": "still", "requestId": "q"})
        await p.wait_for(lambda got: bodies(got, "maze/response/app"))
    assert reply["ok"] is False
    assert reply["requestId"] == "bad"
    assert reply["error"]["code"] == "bad_request"
    assert says in reply["error"]["message"]
    assert bodies(p.received, "maze/response/app")[0]["text"] == "[maze-a] echo 1: still"


async def test_unload_returns_a_project_to_the_base_model(lab):
    async with running_worker(**settings(lab)) as w, peer(w.port, ["maze/response/app", f"{CONTROL}/reply"]) as p:
        await p.publish(CONTROL, {"action": "unload", "project": "maze"})
        await p.wait_for(lambda got: bodies(got, f"{CONTROL}/reply"))
        await p.publish("maze/user_input", {"v": 2, "clientId": "app", "message": "plain", "requestId": "q"})
        await p.wait_for(lambda got: bodies(got, "maze/response/app"))
        assert w.engine.adapters == {}
    assert bodies(p.received, f"{CONTROL}/reply")[0]["adapter"] is None
    assert bodies(p.received, "maze/response/app")[0]["text"] == "echo 1: plain"


def test_a_misfit_adapter_in_a_project_file_stops_the_start_with_exit_2(lab):
    text = (lab["topics"] / "maze.toml").read_text().replace("maze-a", "wrong-base")
    (lab["topics"] / "maze.toml").write_text(text)
    cmd = [sys.executable, "-m", "worker", "--engine", "fake", "--port", str(free_port()), "--projects", "maze"]
    env_flags = ["--config", str(lab["topics"] / "w.toml")]
    (lab["topics"] / "w.toml").write_text(
        f'[worker]\ntopics_dir = "{lab["topics"]}"\n[model]\npath = "{MODEL_DIR}"\nadapters_dir = "{lab["adapters"]}"\n'
    )
    out = subprocess.run([*cmd, *env_flags], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "wrong-base: made for another base model" in out.stderr


async def test_on_the_shipped_deploy_only_the_admin_account_can_swap(lab):
    users = {"admin": "admin-pw-1", "mallory": "mallory-pw-2"}
    broker = DeployedMosquitto(users, {"worker": "worker-pw-0"}).start()
    worker = {"username": "worker", "password": "worker-pw-0"}
    control = "vllm-worker/deploy-w/control"
    deploy_settings = settings(lab)
    deploy_settings["worker"]["id"] = "deploy-w"
    try:
        async with (
            running_worker(broker_url=broker.worker_url, broker=worker, **deploy_settings) as w,
            Bus(BrokerConfig(url=broker.app_url, username="admin", password=users["admin"]), "admin") as admin,
            Bus(BrokerConfig(url=broker.app_url, username="mallory", password=users["mallory"]), "m") as mallory,
        ):
            replies = Peer(admin)
            replies._reader = asyncio.create_task(replies._read())
            await admin.subscribe([f"{control}/reply"])
            swap = {"action": "load", "project": "maze", "adapter": "maze-b", "requestId": "m"}
            await mallory.publish(control, json.dumps(swap).encode())  # the broker drops it: not her topic
            await admin.publish(control, json.dumps({**swap, "requestId": "a"}).encode())
            await replies.wait_for(bodies)
            assert [b["requestId"] for b in bodies(replies.received)] == ["a"]
            assert w.service._adapters.names() == {"maze": "maze-b"}
    finally:
        broker.stop()
