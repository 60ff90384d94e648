"""The worker's control topic: load, replace or unload a project's LoRA adapter without a restart.

`{prefix}vllm-worker/{workerId}/control` carries `{"action": "load" | "unload", "project": "maze",
"adapter": "maze-compass-v2", "requestId": "..."}`; the answer goes to `.../control/reply` as
`{"requestId", "ok": true, "project", "adapter"}` or `{"requestId", "ok": false, "error": {"code",
"message"}}`. Every message gets exactly one reply (`requestId` left out when the message had no valid
one), whatever it or the adapter's files hold. In deploy/ only the admin account may publish there
(deploy/acl).

Adapters load only from directories under `model.adapters_dir`, by name: a message never names a
filesystem path. A new adapter is checked against the model and loaded before it replaces the old one,
so a bad one leaves the old one serving; requests in flight finish on the adapter they started with.
The check reads files that may sit on a hung mount: it runs off the loop with a deadline (`Reads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

from worker.engine import adapters
from worker.engine.adapters import AdapterTable
from worker.engine.base import Engine
from worker.errors import BadRequestError, ConfigError, EngineError, ErrorCode, WorkerError
from worker.protocol import is_valid_id
from worker.protocol.payload import decode

log = structlog.get_logger(__name__)
Publish = Callable[[bytes], Awaitable[None]]
MAX_CONTROL_BYTES = 4096
READ_TIMEOUT_S = 10.0
"""How long an adapter's files may take to read before the load is refused (a hung NFS mount)."""
T = TypeVar("T")
LORA_OFF = (
    "LoRA is not enabled on this worker: set model.enable_lora = true (or name an adapter in a project's "
    "topics file) and restart it"
)


class Control:
    """Handles control messages one at a time (a second swap waits for the first)."""

    def __init__(
        self,
        engine: Engine,
        table: AdapterTable,
        projects: list[str],
        *,
        adapters_dir: Path,
        model_config: Mapping[str, Any],
        max_lora_rank: int,
        publish: Publish,
        changed: Callable[[], Awaitable[None]],
        lora_enabled: bool = True,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        """`lora_enabled`: whether the engine was started with LoRA (a load is refused up front if not)."""
        self._engine = engine
        self._table = table
        self._projects = projects
        self._dir = adapters_dir
        self._model_config = model_config
        self._max_rank = max_lora_rank
        self._publish = publish
        self._changed = changed
        self._lora_enabled = lora_enabled
        self._reads = Reads(read_timeout_s)
        self._lock = asyncio.Lock()
        self._crashes: Counter[tuple[str, str, int]] = Counter()

    async def handle(self, payload: bytes) -> None:
        """Apply one control message and publish its one reply; only cancellation propagates."""
        decoded = decode(payload) if len(payload) <= MAX_CONTROL_BYTES else None
        body = decoded.body if decoded is not None and decoded.body is not None and not decoded.violation else {}
        request_id = body.get("requestId") if is_valid_id(body.get("requestId")) else None
        try:
            async with self._lock:
                project, name = await self._apply(body)
        except (WorkerError, ConfigError) as err:
            code = err.code if isinstance(err, WorkerError) else BadRequestError.code
            message = err.message if isinstance(err, WorkerError) else str(err)
            log.info("control.refused", request_id=request_id, code=str(code), reason=message)
            await self._send({"requestId": request_id, "ok": False, "error": {"code": str(code), "message": message}})
            return
        except Exception as exc:  # noqa: BLE001 - our bug: answered, and logged once per place
            self._log_crash(exc)
            message = f"internal error applying the control message ({type(exc).__name__}), logged as control.crashed"
            error = {"code": str(ErrorCode.ENGINE_ERROR), "message": message}
            await self._send({"requestId": request_id, "ok": False, "error": error})
            return
        log.info("control.adapter_changed", project=project, adapter=name)
        try:
            await self._changed()
        except Exception as exc:  # noqa: BLE001 - a status publish; the swap itself is done
            log.warning("control.status_failed", error=type(exc).__name__)
        await self._send({"requestId": request_id, "ok": True, "project": project, "adapter": name})

    async def _apply(self, body: Mapping[str, Any]) -> tuple[str, str | None]:
        """Validate everything first; the table and the engine change only for a load that passed."""
        action, project = body.get("action"), body.get("project")
        if action not in ("load", "unload"):
            raise BadRequestError('action must be "load" or "unload"')
        if not isinstance(project, str) or project not in self._projects:
            raise BadRequestError(f"project must be one this worker serves: {', '.join(self._projects)}")
        if action == "unload":
            await self._retire(self._table.replace(project, None))
            return project, None
        if not self._lora_enabled:
            raise BadRequestError(LORA_OFF)
        name = body.get("adapter")
        if not is_valid_id(name) or name in (".", ".."):
            raise BadRequestError(f"adapter must be the name of a directory under {self._dir}")
        path, rank = await self._reads.run(lambda: self._check(str(name)), f"adapter {name!r}")
        adapter = self._table.new(str(name), path, rank)
        await self._engine.load_adapter(adapter)  # EngineError: the old adapter keeps serving
        await self._retire(self._table.replace(project, adapter))
        return project, adapter.name

    def _check(self, name: str) -> tuple[Path, int]:
        """Blocking (runs on a `Reads` thread): the adapter's directory and its rank, once it fits the model."""
        try:
            root = self._dir.resolve()
            path = (root / name).resolve()
            inside, found = path.is_relative_to(root), path.is_dir()
        except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13), EACCES, EIO
            raise BadRequestError(f"adapter {name!r} under {self._dir} cannot be read ({exc})") from None
        if not inside:
            raise BadRequestError(f"adapter {name!r} points outside {self._dir}")
        if not found:
            raise BadRequestError(f"no adapter {name!r} under {self._dir}")
        return path, adapters.check(path, self._model_config, max_lora_rank=self._max_rank, root=root)

    async def _retire(self, old: adapters.Adapter | None) -> None:
        if old is None:
            return  # none, or still in use: the last request's release unloads it
        try:
            await self._engine.unload_adapter(old)
        except EngineError:
            log.warning("control.unload_failed", adapter=old.name)
        except Exception:  # the swap is done: a failed unload costs a loaded adapter, not the reply
            log.exception("control.unload_failed", adapter=old.name)

    async def _send(self, body: dict[str, Any]) -> None:
        """Publish a reply; a bus that cannot take it costs a log line, never an exception out of `handle`."""
        try:
            await self._publish(_json(body))
        except Exception as exc:  # noqa: BLE001 - the reply is lost either way; say so once
            log.warning("control.reply_failed", request_id=body.get("requestId"), error=type(exc).__name__)

    def _log_crash(self, exc: Exception) -> None:
        """The traceback the first time a bug strikes at one place; one line with a count after that."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        place = (type(exc).__name__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
        self._crashes[place] += 1
        if self._crashes[place] == 1:
            log.error("control.crashed", exc_info=exc)
        else:
            log.error("control.crashed", error=place[0], at=f"{place[1]}:{place[2]}", times=self._crashes[place])


class Reads:
    """Runs a blocking adapter check on a daemon thread with a deadline.

    A read stuck in the kernel (a hung NFS mount) cannot be cancelled: on timeout the caller gets a
    refusal and the thread is left behind; while it is still stuck, new checks are refused at once
    instead of piling up threads. Not `asyncio.to_thread`: a stuck thread of the default executor
    would also hold up the worker's exit, which joins that executor.
    """

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._stuck: threading.Event | None = None

    @property
    def busy(self) -> bool:
        """An earlier check timed out and its thread has not returned yet."""
        return self._stuck is not None and not self._stuck.is_set()

    async def run(self, check: Callable[[], T], what: str) -> T:
        """`check()`'s result, or a ConfigError when it takes over the deadline; its own errors pass through."""
        if self.busy:
            raise ConfigError(
                f"{what}: a read of adapter files is still stuck after {self._timeout_s:g} s (a hung mount?)"
            )
        loop = asyncio.get_running_loop()
        result: asyncio.Future[T] = loop.create_future()
        returned = threading.Event()

        def work() -> None:
            try:
                value = check()
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting task
                returned.set()
                _post(loop, functools.partial(_fail, result, exc))
                return
            returned.set()
            _post(loop, functools.partial(_succeed, result, value))

        threading.Thread(target=work, name="adapter-check", daemon=True).start()
        try:
            async with asyncio.timeout(self._timeout_s):
                return await result
        except TimeoutError:
            raise ConfigError(
                f"{what}: reading its files took over {self._timeout_s:g} s (a hung mount?); the old one keeps serving"
            ) from None
        finally:
            if not returned.is_set():  # timed out, or the caller was cancelled: the thread is still in there
                self._stuck = returned


def _post(loop: asyncio.AbstractEventLoop, settle: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
        loop.call_soon_threadsafe(settle)


def _succeed(future: asyncio.Future[T], value: T) -> None:
    if not future.done():  # not timed out or cancelled meanwhile
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in body.items() if v is not None or k == "adapter"}).encode()
