"""Short of memory: a small machine swaps through the device, and running out of memory is the
kernel's call (an OOM kill of the workload), never a panic or a dead daemon.

The test VM has 512 MiB. A 384 MiB machine is made of it by locking the difference in a
helper process (unevictable, never an OOM victim), so the daemon's own memory counts against
what is left exactly as it would on the small machine. The workload mixes zero, same-filled,
text and incompressible pages (the footprint issue's mix) and verifies every page it reads.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import pytest

from tools.swapload import mem_total_mib

from .daemonctl import PY, running
from .test_swap import SWAPLOAD, clean, daemon_swap_kb, rzs, stats  # noqa: F401 (clean: autouse)
from .workload import kernel_log_oom_lines, workload_verdict

MIX = "zero=25,same=10,text=50,random=15"
SMALL_MIB = 384
BALLOON = """
import mmap, os, sys, time
n = int(sys.argv[1]) << 20
open("/proc/self/oom_score_adj", "w").write("-1000")
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
buf = (ctypes.c_char * n).from_buffer(m)
assert libc.mlock(ctypes.addressof(buf), ctypes.c_size_t(n)) == 0, ctypes.get_errno()
print("locked", flush=True)
time.sleep(1e9)
"""


def oom_kills() -> int:
    for line in open("/proc/vmstat"):
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0


def killed_pids() -> set[int]:
    """Pids the OOM killer has killed, by the kernel log (pids are not reused within a test)."""
    log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=60).stdout
    return {int(p) for p in re.findall(r"Killed process (\d+)", log)}


@contextlib.contextmanager
def machine_of(mib: int):
    """Lock away RAM so that what is left is about what a ``mib`` MiB machine has."""
    extra = mem_total_mib() - (mib * 462 // 512)      # this kernel leaves 462 of 512 MiB
    if extra <= 0:
        yield
        return
    p = subprocess.Popen([sys.executable, "-c", BALLOON, str(extra)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked", "the balloon could not lock its memory"
        yield
    finally:
        p.kill()
        p.wait()


def swap_on_1gib(sock):
    rzs(sock, "/dev/ublkb0", "--disksize_kb=1048576", "--init")
    subprocess.run(["swapon", "--discard", "/dev/ublkb0"], check=True, timeout=300)


@pytest.mark.xfail(strict=False, reason=(
    "issue 9, open: bench_small verifies this workload, but in 3.9-4.4x zram's time (148-168 s "
    "against 38 s on a fast host, 417-459 against 121-130 on a slow one; part of it: over half "
    "the 1 GiB device's slots in use, every swap-in frees its slot and the page is written "
    "again); this test bounds it at 480 s (docs/NOTES.md, stops 26 and 28)"))
@pytest.mark.deadline(1500)
def test_small_machine(tmp_path):
    """384 MiB of RAM, a 512 MiB workload through a 1 GiB device: every page verified,
    nothing OOM-killed (zram does this in a guest of the same size)."""
    sock = tmp_path / "ctl.sock"
    with running("num_devices=1", f"socket={sock}") as (pid, _):
        swap_on_1gib(sock)
        kills = oom_kills()
        with machine_of(SMALL_MIB):
            # zram does it in 35-130 s here: a run of several times that is no success, and
            # the suite must not wait 20 minutes for it
            p = subprocess.run([PY, SWAPLOAD, "--mib", "512", "--passes", "1", "--mix", MIX,
                                "--quiet"], capture_output=True, text=True, timeout=480)
        why = workload_verdict(p.returncode, p.stdout, killed_by_test=False)
        assert why is None, f"{why}\n{p.stdout[-2000:]}{p.stderr[-2000:]}\n{kernel_log_oom_lines()}"
        assert oom_kills() == kills, kernel_log_oom_lines()
        st = stats(sock)
        assert st["failed_reads"] == 0 and st["num_writes"] > 0
        assert daemon_swap_kb(pid) == 0
        subprocess.run(["swapoff", "/dev/ublkb0"], check=True, timeout=900)
        rzs(sock, "/dev/ublkb0", "--reset")


@pytest.mark.deadline(1500)
@pytest.mark.parametrize("mib", [560, 700])
def test_out_of_memory(tmp_path, mib):
    """More than fits: either the workload completes with every page verified, or the kernel
    OOM-kills the workload and nothing else. The daemon stays up, answers --stats, and the
    device's memory falls back as the killed process's swap is discarded."""
    sock = tmp_path / "ctl.sock"
    with running("num_devices=1", f"socket={sock}") as (pid, _):
        swap_on_1gib(sock)
        before, kills = killed_pids(), oom_kills()
        load = subprocess.Popen([PY, SWAPLOAD, "--mib", str(mib), "--passes", "1", "--mix", MIX,
                                 "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        out, _ = load.communicate(timeout=1200)
        victims, kills = killed_pids() - before, oom_kills() - kills
        assert os.path.exists(f"/proc/{pid}"), "the daemon died"
        # one kill at most, and the workload's (the log may have wrapped: then the count and
        # the workload's SIGKILL say it)
        oom_killed = load.returncode == -9 and kills == 1
        assert kills <= 1 and victims <= {load.pid}, (
            f"the OOM killer took more than the workload: {kills} kills, pids {sorted(victims)} "
            f"(workload {load.pid})\n{kernel_log_oom_lines()}")
        st = stats(sock)                                    # answers, after whatever happened
        assert st["failed_reads"] == 0
        if oom_killed:
            assert "MISMATCH" not in out
            # its swap is freed now; discards of whole clusters hand the memory back
            peak = st["mem_used_max"]
            deadline = time.monotonic() + 120
            while stats(sock)["mem_used_total"] > peak // 2 and time.monotonic() < deadline:
                time.sleep(2)
            assert stats(sock)["mem_used_total"] <= peak // 2, stats(sock)
        else:
            why = workload_verdict(load.returncode, out, killed_by_test=False)
            assert why is None, f"{why}\n{out[-3000:]}"
        assert daemon_swap_kb(pid) == 0
        subprocess.run(["swapoff", "/dev/ublkb0"], check=True, timeout=900)
        rzs(sock, "/dev/ublkb0", "--reset")
