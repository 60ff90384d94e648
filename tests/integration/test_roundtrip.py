"""Classic and v2 round trips through the embedded amqtt broker with the fake engine."""

import asyncio
import json

from support import peer, running_worker, until

from worker.engine.fake import FakeEngine


async def test_classic_round_trips_for_two_projects_and_many_sessions_concurrently():
    engine = FakeEngine(token_delay_s=0.02)
    async with (
        running_worker(engine) as w,
        peer(w.port, ["maze/assistant_response/+", "driving/assistant_response/+"]) as p,
    ):
        sessions = [f"s{i}" for i in range(6)]
        sends = [
            p.publish(f"{proj}/user_input", {"message": f"{proj} {s} turn1", "sessionId": s})
            for proj in ("maze", "driving")
            for s in sessions
        ]
        await asyncio.gather(*sends)
        await p.wait_for(lambda got: len(got) >= 12)
        for proj in ("maze", "driving"):
            for s in sessions:
                replies = p.on(f"{proj}/assistant_response/{s}")
                assert [r.payload.decode() for r in replies] == [f"echo 1: {proj} {s} turn1"]
        assert engine.max_running_seen > 1, "requests must reach the engine concurrently"


async def test_sessions_keep_their_own_history():
    async with running_worker() as w, peer(w.port, ["maze/assistant_response/+"]) as p:
        for turn in (1, 2):
            await asyncio.gather(
                *(p.publish("maze/user_input", {"message": f"{s} t{turn}", "sessionId": s}) for s in ("a", "b"))
            )
            await p.wait_for(lambda got, n=2 * turn: len(got) >= n)
        a = [m.payload.decode() for m in p.on("maze/assistant_response/a")]
        b = [m.payload.decode() for m in p.on("maze/assistant_response/b")]
        assert a == ["echo 1: a t1", "echo 2: a t2"]  # the second turn saw the first
        assert b == ["echo 1: b t1", "echo 2: b t2"]


async def test_plain_text_payload_and_session_in_topic():
    async with running_worker() as w, peer(w.port, ["maze/assistant_response/+"]) as p:
        await p.publish("maze/user_input", "plain words")
        await p.publish("maze/user_input/robot1", "topic session")
        await p.wait_for(lambda got: len(got) >= 2)
        assert p.on("maze/assistant_response/default")[0].payload == b"echo 1: plain words"
        assert p.on("maze/assistant_response/robot1")[0].payload == b"echo 1: topic session"


async def test_bad_input_gets_one_classic_error_and_does_not_hurt_others():
    async with running_worker() as w, peer(w.port, ["maze/assistant_response/+"]) as p:
        await p.publish("maze/user_input", '{"message": "broken json"')  # not a JSON object: plain text
        await p.publish("maze/user_input", {"message": "x", "sessionId": "ok", "temperature": "hot"})
        await p.publish("maze/user_input", {"message": "fine", "sessionId": "good"})
        await p.wait_for(lambda got: len(got) >= 3)
        assert p.on("maze/assistant_response/default")[0].payload == b'echo 1: {"message": "broken json"'
        assert p.on("maze/assistant_response/ok")[0].payload.startswith(b"Error: Bad request")
        assert p.on("maze/assistant_response/good")[0].payload == b"echo 1: fine"
        await p.publish("maze/user_input", {"message": "last", "sessionId": "last"})  # a later answer ...
        await p.wait_for(lambda got: any(m.topic.endswith("/last") for m in got))
        assert len(p.received) == 4  # ... and still exactly one reply each before it


async def test_v2_reply_is_json_with_request_id():
    async with running_worker() as w, peer(w.port, ["maze/response/+"]) as p:
        await p.publish("maze/user_input", {"v": 2, "message": "hi", "clientId": "c1", "requestId": "r-1"})
        await p.wait_for(lambda got: len(got) >= 1)
        body = json.loads(p.on("maze/response/c1")[0].payload)
        assert body["requestId"] == "r-1"
        assert body["done"] is True
        assert body["text"] == "echo 1: hi"
        assert body["worker"] == "test-worker"
        assert body["usage"]["completionTokens"] == 3


async def test_overload_is_refused_at_once_with_overloaded():
    engine = FakeEngine(token_delay_s=0.2)
    async with (
        running_worker(engine, projects=["maze"], worker={"max_inflight": 2}) as w,
        peer(w.port, ["maze/response/+"]) as p,
    ):
        await asyncio.gather(
            *(
                p.publish("maze/user_input", {"v": 2, "message": "a b c", "clientId": "c", "requestId": f"r{i}"})
                for i in range(5)
            )
        )
        await p.wait_for(lambda got: len(got) >= 5)
        bodies = [json.loads(m.payload) for m in p.received]
        codes = sorted((b.get("error") or {}).get("code", "ok") for b in bodies)
        assert codes == ["ok", "ok", "overloaded", "overloaded", "overloaded"]
        assert all(b["error"]["retryAfterMs"] == 500 for b in bodies if "error" in b)


async def test_duplicate_request_id_in_flight_is_generated_once():
    engine = FakeEngine(token_delay_s=0.1)
    async with running_worker(engine) as w, peer(w.port, ["maze/response/+"]) as p:
        body = {"v": 2, "message": "one two", "clientId": "c", "requestId": "dup-1"}
        await p.publish("maze/user_input", body)
        await p.publish("maze/user_input", body)
        await p.wait_for(lambda got: len(got) >= 1)
        later = {"v": 2, "message": "a b c d e f g", "clientId": "c", "requestId": "after"}  # finishes later
        await p.publish("maze/user_input", later)
        await p.wait_for(lambda got: any(json.loads(m.payload)["requestId"] == "after" for m in got))
        assert [json.loads(m.payload)["requestId"] for m in p.received] == ["dup-1", "after"]


async def test_deadline_expires_with_typed_error_and_aborts_the_engine():
    engine = FakeEngine(token_delay_s=0.2)
    async with running_worker(engine) as w, peer(w.port, ["maze/response/+"]) as p:
        await p.publish(
            "maze/user_input",
            {"v": 2, "message": "a b c d e f", "clientId": "c", "requestId": "late", "deadlineMs": 300},
        )
        await p.wait_for(lambda got: len(got) >= 1)
        assert json.loads(p.received[0].payload)["error"]["code"] == "expired"
        assert engine.aborted == ["late"]


async def test_engine_failure_is_engine_error_and_the_worker_keeps_serving():
    engine = FakeEngine(fail_after=1)
    async with running_worker(engine) as w, peer(w.port, ["maze/assistant_response/+"]) as p:
        await p.publish("maze/user_input", {"message": "x y z", "sessionId": "a"})
        await p.wait_for(lambda got: len(got) >= 1)
        assert p.received[0].payload.startswith(b"Error: The model failed")
        engine._fail_after = None
        await p.publish("maze/user_input", {"message": "again", "sessionId": "b"})
        await p.wait_for(lambda got: len(got) >= 2)
        assert p.on("maze/assistant_response/b")[0].payload == b"echo 1: again"


async def test_drain_answers_unfinished_requests_shutting_down():
    engine = FakeEngine(token_delay_s=1.0)
    async with (
        running_worker(engine, worker={"drain_timeout_s": 0.2}) as w,
        peer(w.port, ["maze/response/+"]) as p,
    ):
        await p.publish("maze/user_input", {"v": 2, "message": "a b c d", "clientId": "c", "requestId": "slow"})
        await until(lambda: engine.running == 1)
        w.stop.set()
        await p.wait_for(lambda got: len(got) >= 1)
        assert json.loads(p.received[0].payload)["error"]["code"] == "shutting_down"


async def test_status_is_published_retained():
    async with running_worker() as w, peer(w.port, ["vllm-worker/+/status"]) as p:
        await p.wait_for(lambda got: any(json.loads(m.payload)["state"] == "ready" for m in got))
        status = json.loads(p.received[-1].payload)
        assert status["worker"] == "test-worker"
        assert status["projects"] == ["maze", "driving"]


async def test_unknown_fields_are_ignored_and_logged_once():
    from structlog.testing import capture_logs

    async with running_worker() as w, peer(w.port, ["maze/assistant_response/+"]) as p:
        with capture_logs() as logs:
            for i in range(3):
                await p.publish("maze/user_input", {"message": f"m{i}", "sessionId": f"u{i}", "colour": "blue"})
            await p.wait_for(lambda got: len(got) >= 3)
    assert all(not m.payload.startswith(b"Error") for m in p.received)
    warnings = [e for e in logs if e["event"] == "request.unknown_fields_ignored"]
    assert len(warnings) == 1
    assert warnings[0]["fields"] == ["colour"]
