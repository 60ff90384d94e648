"""Reasoning split off by the model's reasoning parser (fake engine standing in for vLLM's): a v2 reply
of a project that keeps reasoning carries it apart, a classic one inline, a stripping project never."""

from __future__ import annotations

import json
import shutil

from support import ROOT, peer, running_worker

from worker.client import Client
from worker.config import BrokerConfig
from worker.engine.fake import FakeEngine

THINKER = 'name = "thinker"\nsystem_prompt = "Think first."\nstrip_reasoning = false\n'


def thinking(_prompt) -> str:
    return "<think>the exit is east</think> Go east."


async def test_reasoning_goes_where_the_project_says(tmp_path):
    shutil.copy(ROOT / "topics" / "maze.toml", tmp_path / "maze.toml")
    (tmp_path / "thinker.toml").write_text(THINKER)
    engine = FakeEngine(script=thinking, reasoning_parser=True)
    async with running_worker(engine, projects=["thinker", "maze"], worker={"topics_dir": str(tmp_path)}) as w:
        async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{w.port}"), client_id="app") as c:
            kept = await c.ask("thinker", "which way?", session="k")
            stripped = await c.ask("maze", "which way?", session="s")
        async with peer(w.port, ["thinker/assistant_response/#"]) as p:
            await p.publish("thinker/user_input", json.dumps({"message": "which way?", "sessionId": "cl"}))
            await p.wait_for(lambda got: len(got) >= 1)
    assert (kept.text, kept.raw.get("reasoning")) == ("Go east.", "the exit is east")
    assert (stripped.text, stripped.raw.get("reasoning")) == ("Go east.", None)
    assert p.received[0].payload.decode() == "<think>the exit is east</think>Go east."
