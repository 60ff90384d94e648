from worker.errors import ErrorCode, OverloadedError, WorkerError
from worker.protocol import Dialect, Route, classic_error, v2_error


def leaves(cls: type) -> list[type]:
    subs = cls.__subclasses__()
    return [cls] if not subs else [leaf for s in subs for leaf in leaves(s)]


def test_every_wire_code_has_exactly_one_error_class():
    codes = [c.code for c in leaves(WorkerError)]
    assert sorted(codes) == sorted(ErrorCode)
    assert len(codes) == len(set(codes))


def test_classic_error_text():
    assert classic_error(OverloadedError()) == b"Error: Server is overloaded, please retry later"


def test_v2_error_object():
    import json

    route = Route("maze", Dialect.V2, "maze/response/c1", "s1", "c1", "r1")
    body = json.loads(v2_error(route, 1, OverloadedError(retry_after_ms=500), "m", "w"))
    assert body["done"] is True
    assert body["finishReason"] == "error"
    assert body["requestId"] == "r1"
    assert body["error"] == {
        "code": "overloaded",
        "message": "Server is overloaded, please retry later",
        "retryAfterMs": 500,
    }
