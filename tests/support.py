"""Test helpers: a running worker (fake engine) on an embedded broker bound to a free loopback port,
a raw MQTT peer to talk to it, and the e2e worker-process record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from worker.config import BrokerConfig, WorkerConfig
from worker.engine.fake import FakeEngine
from worker.message import InboundMessage
from worker.projects import load_projects
from worker.service import Service
from worker.transport.bus import Bus


@dataclass
class Peer:
    """A raw MQTT client for tests: collects every message it receives."""

    bus: Bus
    received: list[InboundMessage] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _read(self) -> None:
        while True:
            msg = await self.bus.messages()
            self.bus.ack(msg)
            self.received.append(msg)
            self._changed.set()

    async def publish(self, topic: str, payload: bytes | str | dict[str, Any]) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        if isinstance(payload, str):
            payload = payload.encode()
        await self.bus.publish(topic, payload)

    async def wait_for(
        self, predicate: Callable[[list[InboundMessage]], bool], timeout_s: float = 10.0
    ) -> list[InboundMessage]:
        async with asyncio.timeout(timeout_s):
            while not predicate(self.received):
                self._changed.clear()
                await self._changed.wait()
        return self.received

    def on(self, topic: str) -> list[InboundMessage]:
        return [m for m in self.received if m.topic == topic]


@contextlib.asynccontextmanager
async def peer(
    port: int, topics: list[str], client_id: str = "test-peer", protocol: str = "3.1.1"
) -> AsyncIterator[Peer]:
    async with Bus(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), client_id, protocol=protocol) as bus:
        p = Peer(bus)
        p._reader = asyncio.create_task(p._read())
        if topics:
            await bus.subscribe(topics)  # returns once the broker granted them (SUBACK)
        try:
            yield p
        finally:
            p._reader.cancel()


def bodies(received: list[InboundMessage], topic: str | None = None) -> list[dict[str, Any]]:
    """The JSON-object payloads among `received` (optionally only those on `topic`)."""
    out = []
    for m in received:
        if topic is not None and m.topic != topic:
            continue
        try:
            body = json.loads(m.payload)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(body, dict):
            out.append(body)
    return out


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for a condition the code under test exposes (an engine counter, a received message)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls plain counters that have no event
            await asyncio.sleep(0.005)


@dataclass
class RunningWorker:
    service: Service
    engine: FakeEngine
    port: int
    stop: asyncio.Event
    task: asyncio.Task[int]


@contextlib.asynccontextmanager
async def running_worker(
    engine: FakeEngine | None = None,
    projects: list[str] | None = None,
    broker_url: str | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningWorker]:
    """A Service with a FakeEngine on an embedded broker on a free loopback port (or on `broker_url`)."""
    data: dict[str, Any] = {
        "broker": {"embedded_port": 0} if broker_url is None else {"url": broker_url},
        "worker": {"projects": projects or ["maze", "driving"], "id": "test-worker"},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    cfg = WorkerConfig.model_validate(data)
    engine = engine or FakeEngine()
    service = Service(cfg, load_projects(cfg.worker.topics_dir, cfg.worker.projects), engine)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    async with asyncio.timeout(15):
        await service.ready.wait()
    port = service.broker_port if broker_url is None else int(broker_url.rsplit(":", 1)[1])
    assert port is not None
    try:
        yield RunningWorker(service, engine, port, stop, task)
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    start_s: float = 0.0

    def log(self) -> str:
        return "".join(self.lines)


def wait_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout_s: float = 10.0) -> None:
    """Until something accepts on 127.0.0.1:port; fails at once if `proc` (the server) has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


class LocalServer:
    """A throw-away server process on a free loopback port with its own temp dir (Mosquitto, Redis)."""

    def __init__(self, prefix: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.proc: subprocess.Popen[bytes] | None = None

    def _launch(self, binary: str | None, args: list[str], missing: str) -> None:
        """Start it, or skip the test (fail under CI: `make test` installs it) when it is not installed."""
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail(missing)
            pytest.skip(missing)
        self.proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def stop(self, keep: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port, config and data."""
        self.stop(keep=True)
        self.start()

    def start(self) -> LocalServer:
        raise NotImplementedError


class Mosquitto(LocalServer):
    """A throw-away Mosquitto on a free loopback port (TCP_NODELAY, unlimited queues, no persistence)."""

    def __init__(self, extra: str = "") -> None:
        super().__init__("mosq-")
        self.dir.chmod(0o755)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
            "set_tcp_nodelay true\nmax_queued_messages 0\n" + extra.replace("{dir}", str(self.dir))
        )
        self.conf.chmod(0o644)

    def start(self) -> Mosquitto:
        missing = "mosquitto is not installed (apt-get install mosquitto; `make test` does it as root)"
        self._launch(MOSQUITTO, ["-c", str(self.conf)], missing)
        return self

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@contextlib.contextmanager
def worker_subprocess(
    broker_url: str, worker_id: str, projects: list[str], log_path: Path | None = None, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A fake-engine worker process on `broker_url` (its log to `log_path`); killed (with its children) on exit."""
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "--engine",
        "fake",
        "--broker",
        broker_url,
        "--worker-id",
        worker_id,
        "--projects",
        *projects,
    ]
    sink = log_path.open("wb") if log_path is not None else None
    out = sink or subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if sink is not None:
            sink.close()


class DeployedMosquitto:
    """Mosquitto running the shipped deploy/ files (both listeners, password files, ACLs) on free loopback
    ports: what an operator runs, with only addresses and paths rewritten."""

    def __init__(self, apps: dict[str, str], workers: dict[str, str]) -> None:
        self.app_port, self.worker_port = free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mosq-deploy-"))
        self.dir.chmod(0o777)  # Mosquitto started as root drops to user "mosquitto"
        conf = (ROOT / "deploy" / "mosquitto.conf").read_text()
        conf = conf.replace("listener 1883 0.0.0.0", f"listener {self.app_port} 127.0.0.1")
        conf = conf.replace("listener 1884 0.0.0.0", f"listener {self.worker_port} 127.0.0.1")
        conf = conf.replace("/mosquitto/config/", f"{self.dir}/").replace("/mosquitto/data/", f"{self.dir}/")
        conf = conf.replace("log_dest stdout", "log_dest stderr")
        self._write("mosquitto.conf", conf)
        self._write("acl-workers", (ROOT / "deploy" / "acl-workers").read_text())
        acl = (ROOT / "deploy" / "acl").read_text()
        app_block = acl[acl.index("user app\n") :].split("\n\n", 1)[0]
        for user in apps:  # one block per device account, copied from `user app` as the ACL's header says
            if f"user {user}\n" not in acl:
                acl += "\n" + app_block.replace("user app\n", f"user {user}\n", 1) + "\n"
        self._write("acl", acl)
        for name, users in (("passwd", apps), ("passwd-workers", workers)):
            for i, (user, pw) in enumerate(users.items()):
                flags = ["-c"] if i == 0 else []
                subprocess.run(["mosquitto_passwd", *flags, "-b", str(self.dir / name), user, pw], check=True)
            (self.dir / name).chmod(0o644)
        self.proc: subprocess.Popen[bytes] | None = None

    def _write(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)
        (self.dir / name).chmod(0o644)

    def start(self) -> DeployedMosquitto:
        if MOSQUITTO is None or shutil.which("mosquitto_passwd") is None:
            msg = "mosquitto is not installed (apt-get install mosquitto; `make test` does it as root)"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.app_port, self.proc)
        wait_port(self.worker_port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def app_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.app_port}"

    @property
    def worker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.worker_port}"


REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)


class RedisServer(LocalServer):
    """A throw-away redis-server on a free loopback port, append-only file on (so a restart keeps data)."""

    def __init__(self, password: str | None = None) -> None:
        super().__init__("redis-")
        self.password = password

    def start(self) -> RedisServer:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
        args += ["--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        args += ["--requirepass", self.password] if self.password else []
        missing = "redis-server is not installed (apt-get install redis-server; `make test` does it as root)"
        self._launch(REDIS_SERVER, args, missing)
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def status_ready(got, worker_id: str) -> bool:
    return any(m.topic == f"vllm-worker/{worker_id}/status" and json.loads(m.payload)["state"] == "ready" for m in got)


async def wait_ready(port: int, *ids: str) -> None:
    """Until every worker of `ids` has published status `ready`."""
    async with peer(port, ["vllm-worker/+/status"], client_id="ready-watch", protocol="5") as p:
        await p.wait_for(lambda got: all(status_ready(got, i) for i in ids), timeout_s=30)


def make_adapter(
    out: Path,
    *,
    rank: int = 4,
    hidden: int = 576,
    layers: int = 30,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    kv_out: int = 192,
) -> Path:
    """A PEFT LoRA directory with zero weights, shaped for the demo model unless told otherwise (the
    shapes are what the worker checks; zero weights leave the model's answers unchanged)."""
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    dims = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (hidden, hidden),
    }
    tensors = {}
    for layer in range(layers):
        for target in targets:
            fan_in, fan_out = dims[target]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = np.zeros((rank, fan_in), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((fan_out, rank), dtype=np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets), "peft_type": "LORA"}
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "test"}))
    return out
