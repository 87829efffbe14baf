#!/usr/bin/env python3
"""python-lzo against liblzo2 called through ctypes, per 4 KiB page (issue 11, point 2).

python-lzo allocates LZO1X-1's work area (128 KiB) and a new bytes object on every call. The
alternative is to call liblzo2 itself through ctypes, with a work area and an output page
allocated once per queue. This prints the microseconds per page of each, best of
``--repeat`` passes over the same corpus as bench_store.py (zero pages left out: the store
never compresses them), and the ratio ctypes / python-lzo (below 1: ctypes is faster):

- compress: ``lzo.compress(page, 1, False)`` (what the store calls) against
  ``lzo1x_1_compress`` through ctypes, three ways: with ``argtypes`` declared; without
  them, every pointer a prebuilt ``c_void_p`` (the cheapest call ctypes offers: the tag
  buffers are fixed, so their pointers could be built once); and that again plus copying
  the result out (python-lzo's bytes is what the store copies into the arena; the ctypes
  output page would have to be copied as well);
- decompress: ``lzo.decompress(src, False, 4096)`` against ``lzo1x_decompress_safe``.

No kernel involved. Run: python3 bench/bench_lzo_call.py [--pages N] [--repeat R]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lzo  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_store import collect  # noqa: E402

PAGE = 4096
WORK = 1 << 17          # LZO1X_1_MEM_COMPRESS on 64-bit: 16384 dictionary entries of 8 bytes
V = ctypes.c_void_p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all variants, interleaved")
    args = ap.parse_args(argv)

    pages = [p for p in collect(args.pages, 10.0, 2.0, 1)[0] if p.count(0) != PAGE]
    n = len(pages)
    corpus = np.frombuffer(b"".join(pages), dtype=np.uint8).copy()
    base = corpus.ctypes.data
    views = [corpus[i * PAGE:(i + 1) * PAGE] for i in range(n)]

    lib = ctypes.CDLL("liblzo2.so.2")
    declared, bare = lib.lzo1x_1_compress, ctypes.CDLL("liblzo2.so.2").lzo1x_1_compress
    declared.argtypes = [V, ctypes.c_size_t, V, V, V]
    dec = lib.lzo1x_decompress_safe
    dec.argtypes = [V, ctypes.c_size_t, V, V, V]
    work = np.zeros(WORK, np.uint8)
    out = np.zeros(PAGE + PAGE // 16 + 64 + 3, np.uint8)   # LZO's worst case for a page
    wa, oa = work.ctypes.data, out.ctypes.data
    WA, OA = V(wa), V(oa)
    olen = ctypes.c_size_t(0)
    olp = ctypes.byref(olen)
    srcs = [V(base + i * PAGE) for i in range(n)]

    comp, decomp = lzo.compress, lzo.decompress
    streams = [comp(v, 1, False) for v in views]
    for i in (0, n // 2, n - 1):                  # the same stream either way
        declared(base + i * PAGE, PAGE, oa, olp, wa)
        if bytes(out[:olen.value]) != streams[i]:
            raise SystemExit(f"page {i}: liblzo2 through ctypes gave another stream")
    held = [np.frombuffer(s, np.uint8) for s in streams]
    saddr = [(h.ctypes.data, len(h)) for h in held]
    page = np.zeros(PAGE, np.uint8)
    pa = page.ctypes.data
    dlen = ctypes.c_size_t(PAGE)
    dlp = ctypes.byref(dlen)

    def c_python():
        for v in views:
            comp(v, 1, False)

    def c_declared():
        for i in range(n):
            declared(base + i * PAGE, PAGE, oa, olp, wa)

    def c_bare():
        for s in srcs:
            bare(s, PAGE, OA, olp, WA)

    def c_bare_copy():
        for s in srcs:
            bare(s, PAGE, OA, olp, WA)
            out[:olen.value].tobytes()

    def d_python():
        for s in streams:
            decomp(s, False, PAGE)

    def d_ctypes():
        for a, k in saddr:
            dlen.value = PAGE
            dec(a, k, pa, dlp, None)

    variants = [("compress, python-lzo", c_python), ("compress, ctypes + argtypes", c_declared),
                ("compress, ctypes, prebuilt", c_bare), ("  the same + copy out", c_bare_copy),
                ("decompress, python-lzo", d_python), ("decompress, ctypes", d_ctypes)]
    best = {name: float("inf") for name, _ in variants}
    gc.disable()
    for _ in range(args.rounds):
        for name, fn in variants:
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
    gc.enable()
    us = {k: v / n * 1e6 for k, v in best.items()}
    print(f"{n} pages of 4 KiB (zero pages left out), best of {args.rounds * args.repeat} passes")
    print(f"{'':30}{'us/page':>9}{'/ python-lzo':>14}")
    for name, _ in variants:
        ref = us["decompress, python-lzo" if name.startswith("decompress") else "compress, python-lzo"]
        print(f"{name:30}{us[name]:9.2f}{us[name] / ref:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
