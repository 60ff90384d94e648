"""CPython stand-in for MicroPython's `utime` (test shim only): the millisecond tick helpers."""

import time as _time


def ticks_ms():
    return int(_time.monotonic() * 1000)


def ticks_diff(new, old):
    return new - old


def sleep_ms(ms):
    _time.sleep(ms / 1000)
