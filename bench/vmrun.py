"""Run a benchmark script once inside the test VM (one boot), passing its options through."""
from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = os.path.realpath(sys.executable)


def in_vm(script: str, args: list[str], *, timeout: int, mem: int = 2048) -> int:
    """``python3 -m tools.vm run`` the bench ``script`` with ``--inside`` + ``args``; print the
    wall time of the whole boot; return its exit status."""
    cmd = [PY, "-m", "tools.vm", "run", "--mem", str(mem), "--timeout", str(timeout), "--", PY,
           os.path.join(HERE, script), "--inside", *args]
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT)
    print(f"(one VM boot, {time.monotonic() - t0:.0f}s in all)")
    return rc
