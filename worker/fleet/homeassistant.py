"""Home Assistant MQTT discovery: a worker's status and telemetry as sensors, without any YAML (issue 31).

With `worker.homeassistant_discovery`, a worker publishes one retained config per sensor under
`{homeassistant_prefix}/sensor/vllm_worker_{node}/{key}/config`: its state, KV-cache use, generated
tokens/s, GPU memory and, per project, today's tokens. Every sensor reads the worker's own messages
(the retained status, the telemetry) through a value template, and takes availability from the
retained status, whose Last Will says `offline`: a crashed worker shows unavailable. Retiring a worker
(`vllm-worker fleet --retire ID`) empties its configs, which removes the sensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from worker import __version__

ORIGIN = {"name": "vllm-worker", "sw_version": __version__, "support_url": "https://github.com/vllm-worker"}


@dataclass(frozen=True, slots=True)
class Sensor:
    """One sensor: where its value comes from (status or telemetry) and how Home Assistant shows it."""

    key: str
    name: str
    source: str
    """`status` or `telemetry`: the worker topic its template reads."""
    template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    icon: str | None = None


SENSORS = (
    Sensor("state", "State", "status", "{{ value_json.state }}", icon="mdi:state-machine"),
    Sensor(
        "kv_cache",
        "KV cache use",
        "telemetry",
        "{{ (value_json.engine.kvCacheUsage * 100) | round(1) }}",
        unit="%",
        state_class="measurement",
        icon="mdi:memory",
    ),
    Sensor(
        "gen_tok_s",
        "Generated tokens/s",
        "telemetry",
        "{{ value_json.engine.genTokPerS | round(1) }}",
        unit="tok/s",
        state_class="measurement",
        icon="mdi:speedometer",
    ),
    Sensor(
        "gpu_memory",
        "GPU memory used",
        "telemetry",
        "{{ value_json.gpus | sum(attribute='memUsedMib') }}",
        unit="MiB",
        device_class="data_size",
        state_class="measurement",
    ),
)


def node_id(worker_id: str) -> str:
    """The worker as a discovery node id (Home Assistant allows [a-zA-Z0-9_-] there)."""
    return "vllm_worker_" + re.sub(r"[^A-Za-z0-9_-]", "_", worker_id)


def config_filter(ha_prefix: str, worker_id: str) -> str:
    """Every discovery config of one worker (to find and empty them when it is retired)."""
    return f"{ha_prefix}/sensor/{node_id(worker_id)}/+/config"


def discovery(
    *, worker_id: str, topic_prefix: str, ha_prefix: str, projects: list[str], model: str
) -> list[tuple[str, bytes]]:
    """(topic, retained payload) for every sensor of this worker."""
    node = node_id(worker_id)
    topics = {
        "status": f"{topic_prefix}vllm-worker/{worker_id}/status",
        "telemetry": f"{topic_prefix}vllm-worker/{worker_id}/telemetry",
    }
    device = {
        "identifiers": [node],
        "name": f"vllm-worker {worker_id}",
        "manufacturer": "vllm-worker",
        "model": model[-100:],
        "sw_version": __version__,
    }
    availability = [
        {
            "topic": topics["status"],
            "value_template": "{{ 'online' if value_json.state in ['ready', 'draining'] else 'offline' }}",
        }
    ]
    sensors = list(SENSORS) + [
        Sensor(
            f"tokens_today_{re.sub(r'[^A-Za-z0-9_-]', '_', p)}",
            f"{p} tokens today",
            "telemetry",
            f"{{{{ value_json.projects[{json.dumps(p)}].tokensToday | default(0) }}}}",
            unit="tokens",
            state_class="total_increasing",
            icon="mdi:counter",
        )
        for p in projects
    ]
    out = []
    for s in sensors:
        body: dict[str, Any] = {
            "name": s.name,
            "unique_id": f"{node}_{s.key}",
            "state_topic": topics[s.source],
            "value_template": s.template,
            "availability": availability,
            "device": device,
            "origin": ORIGIN,
        }
        extra = {"unit_of_measurement": s.unit, "device_class": s.device_class, "state_class": s.state_class}
        body |= {k: v for k, v in extra.items() if v is not None}
        if s.icon is not None:
            body["icon"] = s.icon
        if s.source == "telemetry":
            body["expire_after"] = 120  # no telemetry for 2 minutes: unknown rather than a stale number
        out.append((f"{ha_prefix}/sensor/{node}/{s.key}/config", json.dumps(body, separators=(",", ":")).encode()))
    return out
