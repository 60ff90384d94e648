"""Both quantization paths of the product on the real CPU engine: bitsandbytes on the fly and a
prebuilt AWQ checkpoint (made by `vllm-worker model quantize --method awq`, cached)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from conftest import launch_worker
from support import MODEL_DIR, ROOT, peer

from worker.client import Client
from worker.config import BrokerConfig

pytestmark = pytest.mark.e2e

FACT = "What is the capital of France?"


async def ask_fact_and_status(port: int, worker_id: str) -> tuple[str, dict]:
    async with peer(port, [f"vllm-worker/{worker_id}/status"], client_id="q-status") as p:
        async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}")) as client:
            reply = await client.ask("general", FACT, session="fact", temperature=0, maxTokens=24)
        await p.wait_for(lambda got: len(got) >= 1)
    assert reply.ok, reply
    return reply.text, json.loads(p.received[-1].payload)


async def test_bitsandbytes_on_the_fly_answers_and_reports_the_method():
    with launch_worker("--projects", "general", "--quantization", "bitsandbytes", worker_id="bnb") as w:
        text, status = await ask_fact_and_status(w.port, "bnb")
    print(f"\n[e2e] bnb answer: {text!r}")
    assert status["quantization"] == "bitsandbytes"
    assert "Paris" in text


async def test_prebuilt_awq_checkpoint_answers_and_reports_the_method():
    out = MODEL_DIR.parent / f"{MODEL_DIR.name}-awq"
    cmd = [sys.executable, "-m", "worker", "model", "quantize", "--method", "awq", "--out", str(out)]
    await asyncio.to_thread(subprocess.run, cmd, cwd=ROOT, check=True, timeout=600)
    with launch_worker("--projects", "general", "--model", str(out), worker_id="awq") as w:
        text, status = await ask_fact_and_status(w.port, "awq")
    print(f"\n[e2e] awq answer: {text!r}")
    assert status["quantization"] in {"awq", "awq_marlin"}
    assert "Paris" in text
