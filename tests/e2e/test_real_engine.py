"""The real vLLM CPU engine behind the real MQTT path (marker e2e; one engine per test session)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import psutil
import pytest
from conftest import launch_worker
from support import MODEL_DIR, WorkerProcess, peer

from worker.client import Client
from worker.config import BrokerConfig

pytestmark = pytest.mark.e2e

FACT_PROMPT = "What is the capital of France?"


def hf_greedy(system_prompt: str, user: str, new_tokens: int, dtype: str) -> str:
    """transformers' greedy answer for the same chat-templated prompt, in the dtype the worker runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=getattr(torch, dtype))
    chat = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


async def test_greedy_answer_matches_transformers(worker_process: WorkerProcess, projects):
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as client:
        reply = await client.ask("general", FACT_PROMPT, session="hf-compare", temperature=0, maxTokens=16)
    assert reply.ok, reply
    async with peer(worker_process.port, ["vllm-worker/+/status"]) as p:  # retained: arrives at once
        await p.wait_for(lambda got: len(got) >= 1)
    dtype = json.loads(p.received[0].payload)["dtype"]  # bfloat16, or float32 on a CPU without bf16
    assert dtype in ("bfloat16", "float32")
    prompt = projects["general"].system_prompt
    expected = await asyncio.to_thread(hf_greedy, prompt, FACT_PROMPT, 16, dtype)
    assert reply.text == expected.strip()
    assert "Paris" in reply.text
    assert reply.raw["model"] == "smollm2-135m-instruct"


async def test_eight_concurrent_requests_all_get_answers(worker_process: WorkerProcess):
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as client:
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                client.ask(
                    "maze",
                    f"Wall ahead, opening on the left. Step {i}: which way?",
                    session=f"c{i}",
                    maxTokens=24,
                    timeout_s=120,
                )
                for i in range(8)
            )
        )
        elapsed = time.monotonic() - started
    assert all(r.ok and r.text for r in replies), replies
    print(f"\n[e2e] 8 concurrent answers in {elapsed:.1f} s")


async def test_classic_client_gets_plain_text_and_session_history(worker_process: WorkerProcess):
    topic = "driving/assistant_response/car-1"
    async with peer(worker_process.port, [topic]) as p:
        await p.publish(
            "driving/user_input",
            {"message": "My name is Ada. Say OK.", "sessionId": "car-1", "temperature": 0, "maxTokens": 16},
        )
        await p.wait_for(lambda got: len(got) >= 1, timeout_s=120)
        await p.publish(
            "driving/user_input",
            {"message": "What is my name?", "sessionId": "car-1", "temperature": 0, "maxTokens": 16},
        )
        await p.wait_for(lambda got: len(got) >= 2, timeout_s=120)
    texts = [m.payload.decode() for m in p.on(topic)]
    assert all(t and not t.startswith("Error:") for t in texts), texts
    assert not texts[0].lstrip().startswith("{")  # classic: plain text, not JSON
    assert "Ada" in texts[1]  # the second turn saw the first


async def test_streaming_chunks_add_up_to_the_final_text(worker_process: WorkerProcess):
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as client:
        chunks = [
            ch
            async for ch in client.stream(
                "general", "List three colours.", session="stream", maxTokens=48, temperature=0
            )
        ]
    assert chunks[-1].done
    assert chunks[-1].reply is not None
    assert len(chunks) >= 3
    assert [ch.seq for ch in chunks] == list(range(1, len(chunks) + 1))
    assert "".join(ch.delta for ch in chunks) == chunks[-1].reply.text


async def test_json_schema_structured_output_on_the_real_engine(worker_process: WorkerProcess):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}, "country": {"type": "string"}},
        "required": ["capital", "country"],
        "additionalProperties": False,
    }
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as client:
        reply = await client.ask(
            "general",
            "What is the capital of France? Answer in JSON.",
            session="json",
            temperature=0,
            maxTokens=64,
            jsonSchema=schema,
        )
    assert reply.ok, reply
    answer = json.loads(reply.text)
    assert set(answer) == {"capital", "country"}
    print(f"\n[e2e] structured answer: {answer}")


async def test_cancel_aborts_on_the_real_engine(worker_process: WorkerProcess):
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as client:
        chunks = client.stream(
            "general", "Write a long story.", session="cancel", maxTokens=1500, request_id="e2e-cancel"
        )
        reply = None
        async for chunk in chunks:
            if chunk.seq == 1:  # the first chunk: it is generating now
                await client.cancel("general", "e2e-cancel")
            reply = chunk.reply
    assert reply is not None
    assert reply.error_code == "cancelled"


async def test_context_too_long_is_a_typed_error(worker_process: WorkerProcess):
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as client:
        reply = await client.ask("general", "word " * 3000, session="long", maxTokens=16)
    assert reply.error_code == "context_too_long"


async def test_telemetry_carries_real_engine_stats(worker_process: WorkerProcess):
    from worker.fleet.reports import TelemetryReport

    topic = "vllm-worker/e2e-worker/telemetry"
    async with peer(worker_process.port, [topic], client_id="e2e-telemetry") as p:
        async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{worker_process.port}")) as client:
            reply = await client.ask("general", "Count from one to ten.", session="tele", maxTokens=32)
        assert reply.ok
        await p.wait_for(
            lambda got: any(TelemetryReport.model_validate_json(m.payload).engine.gen_tok_per_s > 0 for m in got),
            timeout_s=15,
        )
    report = next(
        r for r in (TelemetryReport.model_validate_json(m.payload) for m in p.received) if r.engine.gen_tok_per_s > 0
    )
    print(f"\n[e2e] telemetry engine: {report.engine.model_dump(by_alias=True)}")
    assert report.engine.ttft_ms_p50 > 0
    assert report.engine.tpot_ms_p50 > 0
    assert report.quantization == "none"
    assert report.gpus == []
    assert report.process.rss_mib > 200  # includes the engine-core child process


def test_sigterm_stops_cleanly_within_10s_without_children():
    """Its own worker: stopping the session's shared one would leave later tests (any file) without it."""
    with launch_worker("--projects", "general", worker_id="stopped") as worker:
        proc = psutil.Process(worker.proc.pid)
        children = proc.children(recursive=True)
        assert children, "vLLM's EngineCore runs as a child process"
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = worker.proc.wait(15)
        elapsed = time.monotonic() - started
        print(f"\n[e2e] SIGTERM to exit: {elapsed:.1f} s")
        assert code == 0, worker.log()[-3000:]
        assert elapsed < 10
        _, alive = psutil.wait_procs(children, timeout=2)
        assert not alive, f"children left behind: {alive}"
        assert "vllm-worker: stopped" in worker.log()
