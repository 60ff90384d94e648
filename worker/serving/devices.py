"""Device tools: capabilities a project's devices serve over MQTT, called by this worker for the model.

A project declares tools in `topics/<project>.toml` (`[[tools]]`), and devices announce their own with a
retained `{project}/capabilities/{deviceId}` message (called on `{project}/tools/{deviceId}/{name}`). A
call is published to the tool's topic with this worker's reply address, `{project}/worker/{workerId}/
tool_result` (v5 Response Topic and Correlation Data too), and awaited within the tool's timeout.

Everything a device sends is untrusted: announcements and results are bounded in size, count and depth
(the payload decoder), a result is data fed to the model (never run, never used as a topic), an unknown
or late result is counted and dropped, and a project's devices can add tools to that project only.
Memory is bounded whatever arrives: `MAX_DEVICES` announcers per project, `MAX_PENDING` calls.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from worker.errors import BadRequestError, ConfigError
from worker.message import InboundMessage
from worker.projects import Project
from worker.protocol import Topics, is_valid_id
from worker.protocol.payload import decode
from worker.protocol.tools import ToolCall, ToolSpec, tool_spec

log = structlog.get_logger(__name__)

MAX_DEVICES = 256
"""Devices whose announcements a project keeps; more are refused (counted)."""
MAX_DEVICE_TOOLS = 16
MAX_ANNOUNCEMENT_BYTES = 16 * 1024
MAX_RESULT_CHARS = 16 * 1024
MAX_PENDING = 1024
"""Calls this worker awaits at once; a call beyond it is answered "busy" to the model at once."""
MAX_TIMEOUT_MS = 300_000

Publish = Callable[[str, bytes, bytes, str], Awaitable[None]]
"""(topic, payload, correlation data, response topic): publish one call (QoS 1)."""


@dataclass(frozen=True, slots=True)
class DeviceTool:
    """A tool the worker runs: its spec for the model, where to call it, how long to wait."""

    spec: ToolSpec
    topic: str
    timeout_s: float
    device: str | None = None
    """The announcing device (None: declared in the project file)."""


@dataclass(frozen=True, slots=True)
class Result:
    """What a call came back with: `content` for the model, `error` (timeout, device error), and its time."""

    content: str
    error: str | None
    ms: int


class DeviceTools:
    """See the module docstring."""

    def __init__(
        self,
        projects: dict[str, Project],
        topics: Topics,
        worker_id: str,
        publish: Publish,
        counters: Counter[tuple[str, str]],
    ) -> None:
        self._topics = topics
        self._worker_id = worker_id
        self._publish = publish
        self._counters = counters
        served = {name: p for name, p in projects.items() if p.device_tools}
        self._declared = {name: _declared(p, topics) for name, p in served.items()}
        self._announced: dict[str, dict[str, tuple[DeviceTool, ...]]] = {
            name: {} for name, p in served.items() if p.capabilities
        }
        self._pending: dict[str, asyncio.Future[Result]] = {}
        self._results = {topics.tool_results(name, worker_id): name for name in served}
        self._capabilities = {f"{topics.prefix}{name}/capabilities/": name for name in self._announced}

    def filters(self) -> list[str]:
        """The filters to subscribe: this worker's result topics and the projects' capability announcements."""
        return [*self._results, *(self._topics.capabilities(name) for name in self._announced)]

    def tools(self, project: str) -> tuple[DeviceTool, ...]:
        """The project's device tools: declared ones first; an announced tool never shadows them."""
        declared = self._declared.get(project, ())
        names = {t.spec.name for t in declared}
        announced = [
            t for tools in self._announced.get(project, {}).values() for t in tools if t.spec.name not in names
        ]
        return declared + tuple({t.spec.name: t for t in announced}.values())

    def pending(self) -> int:
        """Calls awaiting a device now."""
        return len(self._pending)

    # ---- inbound: results and announcements (never raise) --------------------------------------------
    def take(self, msg: InboundMessage) -> bool:
        """Consume a tool result or a capability announcement; False: the message is not one of those."""
        if msg.topic in self._results:
            self._result(self._results[msg.topic], msg)
            return True
        for prefix, project in self._capabilities.items():
            if msg.topic.startswith(prefix):
                self._announcement(project, msg.topic[len(prefix) :], msg.payload)
                return True
        return False

    def _result(self, project: str, msg: InboundMessage) -> None:
        decoded = decode(msg.payload)
        body = decoded.body if decoded is not None and decoded.violation is None else None
        call = body.get("callId") if body is not None else None
        if call is None and msg.correlation_data is not None:
            call = msg.correlation_data.decode("utf-8", "replace")
        future = self._pending.get(call) if isinstance(call, str) else None
        if body is None or future is None or future.done():
            self._counters[(project, "tool_results_dropped")] += 1  # unknown, late, duplicate or malformed
            return
        error = body.get("error")
        content = body.get("content", "")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        if error is not None:
            text, error = f"error: {str(error)[:512]}", "device_error"
        future.set_result(Result(text[:MAX_RESULT_CHARS], error if isinstance(error, str) else None, 0))

    def _announcement(self, project: str, device: str, payload: bytes) -> None:
        announced = self._announced[project]
        if not is_valid_id(device):
            self._counters[(project, "capabilities_refused")] += 1
            return
        if not payload:  # an empty retained message removes the device's tools
            announced.pop(device, None)
            return
        tools, problem = self._parse_announcement(project, device, payload)
        if problem is not None or (device not in announced and len(announced) >= MAX_DEVICES):
            self._counters[(project, "capabilities_refused")] += 1
            log.warning("tools.announcement_refused", project=project, device=device, reason=problem or "too many")
            return
        announced[device] = tools
        log.info("tools.announced", project=project, device=device, tools=[t.spec.name for t in tools])

    def _parse_announcement(
        self, project: str, device: str, payload: bytes
    ) -> tuple[tuple[DeviceTool, ...], str | None]:
        if len(payload) > MAX_ANNOUNCEMENT_BYTES:
            return (), f"over {MAX_ANNOUNCEMENT_BYTES} bytes"
        decoded = decode(payload)
        body = decoded.body if decoded is not None and decoded.violation is None else None
        raw = body.get("tools") if body is not None else None
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_DEVICE_TOOLS:
            return (), f'expected {{"tools": [1-{MAX_DEVICE_TOOLS} tools]}}'
        tools: list[DeviceTool] = []
        for item in raw:
            tool, problem = self._announced_tool(project, device, item)
            if tool is None:
                return (), problem
            tools.append(tool)
        return tuple(tools), None

    def _announced_tool(self, project: str, device: str, item: object) -> tuple[DeviceTool | None, str | None]:
        if not isinstance(item, dict):
            return None, "a tool must be an object {name, description, parameters, timeoutMs}"
        timeout_ms = item.get("timeoutMs", 5000)
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            return None, f"timeoutMs must be an integer in 1-{MAX_TIMEOUT_MS}"
        try:
            spec = tool_spec(item.get("name"), item.get("description", ""), item.get("parameters"))
        except BadRequestError as err:
            return None, err.message
        return DeviceTool(spec, self._topics.device_tool(project, device, spec.name), timeout_ms / 1000, device), None

    # ---- outbound: one call --------------------------------------------------------------------------
    async def call(self, project: str, call: ToolCall, tool: DeviceTool, request_id: str) -> Result:
        """Publish the call and await its result within the tool's timeout; failures are results too."""
        started = time.monotonic()
        if call.id in self._pending or len(self._pending) >= MAX_PENDING:
            self._counters[(project, "tool_calls_busy")] += 1
            return Result("error: the worker has too many tool calls pending", "busy", 0)
        reply_to = self._topics.tool_results(project, self._worker_id)
        body = {"v": 2, "callId": call.id, "name": call.name, "arguments": json.loads(call.arguments)}
        body |= {"requestId": request_id, "replyTopic": reply_to, "worker": self._worker_id}
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[call.id] = future
        try:
            await self._publish(tool.topic, json.dumps(body).encode(), call.id.encode(), reply_to)
            async with asyncio.timeout(tool.timeout_s):
                result = await future
        except TimeoutError:
            self._counters[(project, "tool_timeouts")] += 1
            result = Result(f"error: the device did not answer within {tool.timeout_s:g} s", "timeout", 0)
        except Exception as exc:  # noqa: BLE001 - a publish refused: the model hears it, the request goes on
            self._counters[(project, "tool_errors")] += 1
            result = Result(f"error: the call could not be sent ({type(exc).__name__})", "unsent", 0)
        finally:
            self._pending.pop(call.id, None)
        if result.error == "device_error":
            self._counters[(project, "tool_errors")] += 1
        return Result(result.content, result.error, round((time.monotonic() - started) * 1000))


def _declared(project: Project, topics: Topics) -> tuple[DeviceTool, ...]:
    """A project file's `[[tools]]`, checked like a request's tools (ConfigError at start)."""
    out = []
    for tool in project.tools:
        try:
            spec = tool_spec(tool.name, tool.description, tool.parameters)
        except BadRequestError as err:
            raise ConfigError(f"project {project.name}, tool {tool.name}: {err.message}") from None
        out.append(DeviceTool(spec, topics.prefix + tool.topic, tool.timeout_s))
    return tuple(out)
