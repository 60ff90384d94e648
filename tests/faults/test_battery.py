"""The reliability battery (marker `faults`): each scenario states its expected outcome and checks that
every accepted request got exactly one final reply. Fake engine; real brokers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import psutil
import pytest
from structlog.testing import capture_logs
from support import ROOT, Mosquitto, bodies, free_port, peer, running_worker, until, worker_subprocess

from worker.client import Client
from worker.config import BrokerConfig, load
from worker.engine.fake import FakeEngine
from worker.errors import ConfigError

pytestmark = pytest.mark.faults


def final_bodies(received) -> list[dict]:
    return [b for b in bodies(received) if b.get("done")]


def exactly_once(received, ids) -> None:
    assert Counter(b["requestId"] for b in final_bodies(received)) == Counter(dict.fromkeys(ids, 1))


def v2(i: int | str, **fields) -> dict:
    return {"v": 2, "message": f"m {i}", "sessionId": f"s{i}", "clientId": "bat", "requestId": f"r{i}", **fields}


@pytest.fixture
def mosquitto():
    broker = Mosquitto("persistence true\npersistence_location {dir}/\n").start()
    yield broker
    broker.stop()


async def test_01_broker_restart_mid_generation_loses_nothing(mosquitto):
    engine = FakeEngine(token_delay_s=0.2)
    async with (
        running_worker(engine, projects=["general"], broker_url=mosquitto.url),
        Client(BrokerConfig(url=mosquitto.url), client_id="bat", persistent=True) as c,
    ):
        asks = [
            asyncio.create_task(c.ask("general", "a b c d", session=f"s{i}", request_id=f"r{i}", timeout_s=60))
            for i in range(4)
        ]
        await until(lambda: engine.running == 4)  # all four mid-generation
        await asyncio.to_thread(mosquitto.restart)
        replies = await asyncio.gather(*asks)
    assert all(r.ok for r in replies)  # expected: every reply arrives after the reconnect


async def test_02_worker_sigkill_goes_offline_and_grouped_requests_are_redelivered(mosquitto):
    slow = {"VLLM_WORKER_FAKE_TOKEN_DELAY_S": "0.2"}
    async with peer(mosquitto.port, ["general/response/#", "vllm-worker/+/status"], "bat-w", protocol="5") as p:
        with worker_subprocess(mosquitto.url, "kill-a", ["general"], **slow) as a:
            await p.wait_for(
                lambda got: any(m.topic.endswith("kill-a/status") and b'"ready"' in m.payload for m in got),
                timeout_s=30,
            )
            for i in range(3):
                await p.publish("general/user_input", v2(i, stream=True))
            # the first chunk of each: all three are mid-generation (none can have finished: 0.2 s a word)
            await p.wait_for(lambda got: {b["requestId"] for b in bodies(got) if "delta" in b} >= {"r0", "r1", "r2"})
            a.send_signal(signal.SIGKILL)
            a.wait(10)
        await p.wait_for(
            lambda got: any(m.topic.endswith("kill-a/status") and b'"offline"' in m.payload for m in got)
        )  # expected: Last Will
        with worker_subprocess(mosquitto.url, "kill-a", ["general"], **slow):
            await p.wait_for(lambda got: len(final_bodies(got)) >= 3, timeout_s=60)  # expected: redelivery
            await p.publish("general/user_input", v2("late", message="a b c d e f g h"))  # finishes after any dup
            await p.wait_for(lambda got: any(b["requestId"] == "rlate" for b in final_bodies(got)), timeout_s=30)
    exactly_once(p.received, [*(f"r{i}" for i in range(3)), "rlate"])


async def test_03_duplicate_qos1_delivery_generates_once_and_resends_the_cached_reply():
    calls = []
    engine = FakeEngine(script=lambda _prompt: calls.append(1) or "answer")
    async with running_worker(engine) as w, peer(w.port, ["maze/response/+"]) as p:
        await p.publish("maze/user_input", v2(1))
        await p.wait_for(lambda got: len(got) >= 1)
        await p.publish("maze/user_input", v2(1))
        await p.wait_for(lambda got: len(got) >= 2)
    assert len(calls) == 1
    assert p.received[0].payload == p.received[1].payload


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (json.dumps(v2("big", message="x" * (300 * 1024))).encode(), "too_large"),  # 04
        # 05 malformed JSON is not a JSON object: PROTOCOL 1 takes it as the (classic) message text itself
        (b'{"v": 2, "clientId": "bat", "message": "unterminated', None),
        (b'{"v": 2, "clientId": "bat", "message": "\xff\xfe"}', "bad_request"),  # 05 invalid UTF-8
        (json.dumps(v2("long", message="word " * 3000)).encode(), "context_too_long"),  # 06
        (json.dumps(v2("rt", replyTopic="maze/response/#")).encode(), "bad_request"),  # 08 wildcard
        (json.dumps(v2("rt2", replyTopic="other/place")).encode(), "bad_request"),  # 08 outside prefix
    ],
)
async def test_04_08_bad_input_gets_one_typed_error_and_the_worker_keeps_serving(payload, code):
    engine = FakeEngine(max_model_len=1024)
    async with (
        running_worker(engine, worker={"max_payload_bytes": 256 * 1024}) as w,
        peer(w.port, ["maze/response/+", "maze/assistant_response/+"]) as p,
    ):
        await p.publish("maze/user_input", payload)
        await p.wait_for(lambda got: len(got) >= 1)
        await p.publish("maze/user_input", v2("after"))
        await p.wait_for(lambda got: len(got) >= 2)  # "after" came last: nothing else is on its way
    errors = [b["error"]["code"] for b in final_bodies(p.received) if "error" in b]
    # an unparseable payload cannot say it is v2: it gets the classic error on the default session
    errors += ["bad_request" for m in p.received if m.payload.startswith(b"Error: Bad request")]
    assert errors == ([code] if code else [])
    if code is None:
        assert p.on("maze/assistant_response/default")[0].payload == b"echo 1: " + payload
    assert any(b.get("text") == "echo 1: m after" for b in final_bodies(p.received))
    assert len(p.received) == 2


async def test_07_unserved_project_topic_is_not_answered_by_this_worker():
    async with running_worker(projects=["maze"]) as w, peer(w.port, ["+/response/+", "+/assistant_response/+"]) as p:
        await p.publish("racing/user_input", v2("other"))
        await p.publish("maze/user_input", v2("mine"))
        await p.wait_for(lambda got: len(got) >= 1)  # an answer to racing would have come first
    assert [m.topic for m in p.received] == ["maze/response/bat"]  # racing is another worker's business


@pytest.mark.parametrize("bad_id", ["a/b", "a+b", "a#b", "nul\x00id", "x" * 10_000])
async def test_09_hostile_ids_never_reach_a_topic(bad_id):
    async with running_worker() as w, peer(w.port, ["#"]) as p:
        await p.publish("maze/user_input", {"message": "hi", "sessionId": bad_id})
        await p.publish("maze/user_input", v2("x", requestId=bad_id))
        await p.publish("maze/user_input", v2("ok"))
        await p.wait_for(lambda got: any(b"echo 1: m ok" in m.payload for m in got))  # published last
    for m in p.received:
        assert bad_id not in m.topic
        assert "+" not in m.topic
    assert w.service.counters[("?", "unroutable")] == 1  # the classic one: no safe topic exists, counted
    codes = [b["error"]["code"] for b in final_bodies(p.received) if "error" in b]
    assert codes == ["bad_request"]  # the v2 one: answered on its clientId topic


async def test_10_flood_of_ten_times_the_queue_refuses_the_excess_and_memory_stays_bounded():
    engine = FakeEngine(token_delay_s=0.05)
    queue = 20
    async with (
        running_worker(engine, projects=["general"], worker={"max_inflight": queue}) as w,
        peer(w.port, ["general/response/+"]) as p,
    ):
        rss_before = psutil.Process().memory_info().rss
        for i in range(10 * queue):
            await p.bus.publish("general/user_input", json.dumps(v2(i)).encode(), wait=False)
        await p.wait_for(lambda got: len(final_bodies(got)) >= 10 * queue, timeout_s=60)
        rss_growth = psutil.Process().memory_info().rss - rss_before
    codes = Counter(b.get("error", {}).get("code", "ok") for b in final_bodies(p.received))
    assert codes["overloaded"] >= 8 * queue  # expected: the excess is refused at once
    assert codes["ok"] >= queue  # ... and the accepted ones finish
    assert set(codes) <= {"ok", "overloaded"}
    exactly_once(p.received, [f"r{i}" for i in range(10 * queue)])
    assert rss_growth < 50 * 2**20


async def test_11_a_client_that_never_reads_its_replies_does_not_stall_others(mosquitto):
    async with running_worker(projects=["general"], broker_url=mosquitto.url) as w:
        from worker.transport.bus import Bus

        # subscribes QoS1 and never acks: Mosquitto holds its replies, not the worker
        async with Bus(BrokerConfig(url=mosquitto.url), "stalled", protocol="5") as stalled:
            await stalled.subscribe(["general/response/stalled"])
            for i in range(50):
                body = {"v": 2, "message": "x", "clientId": "stalled", "sessionId": f"s{i}", "requestId": f"st{i}"}
                await stalled.publish("general/user_input", json.dumps(body).encode(), wait=False)
            async with Client(BrokerConfig(url=mosquitto.url), client_id="healthy") as c:
                replies = await asyncio.gather(
                    *(c.ask("general", f"q{i}", session=f"h{i}", timeout_s=10) for i in range(10))
                )
        assert all(r.ok for r in replies)
        assert w.service.counters[("general", "requests")] == 60


async def test_12_engine_death_answers_engine_error_and_exits_non_zero():
    engine = FakeEngine(token_delay_s=0.1)
    async with running_worker(engine, projects=["general"]) as w, peer(w.port, ["general/response/+"]) as p:
        await p.publish("general/user_input", v2(1, message="a b c d e f g"))
        await until(lambda: engine.running == 1)
        engine.dead = True
        await p.wait_for(lambda got: len(got) >= 1)
        code = await asyncio.wait_for(w.task, 20)
    assert final_bodies(p.received)[0]["error"]["code"] == "engine_error"
    assert code == 1


async def test_13_sigterm_drain_answers_what_it_cannot_finish_shutting_down():
    engine = FakeEngine(token_delay_s=0.5)
    async with (
        running_worker(engine, projects=["general"], worker={"drain_timeout_s": 0.2}) as w,
        peer(w.port, ["general/response/+"]) as p,
    ):
        await p.publish("general/user_input", v2(1, message="a b c d e f"))
        await until(lambda: engine.running == 1)
        w.stop.set()
        await p.wait_for(lambda got: len(got) >= 1)
    assert final_bodies(p.received)[0]["error"]["code"] == "shutting_down"  # no share group: answered


async def test_14_secrets_never_reach_the_logs_at_any_level(tmp_path):
    secret = "S3cret-Hunter2-pw"
    key_marker = "BEGIN PRIVATE KEY"
    (tmp_path / "client.key").write_text(f"-----{key_marker}-----\nMIIEv...\n")
    env = {
        **os.environ,
        "VLLM_WORKER_BROKER__PASSWORD": secret,
        "VLLM_WORKER_BROKER__USERNAME": "u",
        "VLLM_WORKER_BROKER__KEY_FILE": str(tmp_path / "client.key"),
        "VLLM_WORKER_LOG__LEVEL": "debug",
    }
    # a broker that refuses us: the worker logs its connection attempt and the error at DEBUG, then exits 2
    broker = Mosquitto("allow_anonymous false\npassword_file {dir}/none\n")
    (broker.dir / "none").write_text("")
    (broker.dir / "none").chmod(0o644)
    broker.start()
    try:
        out = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "worker",
                "--engine",
                "fake",
                "--broker",
                broker.url,
                "--projects",
                "maze",
                "--mqtt-password",
                secret,
                "--log-level",
                "debug",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        broker.stop()
    logs = out.stdout + out.stderr
    assert out.returncode == 2
    assert "refused" in logs
    assert secret not in logs
    assert key_marker not in logs
    with capture_logs() as captured:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VLLM_WORKER_BROKER__PASSWORD", secret)
            cfg = load()
        import structlog

        structlog.get_logger("t").debug("config.loaded", config=repr(cfg), password=secret)
    assert secret not in repr(captured[0]["config"])


async def test_15_retained_status_leak_of_amqtt_is_contained_and_embedded_binds_loopback_only():
    async with running_worker() as w, peer(w.port, ["vllm-worker/+/status"], client_id="fleet-like") as fleet:
        await fleet.wait_for(lambda got: len(got) >= 1)
        # a raw client with no subscriptions: amqtt pushes the retained status to it anyway (the known leak)
        async with peer(w.port, [], client_id="raw") as raw:
            await asyncio.sleep(0.5)
            leaked = list(raw.received)
        # the product's client drops what it did not subscribe to
        async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{w.port}")) as c:
            reply = await c.ask("maze", "still fine")
            assert reply.ok
    assert all(m.topic.startswith("vllm-worker/") for m in leaked)  # documented limit (README)
    with pytest.raises(ConfigError, match="loopback"):
        load(None, {"broker": {"embedded_host": "0.0.0.0"}})


async def test_16_sigterm_stops_the_worker_after_its_log_reader_went_away():
    """`vllm-worker | sed '/ready/q'`, or a log shipper that died: SIGTERM must still stop it, children too."""
    port = free_port()
    cmd = [sys.executable, "-m", "worker", "--engine", "fake", "--projects", "maze", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # like `sed '/ready/q'`: read until ready, then stop reading for good
            if "vllm-worker: ready" in line:
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "expected the embedded broker's child process"
        proc.stdout.close()
        async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}")) as c:  # logs to the dead pipe
            assert (await c.ask("maze", "still serving?", timeout_s=10)).ok
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert code == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
