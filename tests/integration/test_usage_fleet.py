"""Usage accounting and daily quotas (issue 31) on real Mosquitto + real Redis with 3 fake-engine workers, and
on the memory backend with one in-process worker: the counters equal what the replies said, exactly, across
workers, a worker restart and a Redis outage; quotas refuse once a budget is crossed, until UTC midnight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from support import ROOT, Peer, bodies, peer, running_worker, until, wait_ready, worker_subprocess

from worker.config import WorkerConfig
from worker.state import Counts, open_state
from worker.state.usage import DAY_S, PROJECT_WIDE, TOTAL, ms_to_midnight, utc_day

IDS = ["usage-a", "usage-b", "usage-c"]
REPLIES = ["general/response/+", "general/assistant_response/+"]


def env(redis_url: str, **extra: str) -> dict[str, str]:
    return {"VLLM_WORKER_STATE__URL": redis_url, "VLLM_WORKER_STATE__LEASE_S": "1.5", **extra}


def expected_counts(final: dict) -> Counts:
    """What a v2 final reply says the request spent (a refusal is not a request)."""
    error = final.get("error")
    if error and error["code"] in {"rate_limited", "quota_exceeded"}:
        return Counts(refused=1)
    usage = final.get("usage", {})
    return Counts(
        requests=1,
        prompt_tokens=usage.get("promptTokens", 0),
        completion_tokens=usage.get("completionTokens", 0),
        cached_tokens=usage.get("cachedTokens", 0),
        errors=int(error is not None),
    )


class Traffic:
    """Sends requests, and adds up per client what their final replies said they spent."""

    def __init__(self, p: Peer) -> None:
        self.p = p
        self.sent = 0  # numbers the requests
        self.published = 0  # requests published: each gets one final reply
        self.expected: dict[str, Counts] = defaultdict(Counts)
        self.twins: dict[str, str] = {}  # classic sessionId -> the v2 request that spent exactly as much

    async def v2(self, client: str, n: int, *, stateless: bool = False) -> None:
        for _ in range(n):
            self.sent += 1
            body: dict = {"v": 2, "clientId": client, "requestId": f"r{self.sent}"}
            if stateless:
                body["messages"] = [{"role": "user", "content": f"question {self.sent}"}]
            else:
                body |= {"sessionId": f"s{self.sent % 3}", "message": f"turn {self.sent}"}
            await self.p.publish("general/user_input", body)
            self.published += 1

    async def classic(self, n: int) -> None:
        """A classic request, and a v2 twin with the same prompt (a fresh session, same message): classic
        replies carry no usage, the twin's says what the engine counted for both."""
        for _ in range(n):
            self.sent += 1
            session, message = f"cls{self.sent}", f"plain {self.sent}"
            await self.p.publish("general/user_input", {"sessionId": session, "message": message})
            twin = f"twin{self.sent}"
            self.twins[twin] = session
            body = {"v": 2, "clientId": "twins", "sessionId": f"t{self.sent}", "requestId": twin, "message": message}
            await self.p.publish("general/user_input", body)
            self.published += 2

    async def settle(self, timeout_s: float = 30) -> None:
        """Every request answered; then add up what the finals said."""
        await self.p.wait_for(lambda got: len(got) >= self.published, timeout_s=timeout_s)
        self.expected.clear()
        for msg in self.p.received:
            if not msg.topic.startswith("general/response/"):
                continue  # classic answers are plain text: their twins say what they spent
            final = json.loads(msg.payload)
            counts = expected_counts(final)
            self.expected[msg.topic.rsplit("/", 1)[1]] += counts
            if final["requestId"] in self.twins:  # the classic request spent the same
                self.expected[self.twins[final["requestId"]]] += counts


async def fleet_counts(redis_url: str) -> dict[str, Counts]:
    """Today's counters of project `general` per client (and `*`), read from Redis as `usage` does."""
    cfg = WorkerConfig.model_validate({"state": {"url": redis_url}})
    async with open_state(cfg) as state:
        rows = await state.usage_rows(1, "general")
    return {r.client: r.counts for r in rows if r.day != TOTAL}


async def converged(redis_url: str, expected: dict[str, Counts], timeout_s: float = 20) -> dict[str, Counts]:
    want = {**expected, PROJECT_WIDE: sum(expected.values(), Counts())}
    deadline = time.monotonic() + timeout_s
    while True:
        got = await fleet_counts(redis_url)
        if got == want or time.monotonic() > deadline:
            assert got == want
            return got
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def fleet(broker_url: str, environ: dict[str, str]):
    with contextlib.ExitStack() as stack:
        yield {i: stack.enter_context(worker_subprocess(broker_url, i, ["general"], **environ)) for i in IDS}


async def test_counts_equal_the_replies_across_workers_a_restart_and_a_redis_outage(mosquitto, redis_server):
    environ = env(redis_server.url)
    async with peer(mosquitto.port, REPLIES, client_id="usage-peer", protocol="5") as p:
        traffic = Traffic(p)
        with fleet(mosquitto.url, environ) as procs:
            await wait_ready(mosquitto.port, *IDS)
            await traffic.v2("alpha", 12)
            await traffic.v2("beta", 9, stateless=True)
            await traffic.classic(6)
            await traffic.settle()
            assert {r.get("worker") for r in bodies(p.received) if "worker" in r} == set(IDS)  # spread
            await converged(redis_server.url, traffic.expected)

            procs["usage-b"].send_signal(signal.SIGTERM)  # a graceful restart sends what it holds first
            procs["usage-b"].wait(30)
            with worker_subprocess(mosquitto.url, "usage-b", ["general"], **environ):
                await wait_ready(mosquitto.port, "usage-b")
                await traffic.v2("alpha", 6)
                await traffic.classic(3)
                await traffic.settle()
                await converged(redis_server.url, traffic.expected)

                redis_server.stop(keep=True)  # an outage: stateless requests go on, stateful ones fail typed
                await traffic.v2("gamma", 9, stateless=True)
                await traffic.v2("alpha", 3)
                await traffic.settle()
                alpha = bodies(p.received, "general/response/alpha")
                assert {b["error"]["code"] for b in alpha if "error" in b} == {"state_unavailable"}
                redis_server.start()  # same port, same data: what the workers buffered is sent, once
                await converged(redis_server.url, traffic.expected)
    assert traffic.expected["gamma"].requests == 9
    assert traffic.expected["gamma"].prompt_tokens > 0
    # the command users run reads the same numbers
    cli = await usage_cli("--days", "1", "--project", "general", "--state-url", redis_server.url)
    rows = {(r["day"], r["client"]): r for r in cli}
    today = utc_day(time.time())
    assert rows[(today, "alpha")]["completion_tokens"] == traffic.expected["alpha"].completion_tokens
    assert rows[(today, "(project)")]["requests"] == sum(c.requests for c in traffic.expected.values())
    assert rows[(TOTAL, "(project)")]["prompt_tokens"] == sum(c.prompt_tokens for c in traffic.expected.values())


async def usage_cli(*args: str, **environ: str) -> list[dict]:
    """`vllm-worker usage --json ...` as an operator runs it; its rows."""
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "usage", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **environ},
    )
    assert cli.returncode == 0, cli.stderr
    return json.loads(cli.stdout)


def quota_topics(tmp_path: Path, quota: str) -> Path:
    topics = tmp_path / "topics"
    topics.mkdir()
    text = (ROOT / "topics" / "general.toml").read_text()
    (topics / "general.toml").write_text(text + f"\n[quota]\n{quota}\n")
    return topics


async def ask_until_refused(p: Peer, client: str, limit: int = 60) -> list[dict]:
    """One request at a time (each waits for its reply) until one is refused; the finals in order."""
    finals: list[dict] = []
    topic = f"general/response/{client}"
    before = len(bodies(p.received, topic))
    for n in range(before, before + limit):
        chat = [{"role": "user", "content": "hi"}]
        await p.publish(
            "general/user_input", {"v": 2, "clientId": client, "requestId": f"{client}-{n}", "messages": chat}
        )
        await p.wait_for(lambda got, n=n: len(bodies(got, topic)) > n, timeout_s=20)
        finals.append(bodies(p.received, topic)[n])
        if "error" in finals[-1]:
            return finals
    pytest.fail(f"never refused after {limit} requests")


def assert_refused_once_crossed(finals: list[dict], budget: int, spent_before: int = 0) -> None:
    """Admitted while under the budget, refused at once after crossing it, until the next UTC midnight."""
    answered, refusal = finals[:-1], finals[-1]
    tokens = [f["usage"]["promptTokens"] + f["usage"]["completionTokens"] for f in answered]
    assert spent_before + sum(tokens) >= budget  # crossed...
    assert spent_before + sum(tokens[:-1]) < budget  # ...by the last one admitted, and not before
    assert refusal["error"]["code"] == "quota_exceeded"
    assert abs(refusal["error"]["retryAfterMs"] - ms_to_midnight(time.time())) < 5_000


async def test_client_and_project_quotas_hold_fleet_wide(mosquitto, redis_server, tmp_path):
    topics = quota_topics(tmp_path, "client_tokens_per_day = 300\nproject_tokens_per_day = 500")
    environ = env(redis_server.url, VLLM_WORKER_WORKER__TOPICS_DIR=str(topics))
    async with peer(mosquitto.port, ["general/response/+"], client_id="quota-peer", protocol="5") as p:
        with fleet(mosquitto.url, environ):
            await wait_ready(mosquitto.port, *IDS)
            first = await ask_until_refused(p, "heavy")
            assert len({f.get("worker") for f in first[:-1]}) >= 2  # the budget is one for the fleet
            assert_refused_once_crossed(first, 300)
            again = await ask_until_refused(p, "heavy", limit=1)  # still refused: transient, never cached
            assert again[0]["error"]["code"] == "quota_exceeded"
            spent = sum(f["usage"]["promptTokens"] + f["usage"]["completionTokens"] for f in first[:-1])
            second = await ask_until_refused(p, "light")  # the project's budget runs out across clients
            spent_light = sum(f["usage"]["promptTokens"] + f["usage"]["completionTokens"] for f in second[:-1])
            assert spent_light < 300  # refused by the project's budget, before its own
            assert "project" in second[-1]["error"]["message"]
            assert_refused_once_crossed(second, 500, spent_before=spent)
    counts = await fleet_counts(redis_server.url)
    assert counts["heavy"].refused == 2
    assert counts["light"].refused == 1


async def test_the_memory_backend_counts_and_refuses_the_same_and_a_new_day_resets(mosquitto, tmp_path, monkeypatch):
    now = [time.time()]
    monkeypatch.setattr("worker.state.usage.wall_clock", lambda: now[0])
    topics = quota_topics(tmp_path, "client_tokens_per_day = 200")
    worker = {"topics_dir": str(topics), "telemetry_interval_s": 0.2}
    async with (
        running_worker(projects=["general"], broker_url=mosquitto.url, worker=worker) as w,
        peer(w.port, ["general/response/+"], protocol="5") as p,
    ):
        finals = await ask_until_refused(p, "solo")
        spent_at = now[0]
        assert_refused_once_crossed(finals, 200)
        rows = await w.service._pipeline.state.usage_rows(1, "general")  # the worker's own book
        solo = next(r.counts for r in rows if r.day != TOTAL and r.client == "solo")
        expected = sum((expected_counts(f) for f in finals), Counts())
        assert solo == expected
        # without Redis, `usage` reads the workers' telemetry (tokens since they started, per project)
        cli = await usage_cli("--wait", "2", "--broker", f"mqtt://127.0.0.1:{w.port}", VLLM_WORKER_STATE__URL="memory")
        (row,) = cli
        assert (row["day"], row["project"], row["requests"]) == ("since start", "general", len(finals))  # accepted
        assert row["prompt_tokens"] == expected.prompt_tokens
        assert row["completion_tokens"] == expected.completion_tokens
        now[0] = spent_at + ms_to_midnight(spent_at) / 1000  # midnight UTC: a new day's budget
        await p.publish(
            "general/user_input",
            {"v": 2, "clientId": "solo", "requestId": "next-day", "messages": [{"role": "user", "content": "hi"}]},
        )
        await until(lambda: any(b.get("requestId") == "next-day" for b in bodies(p.received)), timeout_s=10)
        assert "error" not in next(b for b in bodies(p.received) if b.get("requestId") == "next-day")
        assert utc_day(now[0]) == utc_day(spent_at + DAY_S)
