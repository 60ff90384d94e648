"""Status lifecycle, Last Will, telemetry schema and the fleet view on real brokers."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

from support import ROOT, peer, running_worker, worker_subprocess

from worker.fleet.reports import StatusReport, TelemetryReport


def states(received, worker_id: str) -> list[str]:
    topic = f"vllm-worker/{worker_id}/status"
    return [StatusReport.model_validate_json(m.payload).state for m in received if m.topic == topic]


async def test_status_goes_starting_ready_draining_offline_on_sigterm(mosquitto):
    async with peer(mosquitto.port, ["vllm-worker/+/status"], protocol="5") as p:
        with worker_subprocess(mosquitto.url, "life-1", ["maze"]) as proc:
            await p.wait_for(lambda got: "ready" in states(got, "life-1"), timeout_s=30)
            proc.send_signal(signal.SIGTERM)
            await p.wait_for(lambda got: "offline" in states(got, "life-1"), timeout_s=15)
            assert await asyncio.to_thread(proc.wait, 10) == 0
    assert states(p.received, "life-1") == ["starting", "ready", "draining", "offline"]


async def test_last_will_marks_a_killed_worker_offline_retained(mosquitto):
    async with peer(mosquitto.port, ["vllm-worker/+/status"], protocol="5") as p:
        with worker_subprocess(mosquitto.url, "lwt-1", ["maze"]) as proc:
            await p.wait_for(lambda got: "ready" in states(got, "lwt-1"), timeout_s=30)
            proc.send_signal(signal.SIGKILL)
            await p.wait_for(lambda got: "offline" in states(got, "lwt-1"), timeout_s=15)
    async with peer(mosquitto.port, ["vllm-worker/lwt-1/status"], client_id="late", protocol="5") as late:
        await late.wait_for(lambda got: len(got) >= 1)
        assert states(late.received, "lwt-1") == ["offline"]  # retained for late subscribers


async def test_telemetry_matches_the_shared_schema_and_counts_requests():
    async with (
        running_worker(worker={"telemetry_interval_s": 0.2, "project_telemetry": True}) as w,
        peer(w.port, ["vllm-worker/+/telemetry", "maze/telemetry", "maze/assistant_response/+"]) as p,
    ):
        await p.publish("maze/user_input", {"message": "count me", "sessionId": "t1"})
        await p.wait_for(
            lambda got: any(
                m.topic == "vllm-worker/test-worker/telemetry"
                and TelemetryReport.model_validate_json(m.payload).projects["maze"].requests == 1
                for m in got
            )
        )
        await p.wait_for(lambda got: any(m.topic == "maze/telemetry" for m in got))
    fleet_msgs = [m for m in p.received if m.topic == "vllm-worker/test-worker/telemetry"]
    report = TelemetryReport.model_validate_json(fleet_msgs[-1].payload)
    raw = json.loads(fleet_msgs[-1].payload)
    assert set(raw) >= {"ts", "worker", "model", "quantization", "gpus", "engine", "projects", "process"}
    assert set(raw["engine"]) >= {
        "running",
        "waiting",
        "kvCacheUsage",
        "prefixCacheHitRate",
        "promptTokPerS",
        "genTokPerS",
        "ttftMsP50",
        "tpotMsP50",
        "preemptions",
    }
    assert report.worker == "test-worker"
    assert report.process.rss_mib > 0
    assert report.projects["maze"].sessions == 1
    project_only = TelemetryReport.model_validate_json(
        next(m for m in p.received if m.topic == "maze/telemetry").payload
    )
    assert list(project_only.projects) == ["maze"]


def fleet_json(url: str, wait_s: float = 2.0) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "worker", "fleet", "--broker", url, "--once", "--json", "--wait", str(wait_s)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


async def test_fleet_once_json_sees_two_workers_and_a_killed_one_goes_offline(mosquitto):
    fast = {"VLLM_WORKER_WORKER__TELEMETRY_INTERVAL_S": "0.3"}
    async with peer(mosquitto.port, ["vllm-worker/+/status"], protocol="5") as p:
        with (
            worker_subprocess(mosquitto.url, "fleet-a", ["maze"], **fast),
            worker_subprocess(mosquitto.url, "fleet-b", ["driving", "racing"], **fast) as b,
        ):
            await p.wait_for(
                lambda got: "ready" in states(got, "fleet-a") and "ready" in states(got, "fleet-b"),
                timeout_s=30,
            )
            snapshot = {w["worker"]: w for w in await asyncio.to_thread(fleet_json, mosquitto.url)}
            assert set(snapshot) == {"fleet-a", "fleet-b"}
            assert all(w["state"] == "ready" and w["telemetry"] is not None for w in snapshot.values())
            assert snapshot["fleet-b"]["status"]["projects"] == ["driving", "racing"]
            assert snapshot["fleet-a"]["telemetry"]["gpus"] == []  # no GPU here
            b.send_signal(signal.SIGKILL)
            await p.wait_for(lambda got: "offline" in states(got, "fleet-b"), timeout_s=15)
            after = {w["worker"]: w["state"] for w in await asyncio.to_thread(fleet_json, mosquitto.url, 1.0)}
            assert after == {"fleet-a": "ready", "fleet-b": "offline"}
