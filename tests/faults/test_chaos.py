"""The chaos run, short: 3 fake-engine workers, Mosquitto and Redis under every kind of fault for ~75 s,
then the checker must find nothing (the 20-minute run is `benchmarks/chaos.py --minutes 20`, not in CI).

The checker itself is tested first on hand-made stories, so a clean run means "nothing found", not
"nothing looked at": each class of violation it exists for (ghost turn, duplicate, gap, late reset,
two finals, a requestId generated twice) is caught, and a correct story passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import MOSQUITTO, REDIS_SERVER, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from chaos_checker import Evidence, check
from chaos_clients import Reply, RequestRecord, SessionRecord
from chaos_faults import KINDS, plan
from chaos_logs import LogLine, WorkerLogs

pytestmark = pytest.mark.faults
SEED = 7


class Story:
    """A session told turn by turn: what the client sent and what came back, with the workers' log lines."""

    def __init__(self, session: str = "c00s0") -> None:
        self.session = SessionRecord("c00", session)
        self.requests: dict[str, RequestRecord] = {}
        self.logs = WorkerLogs()
        self.clock = 1000.0

    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def turn(self, n: int, *finals: tuple[str | None, list[int] | None], worker: str = "w0") -> RequestRecord:
        """`finals`: (error code or None, turns listed in the answer or None for an error)."""
        rid = f"{self.session.session}t{n}"
        rec = RequestRecord(rid, "c00", self.session.session, n, f"{rid}m", sends=[(self.tick(), "first")])
        for code, history in finals:
            at = self.tick()
            seen = [f"{self.session.session}t{i}m" for i in history or []]
            text = "history: " + " | ".join(seen) if code is None else ""
            rec.finals.append(Reply(at, worker, 1, done=True, code=code, text=text, digest=f"{rid}-{code}-{text}"))
        self.requests[rid] = rec
        self.session.steps.append(("turn", rid))
        return rec

    def reset(self) -> None:
        self.session.steps.append(("reset", self.tick()))

    def generated(self, rid: str, worker: str = "w0", incarnation: int = 1, *, done: bool = True) -> None:
        self.logs.by_request[rid].append(LogLine(self.tick(), worker, incarnation, "fake.generated"))
        if done:
            self.logs.by_request[rid].append(LogLine(self.tick(), worker, incarnation, "request.done"))

    def kinds(self) -> list[str]:
        evidence = Evidence(self.requests, {self.session.session: self.session}, self.logs, [])
        return sorted(v.kind for v in check(evidence))


def test_the_checker_passes_a_correct_session_with_retries_a_cancel_and_a_reset():
    s = Story()
    s.turn(0, (None, [0]))
    s.turn(1, ("state_unavailable", None), (None, [0, 1]))  # a transient error, then the retry's answer
    s.turn(2, ("cancelled", None))
    s.turn(3, (None, [0, 1, 3]))
    s.reset()
    s.turn(4, (None, [4]))
    assert s.kinds() == []


def test_the_checker_finds_a_ghost_turn():
    s = Story()
    s.turn(0, (None, [0]))
    s.turn(1, ("state_unavailable", None), ("cancelled", None))  # told "not answered"...
    s.turn(2, (None, [0, 1, 2]))  # ...but it is in the history
    assert s.kinds() == ["ghost_turn"]


def test_the_checker_finds_a_retried_turn_recorded_twice():
    s = Story()
    s.turn(0, (None, [0]))
    s.turn(1, ("state_unavailable", None), (None, [0, 1, 1]))  # the failed attempt was recorded after all
    assert s.kinds() == ["ghost_turn"]
    s = Story()
    s.turn(0, (None, [0]))
    s.turn(1, (None, [0, 0, 1]))
    assert s.kinds() == ["duplicate_turn"]


def test_the_checker_finds_a_gap_and_a_reset_that_lost_its_place():
    s = Story()
    s.turn(0, (None, [0]))
    s.turn(1, (None, [1]))
    assert s.kinds() == ["missing_turn"]
    s = Story()
    s.turn(0, (None, [0]))
    s.logs.by_session[s.session.session].append(LogLine(s.tick(), "w2", 1, "session.reset"))
    s.turn(1, (None, [1]))
    assert s.kinds() == ["late_reset"]
    s = Story()
    s.turn(0, (None, [0]))
    s.reset()
    s.turn(1, (None, [0, 1]))
    assert s.kinds() == ["reset_lost"]


def test_the_checker_reports_one_fault_once_not_every_later_turn():
    s = Story()
    s.turn(0, ("cancelled", None))
    s.turn(1, (None, [0, 1]))
    s.turn(2, (None, [0, 1, 2]))
    s.turn(3, (None, [0, 1, 2, 3]))
    assert s.kinds() == ["ghost_turn"]


def test_the_checker_finds_two_finals_for_one_request():
    s = Story()
    s.turn(0, (None, [0]), ("cancelled", None))
    assert s.kinds() == ["conflicting_finals"]
    s = Story()
    rec = s.turn(0, ("cancelled", None))
    rec.finals.append(Reply(s.tick(), "w1", 2, done=True, code="cancelled", text="", digest="another"))
    assert s.kinds() == ["cancelled_twice"]
    s = Story()
    rec = s.turn(0, (None, [0]))
    rec.finals.append(rec.finals[0])  # a resend of the cached final: the same bytes, one final
    assert s.kinds() == []
    s = Story()
    rec = s.turn(0, ("state_unavailable", None))
    rec.gave_up = True
    assert s.kinds() == ["no_final"]


def test_the_checker_finds_a_request_generated_twice_but_excuses_a_crash():
    for w1_finished in (True, False):  # two answers; or a run nobody explains (no reply, w1 alive)
        s = Story()
        rec = s.turn(0, (None, [0]))
        s.generated(rec.rid, "w1", done=w1_finished)
        s.generated(rec.rid, "w0")
        rec.finals[0] = Reply(s.tick(), "w0", 1, done=True, code=None, text="history: c00s0t0m", digest="d")
        assert s.kinds() == ["generated_twice"]
    s = Story()
    rec = s.turn(0, (None, [0]))
    s.generated(rec.rid, "w1", done=False)
    s.logs.incarnations["w1"] = 2  # w1 was killed under it and restarted
    s.generated(rec.rid, "w0")
    rec.finals[0] = Reply(s.tick(), "w0", 1, done=True, code=None, text="history: c00s0t0m", digest="d")
    assert s.kinds() == []


def test_the_fault_plan_is_reproducible_and_meets_every_kind():
    workers = ["w0", "w1", "w2"]
    first = plan(SEED, 5, 60, 1, workers)
    assert first == plan(SEED, 5, 60, 1, workers)
    assert first != plan(SEED + 1, 5, 60, 1, workers)
    assert sorted(f.kind for f in first) == sorted(KINDS)
    assert all(5 <= f.at_s <= 60 for f in first)


@pytest.mark.timeout(420)
def test_a_short_chaos_run_finds_no_violation_and_injects_every_fault_kind(tmp_path):
    if MOSQUITTO is None or REDIS_SERVER is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto and redis-server are needed (`make test` installs them)")
        pytest.skip("mosquitto or redis-server is not installed")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--short", "--seed", str(SEED)]
    out = subprocess.run(
        [*cmd, "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # a kept work dir (violations) goes with tmp_path
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    print(out.stdout[-20000:])
    reports = list(tmp_path.glob("chaos-*.json"))
    assert reports, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(reports[0].read_text())
    assert report["faults_by_kind"] == {k: report["faults_by_kind"][k] for k in KINDS}
    assert all(n >= 1 for n in report["faults_by_kind"].values()), report["faults_by_kind"]
    assert report["counts"]["outcomes"].get("ok", 0) > 100, report["counts"]
    assert report["violations_by_kind"] == {}, out.stdout[-20000:]
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / reports[0].name.replace(".json", ".png")).stat().st_size > 0
