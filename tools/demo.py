#!/usr/bin/env python3
"""The demo: ublkzswapd serving a real swap device under memory pressure, then the numbers.

Starts ublkzswapd, initialises /dev/ublkb0 with rzscontrol, swapon (no mkswap), pushes
about twice the machine's RAM (or, on a big host, twice a cgroup's limit) of mixed data
through swap while checking every page, prints ``rzscontrol --stats`` and a summary, and
tears everything down. Run through ``tools/demo`` (which installs what it needs and picks
native or VM).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.swapload import mem_total_mib, remove_cgroups  # noqa: E402

PY = os.path.realpath(sys.executable)
SOCK = "/run/ublkzswap-demo.sock"
DEV = "/dev/ublkb0"


def sh(*cmd, check=True, **kw):
    return subprocess.run(list(cmd), check=check, text=True, **kw)


def rzs(*args, capture=True):
    return sh(PY, "-m", "ublkzswap.cli", *args, "--socket", SOCK, capture_output=capture)


def step(msg):
    print(f"\n== {msg}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: must run as root")
        return 1
    total = mem_total_mib()
    limit = None if total <= 1024 else 384
    budget = limit or total
    mib = 2 * budget
    disk_kb = 3 * mib * 1024
    step(f"ublkzswapd num_devices=1   (RAM {total} MiB"
         + (f"; workload confined to a {limit} MiB cgroup)" if limit else ")"))
    p = sh(PY, "-m", "ublkzswap.daemon", "num_devices=1", f"socket={SOCK}", capture_output=True, check=False)
    print(p.stdout.strip() or p.stderr.strip())
    if p.returncode:
        return 1
    pid = int(p.stdout.split("pid ")[1].split(")")[0])
    ok = False
    try:
        step(f"rzscontrol {DEV} --disksize_kb={disk_kb} --init")
        rzs(DEV, f"--disksize_kb={disk_kb}", "--init")
        step(f"swapon --discard {DEV}   (no mkswap: --init wrote the swap header)")
        sh("swapon", "--discard", DEV)
        print(open("/proc/swaps").read().strip())
        step(f"a workload of {mib} MiB (zero, same-filled, text, random pages), every page verified")
        t0 = time.monotonic()
        args = [PY, os.path.join(ROOT, "tools", "swapload.py"), "--mib", str(mib), "--passes", "1",
                "--mix", "zero=50,same=15,text=32,random=3"]
        if limit:
            args += ["--cgroup-limit", str(limit)]
        load = sh(*args, check=False)
        secs = time.monotonic() - t0
        step(f"rzscontrol {DEV} --stats   (after the workload exited: discards freed most of it)")
        print(rzs(DEV, "--stats").stdout, end="")
        st = json.loads(rzs(DEV, "--json").stdout)
        ios = st["num_reads"] + st["num_writes"]
        step("summary")
        orig, compr, used = st["orig_data_size"], st["compr_data_size"], st["mem_used_max"]
        print(f"  pages through the device: {st['num_writes']} written, {st['num_reads']} read "
              f"in {secs:.0f}s ({ios / secs:.0f} pages/s)")
        if compr:
            print(f"  compression ratio (orig/compr) of what is still stored: {orig / compr:.2f}  "
                  f"same-filled pages: {st['same_pages']}  stored raw: {st['huge_pages']}")
        print(f"  peak memory used {used >> 20} MiB for the data swapped out; "
              f"notify_free (discards) {st['notify_free']}")
        print(f"  workload verification: {'every page intact' if load.returncode == 0 else 'FAILED'}")
        ok = load.returncode == 0
        step(f"swapoff {DEV}; rzscontrol {DEV} --reset; stop ublkzswapd")
        sh("swapoff", DEV)
        rzs(DEV, "--reset")
    finally:
        if DEV in open("/proc/swaps").read():
            sh("swapoff", DEV, check=False)
        os.kill(pid, 15)
        for _ in range(300):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.1)
        remove_cgroups()
    left = [d for d in os.listdir("/dev") if d.startswith("ublkb") or d.startswith("ublkc")]
    print(f"  left behind: {left or 'nothing'}")
    return 0 if ok and not left else 1


if __name__ == "__main__":
    sys.exit(main())
