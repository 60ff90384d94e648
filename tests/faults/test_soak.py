"""The soak script, short: 2 minutes at saturation with the fake engine; RSS growth must stay under 5%.
(The 30-minute soak is `benchmarks/soak.py --minutes 30`, not run in CI.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT

pytestmark = pytest.mark.faults


@pytest.mark.timeout(400)
def test_two_minute_soak_keeps_memory_flat():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--minutes", "2", "--interval", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "RSS growth after warm-up" in out.stdout
