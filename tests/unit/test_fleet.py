import json

from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from worker.fleet.reports import (
    EngineReport,
    GpuReport,
    ProcessReport,
    ProjectReport,
    StateReport,
    StatusReport,
    TelemetryReport,
)
from worker.fleet.view import FleetState, PrometheusCollector, render


def status(worker: str, state: str) -> bytes:
    return StatusReport(
        state=state,
        worker=worker,
        projects=["maze"],
        model="m",
        quantization="awq_marlin",
        version="0",
        since="now",
    ).to_json()


def telemetry(worker: str, store: StateReport | None = None) -> bytes:
    return TelemetryReport(
        ts="now",
        worker=worker,
        model="m",
        quantization="awq_marlin",
        gpus=[
            GpuReport(
                index=0,
                name="H100",
                mem_used_mib=40_000,
                mem_total_mib=80_000,
                util_pct=50,
                process_mem_mib=39_000,
            )
        ],
        engine=EngineReport(running=3, waiting=1, kv_cache_usage=0.25, gen_tok_per_s=120, ttft_ms_p50=41),
        projects={
            "maze": ProjectReport(
                requests=7,
                prompt_tokens=700,
                completion_tokens=90,
                cached_tokens=512,
                top_clients={"robot-1": 600, "robot-2": 190},
            )
        },
        process=ProcessReport(rss_mib=900, uptime_s=60),
        state=store or StateReport(backend="redis", healthy=True, latency_ms=0.4),
    ).to_json()


def fleet_with(now: list[float]) -> FleetState:
    fleet = FleetState(clock=lambda: now[0], stale_after_s=30)
    assert fleet.handle("vllm-worker/gpu-a-0/status", status("gpu-a-0", "ready"))
    assert fleet.handle("vllm-worker/gpu-a-0/telemetry", telemetry("gpu-a-0"))
    assert fleet.handle("vllm-worker/gpu-b-0/status", status("gpu-b-0", "offline"))
    return fleet


def test_fleet_ignores_foreign_and_invalid_messages():
    fleet = FleetState()
    assert not fleet.handle("maze/assistant_response/x", b"hello")
    assert not fleet.handle("vllm-worker/w/status", b"{not json")
    assert not fleet.handle("vllm-worker/w/status", b'{"state": "dancing"}')
    assert fleet.workers == {}


def test_live_table_renders_workers_states_and_gpu_memory():
    fleet = fleet_with([100.0])
    console = Console(record=True, width=200, color_system=None)
    console.print(render(fleet))
    text = console.export_text()
    assert "gpu-a-0" in text
    assert "gpu-b-0" in text
    assert "offline" in text
    assert "39/78G" in text
    assert "25%" in text
    assert "3/1" in text
    assert "redis 0.4 ms" in text


def test_a_worker_whose_state_store_is_down_shows_it():
    fleet = FleetState()
    down = StateReport(backend="redis", healthy=False, degraded=True)
    assert fleet.handle("vllm-worker/w/telemetry", telemetry("w", down))
    console = Console(record=True, width=200, color_system=None)
    console.print(render(fleet))
    assert "redis DOWN" in console.export_text()
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(fleet))
    assert 'vllm_worker:state_healthy{backend="redis",worker="w"} 0.0' in generate_latest(registry).decode()


def test_silent_worker_turns_stale_and_snapshot_reports_it():
    now = [100.0]
    fleet = fleet_with(now)
    now[0] = 200.0
    snap = {w["worker"]: w for w in fleet.snapshot()}
    assert snap["gpu-a-0"]["state"] == "stale"
    assert snap["gpu-b-0"]["state"] == "offline"
    assert snap["gpu-a-0"]["telemetry"]["engine"]["kvCacheUsage"] == 0.25


def test_prometheus_exposition_uses_vllm_names_with_worker_label():
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(fleet_with([100.0])))
    text = generate_latest(registry).decode()
    assert 'vllm:kv_cache_usage_perc{model_name="m",worker="gpu-a-0"} 0.25' in text
    assert 'vllm:num_requests_running{model_name="m",worker="gpu-a-0"} 3.0' in text
    assert 'vllm_worker:up{state="offline",worker="gpu-b-0"} 0.0' in text
    assert 'vllm_worker:gpu_memory_used_bytes{gpu="0",worker="gpu-a-0"}' in text
    assert 'vllm_worker:requests_total{project="maze",worker="gpu-a-0"} 7.0' in text
    assert 'vllm_worker:state_healthy{backend="redis",worker="gpu-a-0"} 1.0' in text
    assert 'vllm_worker:tokens_total{kind="prompt",project="maze",worker="gpu-a-0"} 700.0' in text
    assert 'vllm_worker:tokens_total{kind="cached",project="maze",worker="gpu-a-0"} 512.0' in text
    assert 'vllm_worker:client_tokens_total{client="robot-1",project="maze",worker="gpu-a-0"} 600.0' in text


def test_a_report_with_more_top_clients_than_the_bound_is_refused():
    flood = {f"c{i}": i for i in range(17)}  # telemetry carries at most 16: a hostile report cannot add labels
    body = TelemetryReport.model_validate_json(telemetry("w"))
    bad = body.model_dump(by_alias=True) | {"projects": {"maze": {"topClients": flood}}}
    fleet = FleetState()
    assert not fleet.handle("vllm-worker/w/telemetry", json.dumps(bad).encode())
    assert fleet.handle("vllm-worker/w/telemetry", telemetry("w"))  # (the same report within bounds is read)


def test_a_flood_of_worker_ids_is_bounded():
    from worker.fleet import view as fleet_module

    fleet = FleetState()
    for i in range(fleet_module.MAX_WORKERS + 50):
        fleet.handle(f"vllm-worker/w{i}/status", status(f"w{i}", "ready"))
    assert len(fleet.workers) == fleet_module.MAX_WORKERS
    assert fleet.handle("vllm-worker/w0/status", status("w0", "draining"))  # known workers still update
