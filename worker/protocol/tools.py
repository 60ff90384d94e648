"""Tools on the wire (v2, OpenAI-shaped): `tools`, `toolChoice`, `toolResults`, tool calls in chat messages.

A request may offer the model functions to call (`tools`), say whether it must (`toolChoice`), and answer
the calls of its session's previous turn (`toolResults`). Everything here is untrusted input: names are
ids, schemas pass `check_schema`, counts and sizes are bounded, and a call's arguments are checked
against its tool's schema (`check_arguments`) before anyone acts on them. Nothing here raises except
`BadRequestError` / `TooLargeError`, which the parser turns into a typed refusal.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema

from worker.errors import BadRequestError, TooLargeError
from worker.protocol.schemas import check_schema
from worker.protocol.topics import is_valid_id

MAX_TOOLS = 32
MAX_TOOL_CALLS = 16
"""Calls one answer may make, and results one request may carry."""
MAX_DESCRIPTION_CHARS = 2048
MAX_ARGUMENTS_BYTES = 16 * 1024
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
Choice = Literal["auto", "none", "required"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call; `parameters` is its canonical JSON Schema (None: no arguments)."""

    name: str
    description: str = ""
    parameters: str | None = None

    def openai(self) -> dict[str, Any]:
        """The OpenAI shape chat templates and vLLM's parsers take."""
        params = json.loads(self.parameters) if self.parameters else {"type": "object", "properties": {}}
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": params},
        }


@dataclass(frozen=True, slots=True)
class ToolSet:
    """The tools a request offers and how the model must use them (`named`: the one it must call)."""

    specs: tuple[ToolSpec, ...]
    choice: Choice = "auto"
    named: str | None = None

    @property
    def active(self) -> bool:
        """Whether the model may call a tool at all."""
        return bool(self.specs) and self.choice != "none"

    def spec(self, name: str) -> ToolSpec | None:
        """The tool of this name, if offered."""
        return next((s for s in self.specs if s.name == name), None)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: `arguments` is JSON text of an object; `error` says why it cannot be run."""

    id: str
    name: str
    arguments: str
    error: str | None = None

    def wire(self) -> dict[str, Any]:
        """`{id, name, arguments}` with arguments parsed (null when they are not a JSON object), and `error`."""
        body: dict[str, Any] = {"id": self.id, "name": self.name, "arguments": _object_or_none(self.arguments)}
        if self.error is not None:
            body["error"] = self.error
        return body


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The answer to one call, fed to the model as a `tool` turn (data, never instructions to us)."""

    tool_call_id: str
    content: str


def call_id(request_id: str, round_no: int, index: int) -> str:
    """A call's id, derived from (requestId, round, index): a redelivered request names the same calls."""
    digest = hashlib.sha256(f"{request_id}\x00{round_no}\x00{index}".encode()).hexdigest()[:24]
    return f"call-{digest}"


def check_arguments(spec: ToolSpec | None, name: str, arguments: str) -> str | None:
    """Why a call cannot be run (unknown tool, arguments not a JSON object or not matching the schema), or None."""
    if spec is None:
        return f"unknown tool {name[:64]!r}"
    if len(arguments.encode()) > MAX_ARGUMENTS_BYTES:
        return f"arguments are over {MAX_ARGUMENTS_BYTES} bytes"
    value = _object_or_none(arguments)
    if value is None:
        return "arguments are not a JSON object"
    if spec.parameters is None:
        return None
    try:
        schema = json.loads(spec.parameters)
        error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
    except Exception as exc:  # noqa: BLE001 - a third-party check on model output: any failure refuses the call
        return f"arguments could not be checked ({type(exc).__name__})"
    return None if error is None else f"arguments do not match the schema: {error.message[:200]}"


def _object_or_none(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_tools(raw: object, choice: object) -> ToolSet | None:
    """`tools` + `toolChoice` of a request; None when it says neither. Raises BadRequestError/TooLargeError.

    A `toolChoice` alone is kept (no specs): the project's device tools may be what it names (`rounds`).
    """
    if raw is None:
        if choice is None:
            return None
        if choice in ("auto", "none", "required"):
            return ToolSet((), choice)
        return ToolSet((), "required", _named_choice(choice))
    if not isinstance(raw, list) or not raw:
        raise BadRequestError('tools must be a non-empty list of {"type": "function", "function": {...}}')
    if len(raw) > MAX_TOOLS:
        raise TooLargeError(f"tools has {len(raw)} entries, limit {MAX_TOOLS}")
    specs = tuple(_spec(item) for item in raw)
    if len({s.name for s in specs}) != len(specs):
        raise BadRequestError("tool names must be unique")
    if choice is None or choice in ("auto", "none", "required"):
        return ToolSet(specs, choice or "auto")
    return ToolSet(specs, "required", _named_choice(choice))  # the name is checked against every tool offered


def _spec(item: object) -> ToolSpec:
    function = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else None
    if not isinstance(function, dict):
        raise BadRequestError('each tool must be {"type": "function", "function": {name, description, parameters}}')
    return tool_spec(function.get("name"), function.get("description", ""), function.get("parameters"))


def tool_spec(name: object, description: object, parameters: object) -> ToolSpec:
    """A tool's name, description and JSON Schema, checked (requests, announcements, project files alike)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequestError("a tool name must be 1-64 chars of [A-Za-z0-9_-]")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise BadRequestError(f"a tool description must be a string of at most {MAX_DESCRIPTION_CHARS} chars")
    if parameters is None:
        return ToolSpec(name, description)
    canonical, problem = check_schema(parameters, f"parameters of tool {name}")
    if problem is not None:
        raise BadRequestError(problem)
    return ToolSpec(name, description, canonical)


def _named_choice(choice: object) -> str:
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequestError(
            'toolChoice must be "auto", "none", "required" or {"type": "function", "function": {"name"}}'
        )
    return name


def parse_results(raw: object, max_chars: int) -> tuple[ToolResult, ...]:
    """`toolResults`: [{toolCallId, content}] answering the calls of the session's last turn."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("toolResults must be a non-empty list of {toolCallId, content}")
    if len(raw) > MAX_TOOL_CALLS:
        raise TooLargeError(f"toolResults has {len(raw)} entries, limit {MAX_TOOL_CALLS}")
    results = tuple(_result(item) for item in raw)
    if sum(len(r.content) for r in results) > max_chars:
        raise TooLargeError(f"toolResults hold more than {max_chars} characters")
    if len({r.tool_call_id for r in results}) != len(results):
        raise BadRequestError("toolResults answer each toolCallId once")
    return results


def _result(item: object) -> ToolResult:
    if not isinstance(item, dict):
        raise BadRequestError("each tool result must be an object {toolCallId, content}")
    call, content = item.get("toolCallId"), item.get("content")
    if not is_valid_id(call):
        raise BadRequestError("toolCallId must be the id of a call (1-128 chars of [A-Za-z0-9_.:-])")
    if not isinstance(content, str):
        raise BadRequestError("a tool result's content must be a string (JSON text for structured data)")
    return ToolResult(str(call), content)


def parse_message_calls(raw: object) -> tuple[ToolCall, ...]:
    """An assistant message's `toolCalls` in a stateless `messages` list: [{id, name, arguments}]."""
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TOOL_CALLS:
        raise BadRequestError(f"toolCalls must be a list of 1-{MAX_TOOL_CALLS} {{id, name, arguments}}")
    calls = []
    for item in raw:
        if not isinstance(item, dict):
            raise BadRequestError("each tool call must be an object {id, name, arguments}")
        ident, name, arguments = item.get("id"), item.get("name"), item.get("arguments")
        if not is_valid_id(ident) or not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequestError("a tool call needs an id (1-128 chars of [A-Za-z0-9_.:-]) and a tool name")
        if not isinstance(arguments, dict):
            raise BadRequestError("a tool call's arguments must be a JSON object")
        calls.append(ToolCall(str(ident), name, json.dumps(arguments, ensure_ascii=False)))
    return tuple(calls)
