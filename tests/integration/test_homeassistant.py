"""Home Assistant discovery (issue 31) on a real Mosquitto: the retained configs use only documented keys
(a vendored list: Home Assistant itself needs a newer Python), their templates render the worker's real
status and telemetry to numbers, availability follows the retained status (the Last Will included), and
retiring the worker removes them."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import jinja2
from support import bodies, peer, running_worker

from worker.cli.retire import retire
from worker.config import BrokerConfig

DOC = json.loads((Path(__file__).resolve().parents[1] / "data" / "homeassistant_mqtt_sensor.json").read_text())
SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")


def render(template: str, payload: bytes) -> str:
    """A Home Assistant value template on an MQTT payload (its filters used here are Jinja's own)."""
    return jinja2.Environment(autoescape=False).from_string(template).render(value_json=json.loads(payload))  # noqa: S701


def check_config(topic: str, body: dict) -> None:
    prefix, component, node, obj, last = topic.split("/")
    assert (prefix, component, last) == ("homeassistant", "sensor", "config")
    assert SEGMENT.fullmatch(node), topic
    assert SEGMENT.fullmatch(obj), topic
    assert set(body) <= set(DOC["sensor_keys"]), set(body) - set(DOC["sensor_keys"])
    assert set(DOC["required"]) <= set(body)
    assert set(body["device"]) <= set(DOC["device_keys"])
    assert set(body["origin"]) <= set(DOC["origin_keys"])
    for item in body["availability"]:
        assert set(item) <= set(DOC["availability_keys"])
    if "state_class" in body:
        assert body["state_class"] in DOC["state_classes"]
    if body.get("device_class") == "data_size":
        assert body["unit_of_measurement"] in DOC["data_size_units"]


async def test_discovery_configs_are_documented_render_real_messages_and_are_removed_on_retire(mosquitto):
    worker = {"homeassistant_discovery": True, "telemetry_interval_s": 0.2, "id": "lab-gpu-1"}
    async with peer(mosquitto.port, ["homeassistant/#", "vllm-worker/#"], client_id="ha", protocol="5") as ha:
        async with running_worker(projects=["maze", "general"], broker_url=mosquitto.url, worker=worker):
            await ha.wait_for(lambda got: len([m for m in got if m.topic.endswith("/config")]) >= 6, timeout_s=10)
            await ha.wait_for(lambda got: any(m.topic.endswith("/telemetry") for m in got), timeout_s=10)
            configs = {m.topic: json.loads(m.payload) for m in ha.received if m.topic.startswith("homeassistant/")}
            status = [m.payload for m in ha.received if m.topic == "vllm-worker/lab-gpu-1/status"][-1]
            telemetry = next(m.payload for m in ha.received if m.topic == "vllm-worker/lab-gpu-1/telemetry")
            keys = {topic.split("/")[3] for topic in configs}
            assert keys == {"state", "kv_cache", "gen_tok_s", "gpu_memory", "tokens_today_maze", "tokens_today_general"}
            assert len({b["unique_id"] for b in configs.values()}) == len(configs)
            for topic, body in configs.items():
                check_config(topic, body)
                source = status if body["state_topic"].endswith("/status") else telemetry
                value = render(body["value_template"], source)
                if "unit_of_measurement" in body:
                    float(value)  # a number Home Assistant can plot (0 GPU memory on a CPU host)
                else:
                    assert value == "ready"
                (availability,) = body["availability"]
                assert availability["topic"] == "vllm-worker/lab-gpu-1/status"
                assert render(availability["value_template"], status) == DOC["payload_available_default"]
                offline = status.replace(b'"ready"', b'"offline"')  # what the Last Will says
                assert render(availability["value_template"], offline) == DOC["payload_not_available_default"]
        # stopped gracefully: the configs stay (the sensors show unavailable) until the worker is retired
        async with peer(mosquitto.port, ["homeassistant/#"], client_id="ha-after-stop", protocol="5") as after:
            await after.wait_for(lambda got: len(got) >= len(configs), timeout_s=10)
        await retire(BrokerConfig(url=mosquitto.url), "lab-gpu-1", topic_prefix="", ha_prefix="homeassistant")
    async with peer(
        mosquitto.port, ["homeassistant/#", "vllm-worker/+/status"], client_id="ha-2", protocol="5"
    ) as fresh:
        await asyncio.sleep(1.0)  # retained messages arrive right after SUBACK: none may come
        assert bodies(fresh.received) == []
        assert [m.topic for m in fresh.received] == []
