"""Checks a client's `jsonSchema` before it reaches vLLM's structured-output backend.

A schema is untrusted input twice over: jsonschema's meta-schema check can raise more than
`SchemaError` on odd values (`{"$schema": 5}` raised AttributeError), and the grammar compiler behind
vLLM would otherwise see whatever passes. So: bounded size (the payload decoder already bounds depth),
`$schema` must be a string, `$ref` may only point inside the schema (no fetches), then the meta-schema
check, with any exception it throws turned into a refusal.
"""

from __future__ import annotations

import json

import jsonschema

MAX_SCHEMA_BYTES = 16 * 1024


def check_schema(schema: object, field: str = "jsonSchema") -> tuple[str | None, str | None]:  # noqa: PLR0911
    """(canonical JSON of the schema, None) when usable, else (None, why not, naming `field`). Never raises."""
    if not isinstance(schema, dict):
        return None, f"{field} must be a JSON Schema object"
    try:
        canonical = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # an OversizedNumber, NaN or a cycle cannot be encoded
        return None, f"{field} holds values that are not plain JSON"
    if len(canonical) > MAX_SCHEMA_BYTES:
        return None, f"{field} is {len(canonical)} bytes, limit {MAX_SCHEMA_BYTES}"
    if not isinstance(schema.get("$schema", ""), str):
        return None, "$schema must be a string"
    bad_ref = _external_ref(schema)
    if bad_ref is not None:
        return None, f"$ref may only point inside the schema (#...), got {bad_ref[:80]!r}"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return None, f"{field} is not a valid JSON Schema: {exc.message[:200]}"
    except Exception as exc:  # noqa: BLE001 - a third-party check on hostile input: any failure is a refusal
        return None, f"{field} could not be checked ({type(exc).__name__})"
    return canonical, None


def _external_ref(schema: dict[str, object]) -> str | None:
    """The first `$ref` that does not start with `#`, searched without recursion."""
    stack: list[object] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):  # a non-string is a property named $ref
                return ref
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None
