"""Hypothesis through the whole pipeline: generated payloads go over a real broker into a running worker
(fake engine); every one must be answered or counted, and nothing may escape as an internal error.

One worker runs for the module in a background event loop; each example publishes a batch of payloads
and waits until all are accounted for. 100 examples x 100 payloads = 10,000 payloads per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import peer, running_worker

from worker.engine.fake import FakeEngine

pytestmark = pytest.mark.faults
BATCH = 100
EXAMPLES = 100

ids = st.one_of(st.from_regex(r"[A-Za-z0-9_.:-]{1,12}", fullmatch=True), st.text(max_size=12))
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "message": st.text(max_size=60),
        "sessionId": ids,
        "clientId": ids,
        "requestId": ids,
        "v": st.sampled_from([1, 2, 3]),
        "temperature": values,
        "topP": values,
        "maxTokens": values,
        "stop": values,
        "stream": values,
        "replyTopic": st.sampled_from(["maze/response/x", "maze/assistant_response/y", "#", "a/+", "other"]),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bad"]), "content": values}),
            max_size=3,
        ),
        "jsonSchema": st.sampled_from([{"type": "object"}, {"type": "nope"}, 5]),
        "deadlineMs": values,
        "priority": values,
        "systemPrompt": values,
        "extra": values,
    },
)
# Hostile shapes (issue 13): deep nesting, huge numbers, odd schemas, BOMs, text that starts with "{".
SCHEMA_KEYS = ["type", "properties", "items", "$schema", "$ref", "anyOf", "enum", "required", "minimum", "pattern"]
schema_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=8), st.sampled_from(["object", "#/x"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from([*SCHEMA_KEYS, "a"]), inner, max_size=3)
    ),
    max_leaves=20,
)


def nested(levels: int, leaf: str = "1") -> str:
    return '{"a":' * levels + leaf + "}" * levels


hostile = st.one_of(
    st.integers(1, 3000).map(lambda n: f'{{"v":2,"message":"x","clientId":"h","x":{nested(n)}}}'),
    st.integers(1, 400).map(lambda n: f'{{"v":2,"message":"x","clientId":"h","jsonSchema":{nested(n, "{}")}}}'),
    st.tuples(st.sampled_from(["seed", "maxTokens", "priority", "x", "v"]), st.integers(1, 6000)).map(
        lambda kd: f'{{"v":2,"message":"x","clientId":"h","{kd[0]}":{"9" * kd[1]}}}'
    ),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0"]).map(
        lambda c: f'{{"v":2,"message":"x","clientId":"h","temperature":{c}}}'
    ),
    schema_values.map(lambda sch: json.dumps({"v": 2, "message": "x", "clientId": "h", "jsonSchema": sch})),
    fields.map(lambda d: "\ufeff" + json.dumps(d)),
    st.text(max_size=40).map(lambda t: "{" + t),
).map(str.encode)
payloads = st.one_of(
    fields.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=80),
    st.text(max_size=80).map(str.encode),
    hostile,
)


class Harness:
    """A worker + a listening peer on a background loop; `run(batch)` returns how many were accounted for."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self.stop = asyncio.Event()
        # rate limits off (maze has a bucket), dedupe on; replies of every shape are collected
        async with (
            running_worker(FakeEngine(), projects=["general"], worker={"max_inflight": 10_000}) as w,
            peer(w.port, ["general/response/#", "general/assistant_response/#"], client_id="fuzz") as p,
        ):
            self.worker, self.peer = w, p
            self.ready.set()
            await self.stop.wait()

    def final_replies(self) -> int:
        count = 0
        for m in self.peer.received:
            if m.topic.startswith("general/assistant_response/"):
                count += 1  # classic: every message is final
                continue
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                body = json.loads(m.payload)
                count += bool(isinstance(body, dict) and (body.get("done") or body.get("reset")))
        return count

    def counted(self) -> int:
        c = self.worker.service.counters
        return sum(v for (_, kind), v in c.items() if kind in ("unroutable", "duplicates"))

    async def _publish(self, batch: list[bytes]) -> None:
        for payload in batch:
            await self.peer.bus.publish("general/user_input", payload, wait=False)

    def run(self, batch: list[bytes], timeout_s: float = 30) -> dict[str, Any]:
        before = self.final_replies() + self.counted()
        asyncio.run_coroutine_threadsafe(self._publish(batch), self.loop).result(timeout_s)

        async def settle() -> int:
            async with asyncio.timeout(timeout_s):
                while self.final_replies() + self.counted() - before < len(batch):  # noqa: ASYNC110 - polls plain int counters
                    await asyncio.sleep(0.01)
            return self.final_replies() + self.counted() - before

        accounted = asyncio.run_coroutine_threadsafe(settle(), self.loop).result(timeout_s + 5)
        counters = self.worker.service.counters
        escaped = sum(v for (_, kind), v in counters.items() if kind in ("internal_errors", "poison"))
        return {"accounted": accounted, "internal": escaped, "running": not self.worker.task.done()}


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    h.thread.start()
    assert h.ready.wait(30)
    yield h
    assert h.stop is not None
    h.loop.call_soon_threadsafe(h.stop.set)
    h.thread.join(30)
    h.loop.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(payloads, min_size=BATCH, max_size=BATCH))
def test_every_payload_is_answered_or_counted_and_nothing_escapes(harness: Harness, batch: list[bytes]) -> None:
    result = harness.run(batch)
    assert result["accounted"] == len(batch)
    assert result["internal"] == 0
    assert result["running"]
