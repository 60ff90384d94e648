"""Decoding of untrusted payloads into JSON values, bounded and total: it never raises.

Python's `json` raises `ValueError` on integers over 4,300 digits and `RecursionError` on deep
nesting, and accepts `NaN`; any of those escaping the parser used to end the intake task. Here every
outcome is a value: text that is not a JSON object stays text (classic clients send plain strings, some
starting with `{`), and a JSON object that breaks a bound is returned with the violation named, so the
caller can still read its routing fields and answer on the right topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from worker.message import SURROGATES

MAX_DEPTH = 32
"""Nesting of objects/arrays in one payload (the request itself is level 1)."""
MAX_INT_DIGITS = 40
"""Longest integer literal accepted (2**63 has 19 digits); longer ones are a violation, never parsed."""
BOM = "\ufeff"


class OversizedNumber:
    """Stands in for an integer literal too long to convert: no field accepts it, routing still works."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


@dataclass(frozen=True, slots=True)
class Decoded:
    """A payload read as text and, when it is a JSON object, as that object.

    `body` is None when the text is not a JSON object; `violation` names the first bound the object
    broke (depth, number size, non-standard constant), or is None.
    """

    text: str
    body: dict[str, Any] | None
    violation: str | None = None


def decode_text(payload: bytes) -> str | None:
    """UTF-8 text without a leading BOM, or None when the bytes are not UTF-8."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix(BOM)


def decode(payload: bytes) -> Decoded | None:
    """Read a payload; None when it is not UTF-8. Never raises."""
    text = decode_text(payload)
    if text is None:
        return None
    stripped = text.strip()
    if not stripped.startswith("{"):
        return Decoded(text, None)
    violations: list[str] = []

    def parse_int(literal: str) -> int | OversizedNumber:
        digits = len(literal.lstrip("-"))
        if digits > MAX_INT_DIGITS:
            violations.append(f"an integer has {digits} digits (limit {MAX_INT_DIGITS})")
            return OversizedNumber(digits)
        return int(literal)

    def parse_constant(name: str) -> None:
        violations.append(f"{name} is not a JSON number")

    try:
        value = json.loads(stripped, parse_int=parse_int, parse_constant=parse_constant)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; too deep for the C scanner
        return Decoded(text, None)
    if not isinstance(value, dict):
        return Decoded(text, None)
    depth, surrogate = scan(value)
    if surrogate:
        violations.insert(0, "a string holds a lone surrogate (an unpaired \\ud800-\\udfff escape): not Unicode text")
    if depth > MAX_DEPTH:
        violations.insert(0, f"JSON nested {depth} levels deep (limit {MAX_DEPTH})")
    return Decoded(text, value, violations[0] if violations else None)


def scan(value: object) -> tuple[int, bool]:
    """(nesting depth of containers, whether any key or string holds a lone surrogate), without recursion.

    `json` turns an escaped lone surrogate (a U+DC80 escape) into a `str` that cannot be encoded: it would raise
    later, wherever the text is encoded (engine, Redis, a topic), so it is refused here, at parse time.
    """
    deepest, surrogate = 0, False
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, str):
            surrogate = surrogate or SURROGATES.search(node) is not None
            continue
        if isinstance(node, dict):
            children: Any = [*node, *node.values()]
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest, surrogate
