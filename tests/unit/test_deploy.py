"""deploy/: the compose file, the systemd unit, the Dockerfile and the Mosquitto config are checked."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from support import ROOT, free_port, wait_port

from worker.config import WorkerConfig

DEPLOY = ROOT / "deploy"


def test_compose_has_mosquitto_two_workers_and_the_fleet_view():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mosquitto", "worker-a", "worker-b", "fleet"}
    drain_s = WorkerConfig().worker.drain_timeout_s
    for name in ("worker-a", "worker-b"):
        svc = services[name]
        assert svc["restart"] == "on-failure"
        assert int(svc["stop_grace_period"].rstrip("s")) >= drain_s + 10
        assert any(v.endswith(":/models:ro") for v in svc["volumes"])
        assert "VLLM_WORKER_BROKER__PASSWORD" in svc["environment"]  # from .env, never the command line
        assert "--mqtt-password" not in svc["command"]
        assert svc["command"][svc["command"].index("--worker-id") + 1] == name  # stable ids: redelivery
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")


def test_systemd_unit_restarts_on_failure_and_waits_for_the_drain():
    unit = (DEPLOY / "systemd" / "vllm-worker.service").read_text()
    assert re.search(r"^Restart=on-failure$", unit, re.MULTILINE)
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert stop >= WorkerConfig().worker.drain_timeout_s + 10
    if shutil.which("systemd-analyze"):
        out = subprocess.run(
            ["systemd-analyze", "verify", str(DEPLOY / "systemd" / "vllm-worker.service")],
            capture_output=True,
            text=True,
            check=False,
        )
        # a build machine lacks the user, venv and env file the unit names; syntax errors are what count
        assert "Unknown key" not in out.stderr, out.stderr
        assert "Invalid" not in out.stderr, out.stderr


def test_dockerfile_is_non_root_with_a_model_volume_and_both_variants():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER worker$", text, re.MULTILINE)
    assert 'VOLUME ["/models"]' in text
    assert "ARG VARIANT=cpu" in text
    assert ".[${VARIANT},bnb]" in text
    assert "torchvision" in text  # removed after install (CUDA builds break `import vllm` on CPU)


def test_the_shipped_mosquitto_config_starts(tmp_path):
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not shutil.os.path.exists(binary):  # type: ignore[attr-defined]
        pytest.skip("mosquitto not installed")
    port = free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    conf = conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
    conf = re.sub(r"^(password_file|acl_file) .*$", "", conf, flags=re.MULTILINE)
    conf = conf.replace("allow_anonymous false", "allow_anonymous true")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/")
    tmp_path.chmod(0o777)
    path = tmp_path / "m.conf"
    path.write_text(conf)
    path.chmod(0o644)
    proc = subprocess.Popen([binary, "-c", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, proc)  # raises if Mosquitto rejected the shipped config and exited
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
