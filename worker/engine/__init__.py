"""Engines: the `Engine` protocol, the real vLLM adapter and a fake for tests and micro-benchmarks."""
