"""The chaos run's fleet: Mosquitto, Redis and N workers on loopback, each worker behind a TCP proxy we own.

Everything here exists to be hurt on purpose (`chaos_faults`): the servers restart on their own port and
data dir (Mosquitto persistence on, Redis append-only), the workers run in their own process groups (a
signal reaches the whole worker, engine children included) and a supervisor restarts one that exits. A
worker's broker connection goes through `Proxy`, so dropping it is a real TCP close on both sides.
Worker logs append across restarts; each incarnation starts with a `chaos.started` marker line so the
checker knows which generation ran in which process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil
import redis.asyncio as aioredis
from chaos_proxy import Proxy

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "maze"
READY_MARK = b"vllm-worker: ready"
STARTED_EVENT = "chaos.started"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, timeout_s: float = 15.0) -> None:
    """Until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)
        else:
            writer.close()
            return


def group_signal(proc: asyncio.subprocess.Process | None, sig: signal.Signals) -> bool:
    """Signal a process's whole group (started with a new session); False when it is gone."""
    if proc is None or proc.returncode is not None:
        return False
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and its children (a real engine has an engine-core child)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return float(sum(p.memory_info().rss for p in procs)) / 2**20
    except psutil.Error:
        return 0.0


class Server:
    """A server process on a fixed loopback port that can be restarted, paused and resumed."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None:
        log = (self.dir / "server.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        await wait_port(self.port)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if not group_signal(self.proc, signal.SIGCONT) or self.proc is None:
            return
        group_signal(self.proc, sig)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            group_signal(self.proc, signal.SIGKILL)
            await self.proc.wait()

    def pause(self) -> None:
        group_signal(self.proc, signal.SIGSTOP)

    def resume(self) -> None:
        group_signal(self.proc, signal.SIGCONT)


class Mosquitto(Server):
    """Persistent sessions survive a restart (persistence on); no silent drops of queued QoS1."""

    name = "mosquitto"

    def command(self) -> list[str]:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.dir}/\nautosave_interval 5\n"
            "set_tcp_nodelay true\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return [binary, "-c", str(conf)]


class Redis(Server):
    """Append-only, so a restart (SIGTERM: it fsyncs on the way out) keeps sessions and cached replies."""

    name = "redis"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        return [
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes", "--dir", str(self.dir)),
            *("--logfile", str(self.dir / "redis.log")),
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class WorkerSpec:
    """How workers run: the fake engine with the history oracle, or the real one (`engine="vllm"`)."""

    engine: str = "fake"
    token_delay_s: float = 0.05
    lease_s: float = 3.0
    keepalive_s: int = 5
    model: str | None = None
    ready_timeout_s: float = 120.0
    """A real engine loads for minutes."""
    src: Path = ROOT
    """The source tree whose `worker` package runs (another checkout: the same run on older code)."""
    project_rate_per_s: float = 400.0
    """The project's fleet-wide budget (topics/maze.toml has 50/s, which 32 fake-engine clients exceed:
    the run would mostly measure `rate_limited` retries instead of faults)."""


class WorkerSlot:
    """One worker id: its proxy, its log file and the process now running under that id (restarted on exit)."""

    def __init__(self, worker_id: str, proxy: Proxy, log_path: Path, env: dict[str, str], spec: WorkerSpec) -> None:
        self.id = worker_id
        self.proxy = proxy
        self.log_path = log_path
        self._env = env
        self._spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.incarnation = 0
        self.restarts = 0
        self.max_rss_mib = 0.0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._spawned = asyncio.Condition()
        self._ready_offset = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "worker", "--engine", self._spec.engine, "--worker-id", self.id]
        cmd += ["--broker", f"mqtt://127.0.0.1:{self.proxy.port}", "--projects", PROJECT]
        if self._spec.model:
            cmd += ["--model", self._spec.model]
        return cmd

    async def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            marker = {"event": STARTED_EVENT, "worker": self.id, "incarnation": self.incarnation + 1, "ts": time.time()}
            log.write(json.dumps(marker).encode() + b"\n")
            self._ready_offset = log.tell()
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(), cwd=self._spec.src, env=self._env, stdout=log, stderr=log, start_new_session=True
            )
        async with self._spawned:
            self.incarnation += 1
            self._spawned.notify_all()

    async def wait_incarnation(self, number: int) -> None:
        """Until incarnation `number` (or a later one) has been started."""
        async with self._spawned:
            await self._spawned.wait_for(lambda: self.incarnation >= number)

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        """Restart the worker promptly whenever it exits (SIGKILL, SIGTERM drain, a crash)."""
        while not self._stopping:
            assert self.proc is not None
            await self.proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            await asyncio.sleep(0.5)
            await self._spawn()

    async def wait_ready(self) -> bool:
        """Until the running incarnation printed its ready line (False on timeout)."""
        deadline = time.monotonic() + self._spec.ready_timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), self.log_path.open("rb") as log:
                log.seek(self._ready_offset)
                if READY_MARK in log.read():
                    return True
            await asyncio.sleep(0.1)
        return False

    def signal(self, sig: signal.Signals) -> bool:
        return group_signal(self.proc, sig)

    def sample_rss(self) -> float:
        if self.proc is None or self.proc.returncode is not None:
            return 0.0
        rss = tree_rss_mib(self.proc.pid)
        self.max_rss_mib = max(self.max_rss_mib, rss)
        return rss

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        self.signal(signal.SIGCONT)
        if self.signal(signal.SIGTERM) and self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()


class Fleet:
    """Mosquitto + Redis + workers in `workdir`; an async context manager that stops everything it started."""

    def __init__(self, workdir: Path, workers: int, spec: WorkerSpec) -> None:
        self.workdir = workdir
        self.mosquitto = Mosquitto(workdir)
        self.redis = Redis(workdir)
        self.spec = spec
        self.slots: list[WorkerSlot] = []
        self._count = workers
        self._redis_client: aioredis.Redis | None = None

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mosquitto.port}"

    def worker_env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "VLLM_WORKER_STATE__URL": self.redis.url,
            "VLLM_WORKER_STATE__LEASE_S": str(self.spec.lease_s),
            "VLLM_WORKER_BROKER__KEEPALIVE_S": str(self.spec.keepalive_s),
            "VLLM_WORKER_LOG__JSON_FORMAT": "true",
            "VLLM_WORKER_LOG__LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(self.spec.src),
            "VLLM_WORKER_WORKER__TOPICS_DIR": str(self._topics_dir()),
        }
        if self.spec.engine == "fake":
            env["VLLM_WORKER_FAKE_SCRIPT"] = "history"
            env["VLLM_WORKER_FAKE_TOKEN_DELAY_S"] = str(self.spec.token_delay_s)
        else:  # N engines share one GPU
            env["VLLM_WORKER_MODEL__GPU_MEMORY_UTILIZATION"] = f"{0.85 / self._count:.2f}"
        return env

    def _topics_dir(self) -> Path:
        """The project's file with the rate budgets of `spec` (per client: 10/s, burst 20)."""
        budgets = {
            "requests_per_s": 10.0,
            "burst": 20,
            "project_requests_per_s": self.spec.project_rate_per_s,
            "project_burst": int(self.spec.project_rate_per_s),
        }
        lines = (self.spec.src / "topics" / f"{PROJECT}.toml").read_text().splitlines()
        for i, line in enumerate(lines):
            key = line.split("=", 1)[0].strip()
            if key in budgets:
                lines[i] = f"{key} = {budgets[key]}"
        topics = self.workdir / "topics"
        topics.mkdir(exist_ok=True)
        (topics / f"{PROJECT}.toml").write_text("\n".join(lines) + "\n")
        return topics

    async def __aenter__(self) -> Self:
        await self.mosquitto.start()
        await self.redis.start()
        self._redis_client = aioredis.Redis.from_url(self.redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        env = self.worker_env()
        for i in range(self._count):
            proxy = Proxy(self.mosquitto.port)
            await proxy.start()
            slot = WorkerSlot(f"chaos-w{i}", proxy, self.workdir / f"worker-{i}.log", env, self.spec)
            self.slots.append(slot)
            await slot.start()
        ready = await asyncio.gather(*(s.wait_ready() for s in self.slots))
        if not all(ready):
            await self.__aexit__(None, None, None)
            raise RuntimeError(
                f"workers not ready: {[s.id for s, ok in zip(self.slots, ready, strict=True) if not ok]}"
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(s.stop() for s in self.slots), return_exceptions=True)
        for slot in self.slots:
            await slot.proxy.close()
        if self._redis_client is not None:
            with contextlib.suppress(Exception):
                await self._redis_client.aclose()
        self.redis.resume()
        await self.redis.stop()
        await self.mosquitto.stop()

    async def redis_keys(self) -> int | None:
        """DBSIZE, or None while Redis does not answer."""
        assert self._redis_client is not None
        try:
            return int(await self._redis_client.dbsize())
        except Exception:  # noqa: BLE001 - down, paused, restarting: a missing sample
            return None

    async def keys_without_ttl(self, limit: int = 20) -> tuple[int, list[str]]:
        """How many keys have no TTL, and the first `limit` of them (every key must expire by itself)."""
        assert self._redis_client is not None
        count, names, batch = 0, list[str](), list[bytes]()

        async def flush() -> None:
            nonlocal count
            assert self._redis_client is not None
            pipe = self._redis_client.pipeline(transaction=False)
            for key in batch:
                pipe.ttl(key)
            for key, ttl in zip(batch, await pipe.execute(), strict=True):
                if ttl == -1:
                    count += 1
                    names.extend([key.decode("utf-8", "replace")][: limit - len(names)])
            batch.clear()

        async for key in self._redis_client.scan_iter(count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await flush()
        await flush()
        return count, names
