#!/usr/bin/env python3
"""How long a takeover's state check takes: a device's store in SysV shared memory is filled,
then a second store adopts it (rebuilds the allocator and pool bookkeeping from the slot table,
recounts the content counters) -- what a standby worker does while the kernel holds the
device's I/O. No kernel block device involved; needs SysV shm and mlock (root).

Printed, not asserted: fill time, the adoption time, and, as the reference measured in the
same run, the time to read the slot table once with numpy (the floor for any check that looks
at every slot) and bare LZO's compress time for the same pages. Every page is read back through
the adopted store and compared.

Run: python3 bench/bench_adopt.py [--disksize-mib 1024] [--fill-pct 100] [--allocator log]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lzo  # noqa: E402
import numpy as np  # noqa: E402

from ublkzswap import shmstate, store as storemod  # noqa: E402

PAGE = 4096
DEV_ID = 4000          # far from the ids a running daemon uses


def corpus(n: int, seed: int) -> list[bytes]:
    """n distinct pages about 3:1 compressible: text-like runs with a page-unique prefix."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    base = b" ".join(rng.choice(words) for _ in range(2000))
    out = []
    for i in range(n):
        off = rng.randrange(len(base) - PAGE)
        p = i.to_bytes(8, "little") + base[off:off + PAGE - 8]
        out.append(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disksize-mib", type=int, default=1024)
    ap.add_argument("--fill-pct", type=float, default=100.0)
    ap.add_argument("--allocator", default="log", choices=sorted(storemod.ALLOCATORS))
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    disksize = a.disksize_mib << 20
    npages = disksize // PAGE
    nfill = int(npages * a.fill_pct / 100)
    distinct = corpus(min(nfill, 4096), a.seed)
    alloc_ids = list(storemod.ALLOCATORS)

    state = shmstate.DeviceState.create(
        DEV_ID, disksize=disksize, arena_pages=storemod.arena_pages(disksize, a.allocator),
        unit=storemod.ALLOCATORS[a.allocator].UNIT_PAGES,
        allocator=alloc_ids.index(a.allocator), compressor="lzo")
    try:
        s1 = storemod.Store(disksize, state=state, allocator=a.allocator, alloc_wait=30.0)
        t = time.perf_counter()
        for i in range(1, nfill):
            s1.write(i * PAGE, memoryview(distinct[i % len(distinct)]))
        fill = time.perf_counter() - t
        before = s1.stats()
        s1.close()                          # detaches; the shared state stays

        # the reference: bare LZO over the same pages, and one pass over the slot table
        t = time.perf_counter()
        for i in range(1, min(nfill, 20000)):
            lzo.compress(distinct[i % len(distinct)], 1, False)
        lzo_per_page = (time.perf_counter() - t) / max(1, min(nfill, 20000) - 1)

        state2 = shmstate.DeviceState.attach(DEV_ID)
        t = time.perf_counter()
        np.count_nonzero(state2.table[0::2])
        scan = time.perf_counter() - t
        t = time.perf_counter()
        try:
            s2 = storemod.Store(disksize, state=state2, adopt=True, keeper=False,
                                allocator=alloc_ids[state2.allocator])
        except OSError as e:
            print(f"bench_adopt: {a.allocator}: {e.strerror}")
            return 1
        adopt = time.perf_counter() - t
        after = s2.stats()
        bad = 0
        buf = bytearray(PAGE)
        for i in range(1, nfill):
            s2.read(i * PAGE, memoryview(buf))
            if buf != distinct[i % len(distinct)]:
                bad += 1
        s2.close()
        for k in ("orig_data_size", "compr_data_size", "mem_used_total", "pages_stored"):
            if k in before and before[k] != after.get(k):
                print(f"counter {k}: {before[k]} before, {after.get(k)} after adoption")
        print(f"device {a.disksize_mib} MiB, {nfill} pages stored ({a.allocator} allocator), "
              f"fill {fill:.1f} s ({nfill / fill:.0f} pages/s)")
        print(f"adoption (allocator + pool rebuilt, counters recounted): {adopt * 1000:.0f} ms")
        print(f"reference: one numpy pass over the slot table {scan * 1000:.1f} ms "
              f"(adoption = {adopt / scan:.0f}x); bare LZO compress {lzo_per_page * 1e6:.1f} us/page "
              f"(adoption = {adopt / lzo_per_page:.0f} page compressions)")
        print(f"pages read back after adoption and differing: {bad}")
        return 1 if bad else 0
    finally:
        shmstate.remove(DEV_ID)


if __name__ == "__main__":
    sys.exit(main())
