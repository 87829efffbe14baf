#!/usr/bin/env python3
"""Benchmark the store against bare python-lzo on a realistic page corpus.

No kernel involved. The corpus is 4 KiB chunks of this machine's own files
(shared libraries, executables, Python sources and text under /usr), plus
zero-filled and same-filled pages in a stated proportion. Printed, not
asserted:

- store write pages/s next to bare ``lzo.compress(page, 1, False)`` pages/s on
  the same pages, and the ratio (goal >= 0.8), through the store's general entry
  points (``write``/``read``: one call per page, as the general request handler) and
  through its fused path (``page_server``: the queue's wake-up of ``--batch`` single-page
  requests, the pages already in tag buffers, as the kernel leaves them), and that fused path
  again with the writes as swap-outs (they look for a stored twin first: deduplication);
- store read pages/s next to bare ``lzo.decompress`` pages/s, and the ratio;
- compr_data_size / orig_data_size and mem_used_total / compr_data_size after
  the fill (goal <= 1.05; zram reaches about 1.017), and again after
  discarding a random half of the pages (xvmalloc never compacts, so this one
  rises; reported as measured);
- the time to discard a full 2 MiB swap cluster (512 pages), as the kernel discards swap.

Run: python3 bench/bench_store.py [--pages N] [--zero PCT] [--same PCT] [--seed S]
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lzo  # noqa: E402

from ublkzswap.store import Store  # noqa: E402
from ublkzswap.uapi import UBLK_IO_F_SWAP  # noqa: E402

PAGE = 4096
CLUSTER = 512          # pages in a swap cluster: what the kernel discards at once
ROOTS = [
    ("libraries", ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu"], (".so",)),
    ("executables", ["/usr/bin", "/usr/sbin"], None),
    ("python sources", ["/usr/lib/python3", "/root/.pyenv/versions"], (".py",)),
    ("text", ["/usr/share/doc", "/usr/share/man", "/usr/share/common-licenses", "/usr/include"], None),
]


def collect(n_pages: int, zero_pct: float, same_pct: float, seed: int):
    rng = random.Random(seed)
    n_zero = int(n_pages * zero_pct / 100)
    n_same = int(n_pages * same_pct / 100)
    n_file = n_pages - n_zero - n_same
    per_class = n_file // len(ROOTS)
    pages: list[bytes] = []
    origin = {}
    for label, roots, exts in ROOTS:
        files = []
        for root in roots:
            for dirpath, _dirs, names in os.walk(root):
                for name in names:
                    if exts and not any(name.endswith(e) or (e + ".") in name for e in exts):
                        continue
                    path = os.path.join(dirpath, name)
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    files.append(path)
                if len(files) > 20000:
                    break
        rng.shuffle(files)
        got = []
        for path in files:
            try:
                with open(path, "rb") as f:
                    data = f.read(64 * PAGE)
            except OSError:
                continue
            chunks = [data[i:i + PAGE] for i in range(0, len(data) - PAGE + 1, PAGE)]
            got.extend(chunks[:16])
            if len(got) >= per_class:
                break
        got = got[:per_class]
        origin[label] = len(got)
        pages.extend(got)
    while len(pages) < n_file and pages:
        pages.append(pages[rng.randrange(len(pages))])
    origin["zero-filled"] = n_zero
    origin["same-filled"] = n_same
    pages.extend([bytes(PAGE)] * n_zero)
    pages.extend(rng.getrandbits(64).to_bytes(8, "little") * 512 for _ in range(n_same))
    rng.shuffle(pages)
    return pages, origin


def fused(pages: list[bytes], args, swap: bool = False) -> tuple[float, float]:
    """Write then read every page through :meth:`Store.page_server`, ``args.batch`` requests
    per call as one queue wake-up; pages/s of the best of ``args.repeat`` passes each. Every
    page has a tag buffer of its own (the pages are already where the kernel would have put
    them: no copy is timed); reads decompress into the same buffers, checked afterwards.
    ``swap``: the writes are swap-outs (UBLK_IO_F_SWAP), which look for a stored twin
    (deduplication) first."""
    n = len(pages)
    bufs = [memoryview(bytearray(p)) for p in pages]
    opf = 1 | (UBLK_IO_F_SWAP if swap else 0)                       # UBLK_IO_OP_WRITE
    writes = [[(i, opf, i, 1) for i in range(k, min(k + args.batch, n))]
              for k in range(0, n, args.batch)]
    reads = [[(i, 0, i, 1) for i, _, _, _ in b] for b in writes]          # UBLK_IO_OP_READ
    best_w = best_r = float("inf")
    for rep in range(args.repeat):
        store = Store(n * PAGE, compressor=args.compressor, allocator=args.allocator)
        serve = store.page_server(bufs, lambda e: -errno.EIO)
        done: list = []
        waited = 0.0
        t = time.perf_counter()
        for b in writes:
            serve(b, done)
            while True:
                # a swap-out fails at once when no memory is ready (the keeper is behind):
                # the kernel writes it again later; so does this, the wait not timed
                bad = [(tag, r) for tag, r in done if r != PAGE]
                done.clear()
                if not bad:
                    break
                if any(r != -errno.ENOSPC for _, r in bad):
                    raise SystemExit(f"fused write failed: {bad[:3]} (of {len(bad)})")
                w0 = time.perf_counter()
                time.sleep(0.001)
                waited += time.perf_counter() - w0
                serve([(tag, opf, tag, 1) for tag, _ in bad], done)
        best_w = min(best_w, time.perf_counter() - t - waited)
        t = time.perf_counter()
        for b in reads:
            serve(b, done)
        best_r = min(best_r, time.perf_counter() - t)
        if any(r[1] != PAGE for r in done) or any(bufs[i] != pages[i] for i in range(n)):
            raise SystemExit("fused read: a page did not round-trip")
        store.close()
    return rate(n, best_w), rate(n, best_r)


def write_all(store, views) -> int:
    """Write page ``i`` of ``views`` to slot ``i``, retrying a write that found no memory
    ready (ENOSPC: the keeper thread is behind) until it is stored; returns the retries."""
    retries = 0
    for i, v in enumerate(views):
        while True:
            try:
                store.write(i * PAGE, v)
                break
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                retries += 1
                time.sleep(0.001)
    return retries


def rate(n, seconds):
    return n / seconds if seconds > 0 else float("inf")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--zero", type=float, default=10.0, help="percent of zero-filled pages")
    ap.add_argument("--same", type=float, default=2.0, help="percent of same-filled non-zero pages")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compressor", default="lzo")
    ap.add_argument("--allocator", default="log", help="log (default) or xvmalloc")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; the best is reported")
    ap.add_argument("--batch", type=int, default=32,
                    help="requests per wake-up on the fused path (the queue depth at most)")
    args = ap.parse_args(argv)

    pages, origin = collect(args.pages, args.zero, args.same, args.seed)
    n = len(pages)
    print(f"corpus: {n} pages of 4 KiB = {n * PAGE / 2**20:.1f} MiB: "
          + ", ".join(f"{k} {v}" for k, v in origin.items()))
    buf = bytearray(b"".join(pages))
    mv = memoryview(buf)
    views = [mv[i * PAGE:(i + 1) * PAGE] for i in range(n)]

    # bare python-lzo on the same pages
    comp, decomp = lzo.compress, lzo.decompress
    gc.disable()
    best_c = best_d = float("inf")
    streams = [comp(p, 1, False) for p in pages]
    for _ in range(args.repeat):
        t = time.perf_counter()
        for p in pages:
            comp(p, 1, False)
        best_c = min(best_c, time.perf_counter() - t)
        t = time.perf_counter()
        for s in streams:
            decomp(s, False, PAGE)
        best_d = min(best_d, time.perf_counter() - t)
    del streams

    # the store, keeper thread running as in the daemon
    best_w = best_r = float("inf")
    enospc = 0
    out = bytearray(PAGE)
    outv = memoryview(out)
    for rep in range(args.repeat):
        store = Store(n * PAGE, compressor=args.compressor, allocator=args.allocator)
        t = time.perf_counter()
        enospc += write_all(store, views)
        best_w = min(best_w, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            store.read(i * PAGE, outv)
        best_r = min(best_r, time.perf_counter() - t)
        if rep < args.repeat - 1:
            store.close()
    gc.enable()
    for i in range(n):
        store.read(i * PAGE, outv)
        if out != pages[i]:
            raise SystemExit(f"page {i} did not round-trip")

    fw, fr = fused(pages, args)
    fsw, _ = fused(pages, args, swap=True)

    wc, rc = rate(n, best_c), rate(n, best_d)
    ws, rs = rate(n, best_w), rate(n, best_r)
    print(f"{'':24}{'pages/s':>12}{'MiB/s':>10}")
    print(f"{'bare lzo compress':24}{wc:12,.0f}{wc * PAGE / 2**20:10.1f}")
    print(f"{'store write':24}{ws:12,.0f}{ws * PAGE / 2**20:10.1f}   ratio {ws / wc:.2f} (goal >= 0.8)")
    print(f"{'store write, fused':24}{fw:12,.0f}{fw * PAGE / 2**20:10.1f}   ratio {fw / wc:.2f} "
          f"({args.batch} per wake-up)")
    print(f"{'swap-out, fused':24}{fsw:12,.0f}{fsw * PAGE / 2**20:10.1f}   ratio {fsw / wc:.2f} "
          f"(the same, with deduplication)")
    print(f"{'bare lzo decompress':24}{rc:12,.0f}{rc * PAGE / 2**20:10.1f}")
    print(f"{'store read':24}{rs:12,.0f}{rs * PAGE / 2**20:10.1f}   ratio {rs / rc:.2f} (goal >= 0.8)")
    print(f"{'store read, fused':24}{fr:12,.0f}{fr * PAGE / 2**20:10.1f}   ratio {fr / rc:.2f} "
          f"({args.batch} per wake-up)")
    if enospc:
        print(f"(store writes waited for the keeper {enospc} times: ENOSPC retried)")

    def report(when):
        s = store.stats()
        orig, compr, used = s["orig_data_size"], s["compr_data_size"], s["mem_used_total"]
        print(f"{when}: pages_stored {s['pages_stored']}, zero {s['zero_pages']}, same {s['same_pages']}, "
              f"huge {s['huge_pages']}, good {s['good_compress']}")
        print(f"  compr_data_size/orig_data_size = {compr / orig:.3f}   "
              f"(all {n} pages: mem_used_total/({n}*4096) = {used / (n * PAGE):.3f})")
        print(f"  mem_used_total/compr_data_size = {used / compr:.3f}   (goal <= 1.05 after fill; zram ~1.017)")
        print(f"  mem_used_total {used / 2**20:.1f} MiB, mem_used_max {s['mem_used_max'] / 2**20:.1f} MiB, "
              f"arena resident {store.pool.resident * PAGE / 2**20:.1f} MiB")

    report("after fill")
    rng = random.Random(args.seed + 1)
    for i in rng.sample(range(n), n // 2):
        store.discard(i * PAGE, PAGE)
    time.sleep(0.1)  # let the keeper give surplus pages back
    report("after discarding a random half")
    freed = store.compact()
    time.sleep(0.1)
    report(f"after compaction ({freed} pages given back)")
    store.close()

    # discards as the kernel sends them for swap: a whole 2 MiB cluster (512 pages) at a time
    best = float("inf")
    for rep in range(args.repeat):
        store = Store(n * PAGE, compressor=args.compressor, allocator=args.allocator)
        write_all(store, views)
        t = time.perf_counter()
        for first in range(0, n, CLUSTER):
            store.discard(first * PAGE, min(CLUSTER, n - first) * PAGE)
        best = min(best, time.perf_counter() - t)
        if store.stats()["pages_stored"]:
            raise SystemExit("a discard left pages stored")
        store.close()
    clusters = -(-n // CLUSTER)
    print(f"discard of a full 2 MiB cluster: {best / clusters * 1e3:.2f} ms "
          f"({best / n * 1e6:.2f} us a page)")


if __name__ == "__main__":
    main()
