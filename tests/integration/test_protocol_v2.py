"""PROTOCOL sections 3-5 with the fake engine, on the embedded broker (3.1.1) and Mosquitto (v5)."""

from __future__ import annotations

import asyncio
import json

from support import peer, running_worker, until

from worker.client import Client
from worker.config import BrokerConfig
from worker.engine.fake import FakeEngine

WORDS = " ".join(f"w{i}" for i in range(40))


def words_script(_prompt) -> str:
    return WORDS


class CountingScript:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _prompt) -> str:
        self.calls += 1
        return "counted answer"


def client_for(port: int, client_id: str = "app-1") -> Client:
    return Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id=client_id)


async def test_stream_chunks_are_coalesced_by_tokens_and_ordered():
    engine = FakeEngine(script=words_script)
    async with (
        running_worker(engine, worker={"stream_interval_ms": 60_000, "stream_max_tokens": 16}) as w,
        client_for(w.port) as c,
    ):
        chunks = [ch async for ch in c.stream("maze", "go", maxTokens=100)]
    assert [ch.seq for ch in chunks] == [1, 2, 3, 4]  # first token at once, 16 + 16 tokens, then the final
    assert [len(ch.delta.split()) for ch in chunks[:-1]] == [1, 16, 16]
    final = chunks[-1]
    assert final.done
    assert final.reply is not None
    assert final.reply.text == WORDS  # the final message carries the whole text
    assert "".join(ch.delta for ch in chunks[:-1]) == " ".join(WORDS.split()[:33])
    assert "".join(ch.delta for ch in chunks) == WORDS  # ... and the rest as its delta


async def test_stream_chunks_are_coalesced_by_time():
    engine = FakeEngine(script=words_script, token_delay_s=0.01)
    async with (
        running_worker(engine, worker={"stream_interval_ms": 50, "stream_max_tokens": 1000}) as w,
        client_for(w.port) as c,
    ):
        chunks = [ch async for ch in c.stream("maze", "go", maxTokens=100)]
    deltas = [ch for ch in chunks if not ch.done]
    assert 2 <= len(deltas) < 40  # several chunks, far fewer than tokens
    assert [ch.seq for ch in chunks] == list(range(1, len(chunks) + 1))


async def test_streamed_reasoning_is_stripped_like_the_final_text():
    def thinking(_prompt) -> str:
        return "<think> secret plan here </think> Go left then right"

    engine = FakeEngine(script=thinking)
    async with (
        running_worker(engine, worker={"stream_interval_ms": 0, "stream_max_tokens": 1}) as w,
        client_for(w.port) as c,
    ):
        chunks = [ch async for ch in c.stream("maze", "go")]
    assert chunks[-1].reply is not None
    assert chunks[-1].reply.text == "Go left then right"
    assert "".join(ch.delta for ch in chunks) == "Go left then right"
    assert not any("secret" in ch.delta for ch in chunks)


async def test_classic_request_never_streams():
    engine = FakeEngine(script=words_script)
    async with running_worker(engine) as w, peer(w.port, ["maze/assistant_response/+"]) as p:
        await p.publish("maze/user_input", {"message": "go", "stream": True, "maxTokens": 100})
        await p.wait_for(lambda got: len(got) >= 1)  # chunks, if any, would have come before the final
    assert [m.payload.decode() for m in p.received] == [WORDS]


async def test_cancel_aborts_the_engine_request_and_replies_cancelled():
    engine = FakeEngine(script=words_script, token_delay_s=0.05)
    async with running_worker(engine) as w, client_for(w.port) as c:
        ask = asyncio.create_task(c.ask("maze", "go", request_id="to-cancel", maxTokens=100))
        await until(lambda: engine.running == 1)
        await c.cancel("maze", "to-cancel")
        reply = await ask
    assert reply.error_code == "cancelled"
    assert engine.aborted == ["to-cancel"]


async def test_cancel_from_another_client_is_refused():
    engine = FakeEngine(token_delay_s=0.1)
    async with (
        running_worker(engine) as w,
        client_for(w.port) as owner,
        client_for(w.port, "intruder") as other,
    ):
        ask = asyncio.create_task(owner.ask("maze", "a b c", request_id="mine"))
        await until(lambda: engine.running == 1)
        await other.cancel("maze", "mine")
        reply = await ask
    assert reply.ok
    assert engine.aborted == []


async def test_classic_cancel_aborts_without_a_further_reply():
    engine = FakeEngine(script=words_script, token_delay_s=0.05)
    async with running_worker(engine) as w, peer(w.port, ["maze/assistant_response/+"]) as p:
        await p.publish("maze/user_input", {"message": "go", "sessionId": "s", "requestId": "classic-1"})
        await until(lambda: engine.running == 1)
        await p.publish("maze/cancel", {"requestId": "classic-1"})
        await until(lambda: engine.aborted == ["classic-1"])
        # a later request's answer: anything the cancelled one wrongly sent would have come before it
        await p.publish("maze/user_input", {"message": "later", "sessionId": "t", "maxTokens": 100})
        await p.wait_for(lambda got: len(got) >= 1)
    assert [m.topic for m in p.received] == ["maze/assistant_response/t"]  # PROTOCOL 4: classic gets nothing


async def test_session_reset_forgets_history_and_confirms_in_v2():
    async with running_worker() as w, client_for(w.port) as c:
        assert (await c.ask("maze", "one", session="game")).text == "echo 1: one"
        assert (await c.ask("maze", "two", session="game")).text == "echo 2: two"
        assert await c.reset("maze", "game")
        assert (await c.ask("maze", "three", session="game")).text == "echo 1: three"


async def test_duplicate_of_a_finished_request_gets_the_cached_reply_without_generating():
    script = CountingScript()
    async with running_worker(FakeEngine(script=script)) as w, peer(w.port, ["maze/response/+"]) as p:
        body = {"v": 2, "message": "hi", "clientId": "c", "requestId": "once"}
        await p.publish("maze/user_input", body)
        await p.wait_for(lambda got: len(got) >= 1)
        await p.publish("maze/user_input", body)
        await p.wait_for(lambda got: len(got) >= 2)
    assert script.calls == 1
    assert p.received[0].payload == p.received[1].payload


async def test_client_retry_with_the_same_request_id_is_answered_once():
    script = CountingScript()
    engine = FakeEngine(script=script, token_delay_s=0.15)
    async with running_worker(engine) as w, client_for(w.port) as c:
        reply = await c.ask("maze", "slow", timeout_s=0.2, retries=5)
    assert reply.ok
    assert script.calls == 1


async def test_rate_limit_per_client_returns_rate_limited_with_retry_after(projects):
    burst = projects["maze"].rate_limit.burst
    async with (
        running_worker(FakeEngine()) as w,
        client_for(w.port) as greedy,
        client_for(w.port, "polite") as polite,
    ):
        replies = await asyncio.gather(*(greedy.ask("maze", f"m{i}", session=f"g{i}") for i in range(burst + 3)))
        other = await polite.ask("maze", "hello")
    limited = [r for r in replies if r.error_code == "rate_limited"]
    assert len(limited) >= 3
    assert all(r.retry_after_ms and r.retry_after_ms > 0 for r in limited)
    assert other.ok  # buckets are per client


async def test_fair_share_keeps_room_for_the_other_project():
    engine = FakeEngine(token_delay_s=0.3)
    async with running_worker(engine, worker={"max_inflight": 4}) as w, client_for(w.port) as c:
        maze = [asyncio.create_task(c.ask("maze", "a b", session=f"m{i}")) for i in range(4)]
        await until(lambda: engine.running == 2)  # maze's guaranteed share is running
        driving = [asyncio.create_task(c.ask("driving", "a b", session=f"d{i}")) for i in range(2)]
        maze_replies, driving_replies = await asyncio.gather(asyncio.gather(*maze), asyncio.gather(*driving))
    assert sorted(r.error_code or "ok" for r in maze_replies) == ["ok", "ok", "overloaded", "overloaded"]
    assert all(r.ok for r in driving_replies)


async def test_priority_reaches_the_engine_only_with_priority_scheduling():
    engine = FakeEngine()
    async with running_worker(engine, model={"scheduling_policy": "priority"}) as w, client_for(w.port) as c:
        await c.ask("maze", "urgent", priority=-5)
    assert engine.priorities == [-5]
    engine = FakeEngine()
    async with running_worker(engine) as w, client_for(w.port) as c:
        await c.ask("maze", "urgent", priority=-5)
    assert engine.priorities == [0]


async def test_json_schema_constrains_the_answer_and_a_bad_schema_is_bad_request():
    schema = {"type": "object", "properties": {"move": {"type": "string"}, "steps": {"type": "integer"}}}
    async with running_worker() as w, client_for(w.port) as c:
        good = await c.ask("maze", "where?", jsonSchema=schema)
        bad = await c.ask("maze", "where?", jsonSchema={"type": "no-such-type"})
    assert json.loads(good.text) == {"move": "", "steps": 0}
    assert bad.error_code == "bad_request"


async def test_every_v2_final_reply_has_usage_timing_model_and_worker():
    async with running_worker() as w, client_for(w.port) as c:
        reply = await c.ask("maze", "hi there")
    raw = reply.raw
    assert raw["v"] == 2
    assert raw["seq"] == 1
    assert raw["finishReason"] == "stop"
    assert set(raw["usage"]) == {"promptTokens", "completionTokens", "cachedTokens"}
    assert set(raw["timing"]) == {"queueMs", "ttftMs", "totalMs"}
    assert raw["model"] == "fake-model"
    assert raw["worker"] == "test-worker"


async def test_v5_response_topic_and_correlation_data_on_mosquitto(mosquitto):
    async with (
        running_worker(broker_url=mosquitto.url) as w,
        peer(w.port, ["maze/response/#"], protocol="5") as p,
    ):
        assert w.service._bus is not None
        assert w.service._bus.is_v5
        props_client = p.bus._client
        assert props_client is not None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "maze/response/app-42"
        props.CorrelationData = b"\x00corr-42"
        props_client.publish("maze/user_input", b'{"message": "v5 please"}', qos=1, properties=props)
        await p.wait_for(lambda got: len(got) >= 1)
    msg = p.received[0]
    assert msg.topic == "maze/response/app-42"
    assert msg.correlation_data == b"\x00corr-42"
    assert json.loads(msg.payload)["text"] == "echo 1: v5 please"


async def test_v5_message_expiry_acts_as_deadline(mosquitto):
    engine = FakeEngine(script=words_script, token_delay_s=0.1)
    async with (
        running_worker(engine, broker_url=mosquitto.url) as w,
        peer(w.port, ["maze/response/app-r"], protocol="5") as p,
    ):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "maze/response/app-r"
        props.MessageExpiryInterval = 1
        assert p.bus._client is not None
        p.bus._client.publish("maze/user_input", b'{"message": "go", "maxTokens": 100}', qos=1, properties=props)
        await p.wait_for(lambda got: len(got) >= 1, timeout_s=5)
    assert json.loads(p.received[0].payload)["error"]["code"] == "expired"
