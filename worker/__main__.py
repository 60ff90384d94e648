"""`python -m worker` = `vllm-worker` (the guard matters: vLLM spawns its engine-core process)."""

import sys

from worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
