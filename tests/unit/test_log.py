import pytest
import structlog

from worker.log import REDACTED, redact


@pytest.fixture(autouse=True)
def _restore_structlog():
    """`setup` points structlog at capsys' stream, closed after the test: later tests must not write there."""
    yield
    structlog.reset_defaults()


def test_secret_keys_are_redacted_and_others_kept():
    event = {"password": "p", "mqtt_password": "p2", "api_key": "k", "token": "t", "tokens": 5, "event": "x"}
    out = redact(None, "info", dict(event))
    assert out["password"] == out["mqtt_password"] == out["api_key"] == out["token"] == REDACTED
    assert out["tokens"] == 5


def test_redaction_runs_in_the_configured_pipeline(capsys):
    from worker.config import LogConfig
    from worker.log import setup

    setup(LogConfig(level="debug"))
    structlog.get_logger("t").debug("bus.connecting", password="hunter2-secret")
    err = capsys.readouterr().err
    assert "bus.connecting" in err
    assert "hunter2-secret" not in err


def test_tracebacks_are_limited_per_event_and_window_then_one_line():
    from worker.log import TracebackLimiter

    now = [0.0]
    limiter = TracebackLimiter(per_window=3, window_s=60, clock=lambda: now[0])
    outs = []
    for i in range(10):
        exc = ValueError(f"boom {i}" + "x" * 500)
        outs.append(limiter(None, "error", {"event": "request.failed", "exc_info": exc}))
    assert [("exc_info" in o) for o in outs] == [True] * 3 + [False] * 7
    assert outs[-1]["traceback_suppressed"] == 7
    assert outs[-1]["error"].startswith("ValueError: boom 9")
    assert len(outs[-1]["error"]) <= 200
    other = limiter(None, "error", {"event": "other.failed", "exc_info": ValueError("x")})
    assert "exc_info" in other  # each event has its own budget
    now[0] = 61.0
    assert "exc_info" in limiter(None, "error", {"event": "request.failed", "exc_info": ValueError("y")})


def test_the_configured_pipeline_limits_tracebacks(capsys):
    from worker.config import LogConfig
    from worker.log import setup

    setup(LogConfig(level="info"))
    log = structlog.get_logger("t")

    def bug() -> None:
        raise RuntimeError("a bug of ours")

    for _ in range(20):
        try:
            bug()
        except RuntimeError:
            log.exception("request.poison")
    err = capsys.readouterr().err
    assert err.count("Traceback (most recent call last)") <= 5
    assert err.count("] request.poison") == 20  # every event still logs its one line
