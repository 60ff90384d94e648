"""deploy/: the compose file, the systemd unit, the Dockerfile and the Mosquitto config are checked."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml
from support import ROOT, DeployedMosquitto

from worker.config import WorkerConfig

DEPLOY = ROOT / "deploy"


def test_compose_has_mosquitto_valkey_two_workers_and_the_fleet_view():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mosquitto", "valkey", "worker-a", "worker-b", "fleet"}
    drain_s = WorkerConfig().worker.drain_timeout_s
    for name in ("worker-a", "worker-b"):
        svc = services[name]
        assert svc["restart"] == "on-failure"
        assert int(svc["stop_grace_period"].rstrip("s")) >= drain_s + 10
        assert any(v.endswith(":/models:ro") for v in svc["volumes"])
        assert "VLLM_WORKER_BROKER__PASSWORD" in svc["environment"]  # from .env, never the command line
        assert "--mqtt-password" not in svc["command"]
        assert svc["command"][svc["command"].index("--worker-id") + 1] == name  # stable ids: redelivery
        state_url = svc["environment"]["VLLM_WORKER_STATE__URL"]  # one shared state for the fleet
        resolved = re.sub(r"\$\{[^}]*\}", "pw", state_url)  # what compose substitutes from .env
        assert WorkerConfig.model_validate({"state": {"url": resolved}})
        assert "valkey" in svc["depends_on"]
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    valkey = services["valkey"]
    assert "ports" not in valkey  # reachable by the workers only
    assert "--appendonly" in valkey["command"]  # conversations survive a Valkey restart
    assert "--requirepass" in valkey["command"]


def test_the_ray_recipe_runs_one_split_replica_with_the_acl_unchanged():
    head = yaml.safe_load((DEPLOY / "ray" / "compose.head.yaml").read_text())["services"]
    node = yaml.safe_load((DEPLOY / "ray" / "compose.node.yaml").read_text())["services"]
    command = head["worker"]["command"]
    flags = {arg: command[i + 1] for i, arg in enumerate(command[:-1]) if arg.startswith("--")}
    assert flags["--distributed-executor-backend"] == "ray"
    assert int(flags["--tensor-parallel-size"]) * int(flags["--pipeline-parallel-size"]) == 4
    assert flags["--broker"].endswith(":1884")  # the worker listener: same password file and acl-workers
    assert "VLLM_WORKER_BROKER__PASSWORD" in head["worker"]["environment"]
    assert "--block" in head["ray-head"]["entrypoint"]
    assert any("--address=" in arg for arg in node["ray-node"]["entrypoint"])
    model = {
        "tensor_parallel_size": int(flags["--tensor-parallel-size"]),
        "pipeline_parallel_size": int(flags["--pipeline-parallel-size"]),
        "distributed_executor_backend": flags["--distributed-executor-backend"],
    }
    WorkerConfig.model_validate({"model": model})


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


def test_the_shipped_mosquitto_config_starts():
    broker = DeployedMosquitto({"app": "app-pw"}, {"worker": "worker-pw"})
    try:
        broker.start()  # raises if Mosquitto rejected the shipped config and exited before listening
    finally:
        broker.stop()


def test_the_shipped_broker_refuses_packets_over_what_the_worker_announces():
    from worker.service import MAX_PACKET_BYTES

    conf = (ROOT / "deploy" / "mosquitto.conf").read_text()
    assert f"\nmax_packet_size {MAX_PACKET_BYTES}\n" in conf
