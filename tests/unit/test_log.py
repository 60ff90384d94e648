import structlog

from worker.log import REDACTED, redact


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
