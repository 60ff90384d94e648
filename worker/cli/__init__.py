"""Command line: `vllm-worker` (the `worker.cli:main` entry point), its subcommands and terminal output."""

from worker.cli.main import main

__all__ = ["main"]
