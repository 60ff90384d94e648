"""The fleet view and the console's samples against hostile broker traffic: floods of made-up ids, workers
that publish a status and nothing else, cleared retained statuses, oversized fields and random payloads."""

from __future__ import annotations

import json
from unittest import mock

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from worker.console import samples as samples_module
from worker.console.samples import Samples
from worker.fleet import view as fleet_module
from worker.fleet.reports import ProcessReport, StatusReport, TelemetryReport
from worker.fleet.view import FleetState


def status(worker: str, state: str = "ready", model: str = "m") -> bytes:
    return StatusReport(
        state=state, worker=worker, projects=["maze"], model=model, quantization="none", version="0", since="now"
    ).to_json()


def telemetry(worker: str) -> bytes:
    return TelemetryReport(
        ts="now", worker=worker, model="m", quantization="none", process=ProcessReport(rss_mib=1, uptime_s=1)
    ).to_json()


def strict_json(data: bytes) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(constant)

    return json.loads(data, parse_constant=refuse)  # NaN / Infinity break a browser's JSON.parse


def rows(sample: bytes) -> dict[str, dict]:
    parsed = strict_json(sample)
    assert isinstance(parsed, dict)
    return {row["worker"]: row for row in parsed["workers"]}


def test_a_flood_of_made_up_workers_cannot_keep_a_real_one_out():
    now = [1000.0]
    fleet = FleetState(clock=lambda: now[0])
    for i in range(fleet_module.MAX_WORKERS + 100):
        fleet.handle(f"vllm-worker/fake-{i:05d}/status", status(f"fake-{i:05d}"))
    now[0] += 1
    assert fleet.handle("vllm-worker/zz-real/status", status("zz-real"))  # sorts after every fake id
    assert fleet.handle("vllm-worker/zz-real/telemetry", telemetry("zz-real"))
    assert len(fleet.workers) == fleet_module.MAX_WORKERS
    assert "zz-real" in {v.worker for v in fleet.views()}
    assert "fake-00000" not in fleet.workers  # the least recently seen went first
    assert "zz-real" in rows(Samples(fleet, clock=lambda: now[0]).take())  # and the console's sample lists it


def test_workers_that_only_publish_a_status_go_stale_then_are_forgotten():
    now = [1000.0]
    fleet = FleetState(clock=lambda: now[0], stale_after_s=30)
    assert fleet.handle("vllm-worker/ghost/status", status("ghost", "ready"))
    assert fleet.handle("vllm-worker/gone/status", status("gone", "offline"))
    assert fleet.handle("vllm-worker/live/status", status("live", "ready"))
    now[0] += 31
    assert fleet.handle("vllm-worker/live/telemetry", telemetry("live"))
    states = {w["worker"]: w["state"] for w in fleet.snapshot()}
    assert states == {"ghost": "stale", "gone": "offline", "live": "ready"}
    assert Samples(fleet, clock=lambda: now[0]).projects() == ["maze"]  # only the live one offers its projects
    now[0] += fleet_module.PRUNE_AFTER_STALE * 30 + 1
    assert fleet.views() == []  # silent ids do not pile up, whatever they claimed
    assert fleet.stored_bytes == 0


def test_an_empty_retained_status_removes_the_worker():
    fleet = FleetState()
    assert fleet.handle("vllm-worker/w1/status", status("w1"))
    assert fleet.handle("vllm-worker/w1/telemetry", telemetry("w1"))
    assert fleet.handle("vllm-worker/w1/status", b"")
    assert fleet.workers == {}
    assert fleet.stored_bytes == 0
    assert not fleet.handle("vllm-worker/w2/telemetry", b"")  # an empty telemetry is just invalid


def test_oversized_fields_are_refused_and_never_reach_a_sample():
    now = [1000.0]
    fleet = FleetState(clock=lambda: now[0])
    huge = json.loads(status("big"))
    huge["model"] = "x" * 2**20
    assert not fleet.handle("vllm-worker/big/status", json.dumps(huge).encode())
    assert fleet.refused["size"] == 1  # refused before parsing
    over_field = dict(huge, model="y" * 2000)  # small enough a payload, but over the model's field limit
    assert not fleet.handle("vllm-worker/big/status", json.dumps(over_field).encode())
    assert fleet.refused["invalid"] == 1
    assert not fleet.handle(f"vllm-worker/{'i' * 300}/status", status("i"))  # an id over the limit
    assert not fleet.handle("vllm-worker/bell\x07\x1b[2J/status", status("x"))  # terminal escapes in an id
    assert fleet.refused["id"] == 2
    assert fleet.workers == {}
    assert fleet.handle("vllm-worker/long/status", status("long", model="z" * 1000))  # within limits: clipped
    sample = Samples(fleet, clock=lambda: now[0]).take()
    assert rows(sample)["long"]["model"] == "z" * samples_module.TEXT_CHARS
    assert b"x" * 1000 not in sample
    assert b"y" * 1000 not in sample


def test_non_finite_numbers_do_not_break_the_pages_json():
    fleet = FleetState()
    body = json.loads(telemetry("nan"))
    body["engine"] = {"kvCacheUsage": float("nan"), "ttftMsP50": float("inf")}
    assert fleet.handle("vllm-worker/nan/telemetry", json.dumps(body).encode())  # Python's json writes NaN
    row = rows(Samples(fleet).take())["nan"]
    assert row["kvCacheUsage"] is None
    assert row["ttftMsP50"] is None


def test_the_workers_own_reports_stay_within_the_limits():
    projects = [f"project-{i:03d}-{'p' * 50}" for i in range(64)]
    report = StatusReport(
        state="ready",
        worker="h" * 128,
        projects=projects,
        model="m" * 255,
        quantization="int8_per_channel_weight_only",
        version="0.1.0",
        since="2026-01-01T00:00:00+00:00",
        adapters=dict.fromkeys(projects, "a" * 255),
    )
    payload = report.to_json()
    assert len(payload) <= fleet_module.MAX_REPORT_BYTES
    assert FleetState().handle(f"vllm-worker/{'h' * 128}/status", payload)


# ---- generative: random traffic never raises and never grows the view past its bounds --------------------

SMALL_WORKERS, SMALL_BYTES = 8, 16 * 1024
ids = st.one_of(
    st.sampled_from(["w0", "w1", "w2", "gpu-a-0"]),
    st.text(min_size=0, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def payloads(draw: st.DrawFn, worker: str) -> bytes:  # noqa: PLR0911 - one return per generated kind
    kind = draw(st.sampled_from(["status", "telemetry", "json", "bytes", "empty", "mutated", "padded"]))
    if kind == "status":
        return status(worker[:256] or "w", draw(st.sampled_from(["ready", "offline"])), draw(st.text(max_size=2000)))
    if kind == "telemetry":
        return telemetry(worker[:256] or "w")
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return b""
    if kind == "padded":  # valid, with a large unknown field (kept: newer workers may add fields)
        body = json.loads(status(worker[:256] or "w"))
        body["padding"] = "p" * draw(st.sampled_from([1000, SMALL_BYTES // 2, 3 * SMALL_BYTES]))
        return json.dumps(body).encode()
    body = json.loads(status(worker[:256] or "w"))
    body[draw(st.sampled_from(["model", "projects", "adapters", "extra", "worker"]))] = draw(json_values)
    return json.dumps(body).encode()


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes, float]:
    worker = draw(ids)
    kind = draw(st.sampled_from(["status", "telemetry", "other"]))
    return f"vllm-worker/{worker}/{kind}", draw(payloads(worker)), draw(st.floats(0, 200))


def held_bytes(fleet: FleetState) -> int:
    """What the stored reports weigh, re-encoded (extra fields included)."""
    reports = [r for v in fleet.workers.values() for r in (v.status, v.telemetry) if r is not None]
    return sum(len(r.to_json()) for r in reports)


@seed(20260501)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(messages(), max_size=40))
def test_random_traffic_never_raises_and_stays_bounded(traffic):
    now = [0.0]
    with (
        mock.patch.object(fleet_module, "MAX_WORKERS", SMALL_WORKERS),
        mock.patch.object(fleet_module, "MAX_STORED_BYTES", SMALL_BYTES, create=True),
    ):
        fleet = FleetState(clock=lambda: now[0], stale_after_s=30)
        sampler = Samples(fleet, clock=lambda: now[0])
        for topic, payload, advance_s in traffic:
            now[0] += advance_s
            fleet.handle(topic, payload)
            assert len(fleet.workers) <= SMALL_WORKERS
            assert held_bytes(fleet) <= 2 * SMALL_BYTES  # measured independently of the fleet's own count
            assert fleet.stored_bytes <= SMALL_BYTES
            assert fleet.stored_bytes == sum(v.stored_bytes for v in fleet.workers.values())
            assert all(0 < len(w) <= fleet_module.MAX_ID_CHARS and w.isprintable() for w in fleet.workers)
        sample = sampler.take()
        assert len(sample) <= samples_module.MAX_SAMPLE_BYTES
        assert len(rows(sample)) == len(fleet.workers)
        fleet.snapshot()
