"""The worker's control topic: load, replace or unload a project's LoRA adapter without a restart.

`{prefix}vllm-worker/{workerId}/control` carries `{"action": "load" | "unload", "project": "maze",
"adapter": "maze-compass-v2", "requestId": "..."}`; the answer goes to `.../control/reply` as
`{"requestId", "ok": true, "project", "adapter"}` or `{"requestId", "ok": false, "error": {"code",
"message"}}`. In deploy/ only the admin account may publish there (deploy/acl).

Adapters load only from directories under `model.adapters_dir`, by name: a message never names a
filesystem path. A new adapter is checked against the model and loaded before it replaces the old one,
so a bad one leaves the old one serving; requests in flight finish on the adapter they started with.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from worker import adapters
from worker.adapters import AdapterTable
from worker.engine.base import Engine
from worker.errors import BadRequestError, ConfigError, EngineError, WorkerError
from worker.protocol import is_valid_id
from worker.protocol.payload import decode

log = structlog.get_logger(__name__)
Publish = Callable[[bytes], Awaitable[None]]
MAX_CONTROL_BYTES = 4096


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
    ) -> None:
        self._engine = engine
        self._table = table
        self._projects = projects
        self._dir = adapters_dir
        self._model_config = model_config
        self._max_rank = max_lora_rank
        self._publish = publish
        self._changed = changed
        self._lock = asyncio.Lock()

    async def handle(self, payload: bytes) -> None:
        """Apply one control message and publish its reply (never raises for a bad message)."""
        decoded = decode(payload) if len(payload) <= MAX_CONTROL_BYTES else None
        body = decoded.body if decoded is not None and decoded.body is not None and not decoded.violation else {}
        request_id = body.get("requestId") if is_valid_id(body.get("requestId")) else None
        try:
            async with self._lock:
                project, name = await self._apply(body)
        except (WorkerError, ConfigError) as err:
            code = err.code if isinstance(err, WorkerError) else BadRequestError.code
            message = err.message if isinstance(err, WorkerError) else str(err)
            log.warning("control.refused", reason=message)
            error = {"code": str(code), "message": message}
            await self._publish(_json({"requestId": request_id, "ok": False, "error": error}))
            return
        log.info("control.adapter_changed", project=project, adapter=name)
        await self._changed()
        await self._publish(_json({"requestId": request_id, "ok": True, "project": project, "adapter": name}))

    async def _apply(self, body: Mapping[str, Any]) -> tuple[str, str | None]:
        action, project = body.get("action"), body.get("project")
        if action not in ("load", "unload"):
            raise BadRequestError('action must be "load" or "unload"')
        if not isinstance(project, str) or project not in self._projects:
            raise BadRequestError(f"project must be one this worker serves: {', '.join(self._projects)}")
        if action == "unload":
            await self._retire(self._table.replace(project, None))
            return project, None
        name = body.get("adapter")
        if not is_valid_id(name) or name in (".", ".."):
            raise BadRequestError(f"adapter must be the name of a directory under {self._dir}")
        path = (self._dir / str(name)).resolve()
        if not path.is_relative_to(self._dir.resolve()) or not path.is_dir():
            raise BadRequestError(f"no adapter {name!r} under {self._dir}")
        rank = adapters.check(path, self._model_config, max_lora_rank=self._max_rank)
        adapter = self._table.new(str(name), path, rank)
        await self._engine.load_adapter(adapter)  # EngineError: the old adapter keeps serving
        await self._retire(self._table.replace(project, adapter))
        return project, adapter.name

    async def _retire(self, old: adapters.Adapter | None) -> None:
        if old is None:
            return  # none, or still in use: the last request's release unloads it
        try:
            await self._engine.unload_adapter(old)
        except EngineError:
            log.warning("control.unload_failed", adapter=old.name)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in body.items() if v is not None or k == "adapter"}).encode()
