"""Holds ``MIB`` MiB of pages with known contents (compressible, each page unique) until told
to check them: ``holder.py MIB READY GO``. Writes READY once filled, waits for the file GO,
then reads every page back and prints ``bad pages: N``; exit status 0 only if N is 0. Run in
a cgroup with a small MemoryMax, most of its pages are out on swap meanwhile."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

PAGE = 4096


def page(i: int) -> bytes:
    stamp = f"page {i:08d} of the ublkzswap systemd test; ".encode()
    return (stamp * (PAGE // len(stamp) + 1))[:PAGE]


def main() -> int:
    mib, ready, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    n = mib * 256
    mem = np.empty(n * PAGE, dtype=np.uint8)
    for i in range(n):
        mem[i * PAGE:(i + 1) * PAGE] = np.frombuffer(page(i), dtype=np.uint8)
    with open(ready, "w") as f:
        f.write(f"{os.getpid()}\n")
    while not os.path.exists(go):
        time.sleep(0.5)
    bad = sum(1 for i in range(n) if mem[i * PAGE:(i + 1) * PAGE].tobytes() != page(i))
    print(f"bad pages: {bad} of {n}", flush=True)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
