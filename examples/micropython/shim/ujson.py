"""CPython stand-in for MicroPython's `ujson` (test shim only)."""

from json import *
