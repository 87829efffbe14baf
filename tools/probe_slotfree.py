#!/usr/bin/env python3
"""Probe (test VM, root): does the kernel's per-slot free hook reach us through a kprobe BPF
program (ublkzswap.slotfree), filtered to one device, and how many freed slots does it report
beside what the device still stores?

Starts ublkzswapd, a 1 GiB device swapped on with discards, attaches a SlotFree to it, runs a
swap workload in a memory-limited cgroup, drains the ring every 0.2 s (applying nothing) and
prints the records, the distinct slots they name, the kernel's used slots on the device and
the device's pages_stored. Then swapoff (which frees every slot): the records must cover it.

    python3 -m tools.vm run -- python3 tools/probe_slotfree.py
"""
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.kernel.daemonctl import PY, running  # noqa: E402
from ublkzswap import slotfree  # noqa: E402


def used_kib(dev="/dev/ublkb0"):
    for line in open("/proc/swaps"):
        f = line.split()
        if f[0] == dev:
            return int(f[3])
    return None


def main():
    sock = "/tmp/probe.sock"
    with running("num_devices=1", f"socket={sock}") as (pid, _):
        def rz(*args, **kw):
            return subprocess.run([PY, "-m", "ublkzswap.cli", "/dev/ublkb0", *args, "--socket", sock],
                                  **kw)
        rz("--disksize_kb=1048576", "--init", check=True)
        subprocess.run(["swapon", "--discard", "/dev/ublkb0"], check=True)
        t0 = time.monotonic()
        sf = slotfree.SlotFree(os.stat("/dev/ublkb0").st_rdev)
        print(f"attached in {time.monotonic() - t0:.2f} s", flush=True)
        seen, records = set(), [0]
        stop = threading.Event()

        def apply(batch):
            records[0] += len(batch)
            seen.update(batch)

        def drainer():
            while not stop.is_set():
                sf.drain(apply)
                time.sleep(0.2)

        th = threading.Thread(target=drainer, daemon=True)
        th.start()
        load = subprocess.Popen([PY, "tools/swapload.py", "--mib", "384", "--passes", "2",
                                 "--cgroup-limit", "128", "--quiet"])
        while load.poll() is None:
            time.sleep(5)
            st = rz("--json", capture_output=True, text=True).stdout
            j = json.loads(st) if st.strip().startswith("{") else {}
            print(f"{time.monotonic() - t0:6.0f} s  records {records[0]:8d}  distinct {len(seen):7d}"
                  f"  kernel used {used_kib()} KiB  stored {j.get('pages_stored')} pages"
                  f"  notify_free {j.get('notify_free')}", flush=True)
        print("workload exit", load.returncode, flush=True)
        before = records[0]
        subprocess.run(["swapoff", "/dev/ublkb0"], check=True)
        time.sleep(1)
        sf.drain(apply)
        print(f"swapoff: {records[0] - before} more records; total {records[0]}, "
              f"distinct {len(seen)}", flush=True)
        stop.set()
        sf.close()
        rz("--reset", check=True)


if __name__ == "__main__":
    main()
