"""The bus on a real Mosquitto: paho driven by the event loop (no network thread), backpressure, reconnect,
and a failed driver that stops the reader loudly instead of leaving it deaf."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
from support import free_port, peer

from worker.config import BrokerConfig
from worker.transport.broker import EmbeddedBroker
from worker.transport.bus import Bus, BusConnectError, BusFailedError


async def test_paho_runs_on_the_event_loop_with_no_network_thread(mosquitto):
    async with peer(mosquitto.port, ["t/echo"], "echo") as p, Bus(BrokerConfig(url=mosquitto.url), "nothread") as bus:
        for i in range(50):
            await bus.publish("t/echo", str(i).encode())  # QoS1: returns on the broker's PUBACK
        await p.wait_for(lambda got: len(got) == 50)
        names = [t.name for t in threading.enumerate()]
        assert not [n for n in names if n.startswith("paho")], names
    assert [m.payload for m in p.received] == [str(i).encode() for i in range(50)]


async def test_a_reader_that_is_behind_pauses_the_socket_and_loses_nothing(mosquitto):
    inbox = 4
    cfg = BrokerConfig(url=mosquitto.url)
    async with Bus(cfg, "slow", inbox_size=inbox) as slow, peer(mosquitto.port, [], "fast") as fast:
        await slow.subscribe(["t/flood"])
        for i in range(200):
            await fast.publish("t/flood", str(i))
        await asyncio.sleep(0.5)
        waiting = slow._inbox.qsize()
        assert waiting <= 2 * inbox + 1, waiting  # read paused at 2 x inbox_size; the broker keeps the rest
        got = []
        async with asyncio.timeout(20):
            while len(got) < 200:
                msg = await slow.messages()
                slow.ack(msg)
                got.append(int(msg.payload))
    assert got == list(range(200))


async def test_a_lost_connection_reconnects_and_restores_the_subscriptions(mosquitto):
    async with peer(mosquitto.port, ["t/back"], "survivor") as p:
        mosquitto.restart()
        async with Bus(BrokerConfig(url=mosquitto.url), "sender") as sender:
            for _ in range(100):  # until the survivor is back and subscribed again (backoff: 1 s first)
                await sender.publish("t/back", b"after the restart")
                if p.received:
                    break
                await asyncio.sleep(0.1)
        await p.wait_for(lambda got: any(m.payload == b"after the restart" for m in got), timeout_s=1)


async def test_the_v311_fallback_keeps_its_one_connection():
    """amqtt refuses v5; the refused probe must not leave a reconnect pending for the 3.1.1 connection."""
    async with EmbeddedBroker(BrokerConfig(embedded_port=free_port())) as amqtt:
        cfg = BrokerConfig(url=f"mqtt://127.0.0.1:{amqtt.port}")
        async with Bus(cfg, "fallback") as bus, peer(amqtt.port, [], "sender") as sender:
            assert not bus.is_v5
            await bus.subscribe(["t/one"])
            sock = bus._client.socket()  # type: ignore[union-attr]
            await asyncio.sleep(2.5)  # past the first reconnect backoff (1 s)
            assert bus._client.socket() is sock  # type: ignore[union-attr]
            await sender.publish("t/one", "still here")
            async with asyncio.timeout(5):
                msg = await bus.messages()
            assert msg.payload == b"still here"


async def test_a_driver_that_fails_makes_messages_raise_instead_of_going_deaf(mosquitto):
    async with Bus(BrokerConfig(url=mosquitto.url), "doomed") as bus:
        await bus.subscribe(["t/doom"])

        def broken(*_a: object) -> int:
            raise RuntimeError("paho broke")

        bus._client.loop_read = broken  # type: ignore[union-attr,method-assign]
        reader = asyncio.ensure_future(bus.messages())
        async with Bus(BrokerConfig(url=mosquitto.url), "trigger") as trigger:
            await trigger.publish("t/doom", b"x")
        with pytest.raises(BusFailedError) as failed:
            async with asyncio.timeout(5):
                await reader
        assert "paho broke" in str(failed.value.__cause__)
        with pytest.raises(BusFailedError):  # every later read too
            await bus.messages()


async def test_an_unreachable_broker_is_given_up_on_time_without_leaking_a_socket():
    cfg = BrokerConfig(url=f"mqtt://127.0.0.1:{free_port()}", connect_timeout_s=1)
    with pytest.raises(BusConnectError, match="cannot reach"):
        async with Bus(cfg, "nobody", protocol="3.1.1"):
            pass
    gc.collect()  # an unclosed socket would warn here, and warnings are errors in this suite
