"""How a swap workload (tools/swapload.py) run by a kernel test ended, judged in one place.

:func:`workload_verdict` is a pure function of the exit status and the output, so
tests/unit/test_swapload.py checks it natively.
"""
from __future__ import annotations

import signal
import subprocess


def workload_verdict(returncode: int, out: str, killed_by_test: bool) -> str | None:
    """Why a swapload run ended wrongly, or None if it ended one of the two accepted ways: it
    finished (exit 0 and "swapload: OK"), or the caller's own SIGKILL at its time limit ended it
    (``killed_by_test``). Either way nothing it read back was wrong (no MISMATCH line: swapload
    prints each one as it finds it). Any other end -- a SIGKILL the test did not send (the OOM
    killer), another signal, a non-zero exit -- is a failure."""
    if "MISMATCH" in out:
        return "the workload read back a wrong page"
    if returncode == 0:
        return None if "swapload: OK" in out else "the workload exited 0 without 'swapload: OK'"
    if returncode == -signal.SIGKILL and killed_by_test:
        return None
    if returncode < 0:
        try:
            how = f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"signal {-returncode}"
    else:
        how = f"exit status {returncode}"
    if returncode == -signal.SIGKILL:
        how += " that the test did not send (the OOM killer?)"
    return f"the workload ended by {how}"


def kernel_log_oom_lines(n: int = 10) -> str:
    """The kernel log's last ``n`` OOM-killer lines, for a failure message."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=60).stdout
    return "\n".join([ln for ln in log.splitlines() if "oom" in ln.lower() or "Killed process" in ln][-n:])
