from types import SimpleNamespace

from structlog.testing import capture_logs

from worker.engine.stats import StatsAggregator
from worker.fleet.telemetry import GpuProbe, collect_process, process_tree_pids


def test_nvml_absent_degrades_to_no_gpus_with_one_warning():
    probe = GpuProbe()
    with capture_logs() as logs:
        first = probe.collect(process_tree_pids())
        second = probe.collect(process_tree_pids())
    if probe.available:  # a real GPU host: NVML answered, so the list is real
        assert first
        assert first[0].mem_total_mib > 0
        return
    assert first == second == []
    assert [e["event"] for e in logs] == ["telemetry.no_gpu"]


def test_process_report_counts_this_process():
    report = collect_process(0.0)
    assert report.rss_mib > 10
    assert report.uptime_s >= 0


def step(*, running=0, waiting=0, kv=0.0, queries=0, hits=0, gen=0, prompt=0, ttfts=(), tpots=()):
    sched = SimpleNamespace(
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        kv_cache_usage=kv,
        prefix_cache_stats=SimpleNamespace(queries=queries, hits=hits),
    )
    it = SimpleNamespace(
        num_generation_tokens=gen,
        prompt_token_stats=SimpleNamespace(total=prompt),
        num_preempted_reqs=0,
        time_to_first_tokens_iter=list(ttfts),
        finished_requests=[SimpleNamespace(mean_time_per_output_token=t) for t in tpots],
    )
    return sched, it


def test_stats_aggregator_rates_and_medians_over_the_window():
    now = [0.0]
    agg = StatsAggregator(clock=lambda: now[0], window_s=10)
    agg.record(*step(running=2, waiting=1, kv=0.5, queries=100, hits=25, prompt=100, ttfts=(0.1, 0.3)))
    for _ in range(10):
        now[0] += 1
        agg.record(*step(running=2, kv=0.5, gen=20, tpots=(0.03,)))
    snap = agg.snapshot()
    assert snap.running == 2
    assert snap.kv_cache_usage == 0.5
    assert snap.prefix_cache_hit_rate == 0.25
    assert snap.gen_tok_per_s == 20.0
    assert snap.ttft_ms_p50 == 200.0
    assert round(snap.tpot_ms_p50) == 30
    now[0] += 100  # everything leaves the window
    assert agg.snapshot().gen_tok_per_s == 0.0


def test_stats_aggregator_tolerates_missing_fields():
    agg = StatsAggregator()
    agg.record(SimpleNamespace(), SimpleNamespace())
    agg.record(None, None)
    assert agg.snapshot().running == 0
