"""CPython stand-in for MicroPython's `ubinascii` (test shim only)."""

from binascii import *
