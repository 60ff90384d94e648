"""Scale-out on Mosquitto (MQTT 5): shared subscriptions, redelivery across a crash, drain, intake
credit, broker restart, auth + ACL and TLS. Workers use the fake engine in their own processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from support import DeployedMosquitto, Mosquitto, peer, running_worker, until, wait_ready, worker_subprocess

from worker.client import Client
from worker.config import BrokerConfig
from worker.engine.fake import FakeEngine
from worker.transport.bus import BusConnectError

SLOW = {"VLLM_WORKER_FAKE_TOKEN_DELAY_S": "0.2"}  # "echo 1: <message>" = 3+ tokens -> ~0.6 s per request


@pytest.fixture
def mosquitto():
    broker = Mosquitto("persistence true\npersistence_location {dir}/\n").start()
    yield broker
    broker.stop()


async def ask_many(port: int, n: int, client_id: str = "load", project: str = "general") -> list:
    async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id=client_id) as c:
        return await asyncio.gather(
            *(c.ask(project, f"q{i}", session=f"s{i}", request_id=f"{client_id}-{i}", timeout_s=60) for i in range(n))
        )


async def test_three_workers_split_a_project_evenly_and_answer_each_request_once(mosquitto):
    ids = ["split-a", "split-b", "split-c"]
    with (
        worker_subprocess(mosquitto.url, ids[0], ["general"]),
        worker_subprocess(mosquitto.url, ids[1], ["general"]),
        worker_subprocess(mosquitto.url, ids[2], ["general"]),
    ):
        await wait_ready(mosquitto.port, *ids)
        replies = await ask_many(mosquitto.port, 90)
    assert all(r.ok for r in replies)
    assert len({r.request_id for r in replies}) == 90
    per_worker = Counter(r.raw["worker"] for r in replies)
    assert set(per_worker) == set(ids)
    assert all(20 <= n <= 40 for n in per_worker.values()), per_worker  # 30 each, within +-30%


async def test_a_killed_workers_requests_are_redelivered_after_restart_exactly_once(mosquitto):
    async with peer(mosquitto.port, ["general/response/#"], client_id="finals", protocol="5") as finals:
        with (
            worker_subprocess(mosquitto.url, "crash-a", ["general"], **SLOW),
            worker_subprocess(mosquitto.url, "crash-b", ["general"], **SLOW) as b,
        ):
            await wait_ready(mosquitto.port, "crash-a", "crash-b")
            async with Client(BrokerConfig(url=f"mqtt://127.0.0.1:{mosquitto.port}"), client_id="app") as c:
                bodies = [
                    {"v": 2, "message": f"m{i}", "sessionId": f"s{i}", "clientId": "app", "requestId": f"r{i}"}
                    for i in range(12)
                ]
                for body in bodies:
                    await c._bus.publish("general/user_input", json.dumps({**body, "stream": True}).encode())
            # a first chunk of r0 and r1 (round robin: one on each worker): both are mid-generation
            await finals.wait_for(lambda got: {json.loads(m.payload)["requestId"] for m in got} >= {"r0", "r1"})
            b.send_signal(signal.SIGKILL)
            b.wait(10)
            with worker_subprocess(mosquitto.url, "crash-b", ["general"], **SLOW):  # same id: same session
                await finals.wait_for(
                    lambda got: (
                        len({json.loads(m.payload)["requestId"] for m in got if json.loads(m.payload).get("done")})
                        >= 12
                    ),
                    timeout_s=60,
                )
                async with Client(BrokerConfig(url=mosquitto.url), client_id="app") as c:  # one later answer each:
                    late = [c.ask("general", "a b c d e f g h", request_id=f"late{i}", timeout_s=30) for i in range(2)]
                    assert all(r.ok for r in await asyncio.gather(*late))  # a duplicate would have come first
                # the app got its answers; the `finals` peer gets the same finals on its own connection, maybe later
                await finals.wait_for(
                    lambda got: (
                        {"late0", "late1"}
                        <= {json.loads(m.payload)["requestId"] for m in got if json.loads(m.payload).get("done")}
                    )
                )
    finals_by_id = Counter(json.loads(m.payload)["requestId"] for m in finals.received if json.loads(m.payload)["done"])
    assert finals_by_id == Counter({**{f"r{i}": 1 for i in range(12)}, "late0": 1, "late1": 1})
    workers = {json.loads(m.payload)["worker"] for m in finals.received if json.loads(m.payload)["done"]}
    assert workers == {"crash-a", "crash-b"}


async def test_sigterm_drains_and_leaves_unfinished_requests_for_redelivery(mosquitto):
    env = {**SLOW, "VLLM_WORKER_WORKER__DRAIN_TIMEOUT_S": "0.3"}
    async with peer(
        mosquitto.port, ["general/response/#", "vllm-worker/drain-a/status"], client_id="watch", protocol="5"
    ) as watch:
        with worker_subprocess(mosquitto.url, "drain-a", ["general"], **env) as a:
            await wait_ready(mosquitto.port, "drain-a")
            for i in range(4):
                body = {"v": 2, "message": "a b c d e f", "sessionId": f"s{i}", "clientId": "app", "requestId": f"d{i}"}
                await watch.publish("general/user_input", {**body, "stream": True})
            await watch.wait_for(  # a first chunk of each: all four are mid-generation
                lambda got: (
                    {f"d{i}" for i in range(4)}
                    <= {json.loads(m.payload).get("requestId") for m in got if m.topic.startswith("general/response/")}
                )
            )
            a.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(a.wait, 20) == 0
        states = [json.loads(m.payload)["state"] for m in watch.received if m.topic.endswith("/status")]
        assert "draining" in states
        assert states[-1] == "offline"
        early = [json.loads(m.payload) for m in watch.received if m.topic.startswith("general/response/")]
        assert not [b for b in early if b.get("error", {}).get("code") == "shutting_down"]  # left for redelivery
        with worker_subprocess(mosquitto.url, "drain-a", ["general"], **SLOW):
            await watch.wait_for(
                lambda got: (
                    len(
                        {
                            json.loads(m.payload)["requestId"]
                            for m in got
                            if m.topic.startswith("general/response/") and json.loads(m.payload).get("done")
                        }
                    )
                    >= 4
                ),
                timeout_s=60,
            )
    done = [json.loads(m.payload) for m in watch.received if m.topic.startswith("general/response/")]
    assert Counter(b["requestId"] for b in done if b["done"]) == Counter({f"d{i}": 1 for i in range(4)})
    assert all("error" not in b for b in done)


async def test_receive_maximum_bounds_what_one_worker_takes_in(mosquitto):
    engine = FakeEngine(token_delay_s=0.1)
    async with running_worker(
        engine,
        projects=["general"],
        broker_url=mosquitto.url,
        worker={"receive_maximum": 2},
        broker={"session_expiry_s": 0},
    ) as w:
        replies = await ask_many(w.port, 20)
    assert all(r.ok for r in replies)
    # 2 unacked at a time, plus Mosquitto 2.0's overshoot after acks (measured 4-6); without the credit all
    # 20 would be in the engine at once
    assert engine.max_running_seen <= 10


async def test_broker_restart_mid_generation_replies_arrive_after_reconnect(mosquitto):
    engine = FakeEngine(token_delay_s=0.3)
    async with running_worker(engine, projects=["general"], broker_url=mosquitto.url):
        async with Client(BrokerConfig(url=mosquitto.url), client_id="steady", persistent=True) as c:
            ask = asyncio.create_task(c.ask("general", "a b c d e", request_id="through-restart", timeout_s=60))
            await until(lambda: engine.running == 1)
            await asyncio.to_thread(mosquitto.restart)
            reply = await ask
        assert reply.ok
        assert reply.text == "echo 1: a b c d e"
        async with Client(BrokerConfig(url=mosquitto.url)) as c2:  # the worker re-subscribed
            assert (await c2.ask("general", "after", timeout_s=30)).ok


@pytest.fixture
def secured():
    broker = DeployedMosquitto({"app-1": "app-pw-456", "app-2": "app-pw-789"}, {"worker": "worker-pw-123"})
    yield broker.start()
    broker.stop()


async def test_auth_and_the_deployed_acl_grant_exactly_what_the_protocol_needs(secured, monkeypatch):
    monkeypatch.setenv("VLLM_WORKER_BROKER__USERNAME", "worker")
    monkeypatch.setenv("VLLM_WORKER_BROKER__PASSWORD", "worker-pw-123")
    with worker_subprocess(secured.worker_url, "acl-w", ["general"]):
        app1 = BrokerConfig(url=secured.app_url, username="app-1", password="app-pw-456")
        app2 = BrokerConfig(url=secured.app_url, username="app-2", password="app-pw-789")
        async with Client(app1, client_id="app-1") as c:
            # retried with the same requestId until the worker has subscribed (dedupe keeps it single)
            assert (await c.ask("general", "hello", timeout_s=3, retries=10)).ok
        async with Client(app2, client_id="app-2") as snoop, Client(app1, client_id="app-1") as owner:
            snoop._subscribed.add("general/response/app-1")
            await snoop._bus.subscribe(["general/response/app-1"])  # ACL: only the account app-1 may read it
            got = []
            snoop._inboxes["spy"] = asyncio.Queue()
            assert (await owner.ask("general", "private", request_id="spy", timeout_s=30)).ok
            assert (await snoop.ask("general", "mine", timeout_s=30)).ok  # its own answer comes after any leak
            got = list(snoop._inboxes["spy"]._queue)
        assert got == []
    with pytest.raises(Exception, match="refused the credentials"):
        async with Client(BrokerConfig(url=secured.app_url, username="app-1", password="wrong", protocol="5")):
            pass
    with pytest.raises(Exception, match="refused the credentials"):  # apps cannot log in where workers do
        async with Client(BrokerConfig(url=secured.worker_url, username="app-1", password="app-pw-456")):
            pass


def make_tls(directory: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1."""

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    )
    for f in directory.iterdir():
        f.chmod(0o644)


async def test_mqtts_with_a_private_ca(monkeypatch):
    broker = Mosquitto("cafile {dir}/ca.crt\ncertfile {dir}/server.crt\nkeyfile {dir}/server.key\n")
    make_tls(broker.dir)
    broker.start()
    try:
        url = f"mqtts://127.0.0.1:{broker.port}"
        monkeypatch.setenv("VLLM_WORKER_BROKER__CA_FILE", str(broker.dir / "ca.crt"))
        with worker_subprocess(url, "tls-w", ["general"]):
            tls = BrokerConfig(url=url, ca_file=str(broker.dir / "ca.crt"))
            async with Client(tls) as c:
                reply = await c.ask("general", "over tls", timeout_s=3, retries=10)
        assert reply.ok
        with pytest.raises(BusConnectError, match="certificate"):  # without our CA: refused at once, no retry
            async with Client(BrokerConfig(url=url, connect_timeout_s=3, protocol="5")):
                pass
    finally:
        broker.stop()
