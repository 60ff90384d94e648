"""CPython stand-in for MicroPython's `ustruct` (test shim only)."""

from struct import *
