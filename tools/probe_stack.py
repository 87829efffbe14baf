"""Native probe (diagnostic, not a test): how deep a thread's stack goes while it serves the
store's fused request path (writes, swap-outs with dedup, reads), discards, an on-demand
compaction with the keeper running, stats, and an exception's traceback and log record --
the work of the daemon's queue, keeper and control threads that runs without ublk. The
daemon locks every thread's stack whole (memory.THREAD_STACK), so this says how much of
that is margin. Prints the deepest page touched, from the top of a 512 KiB stack.

    python3 tools/probe_stack.py
"""
import ctypes as C
import json
import logging
import os
import random
import sys
import threading
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ublkzswap.libc import libc          # noqa: E402
from ublkzswap.memory import thread_stack   # noqa: E402
from ublkzswap.store import Store        # noqa: E402
from ublkzswap.uapi import PAGE_SIZE, UBLK_IO_F_SWAP   # noqa: E402

STACK = 512 << 10
PAGES = 16000


def deepest_page(addr: int, size: int) -> int:
    """Pages from the top of the stack down to the lowest one resident (stacks grow down)."""
    vec = (C.c_ubyte * (size // PAGE_SIZE))()
    if libc.mincore(C.c_void_p(addr), C.c_size_t(size), vec) != 0:
        raise OSError(C.get_errno(), "mincore")
    touched = [i for i, b in enumerate(bytes(vec)) if b & 1]
    return size // PAGE_SIZE - min(touched) if touched else 0


def work() -> None:
    s = Store(PAGES * PAGE_SIZE, keeper=True)
    rng = random.Random(1)
    bufs = [memoryview(bytearray(PAGE_SIZE)) for _ in range(8)]
    log = logging.getLogger("probe")

    def boundary(e):
        traceback.format_exc()
        log.exception("probe: %s", e)
        return -5

    serve = s.page_server(bufs, boundary)
    try:
        for k in range(4000):
            for t in range(8):
                bufs[t][:] = bytes([rng.randrange(4)]) * 1000 + os.urandom(96) + bytes(3000)
            serve([(t, 1 | (UBLK_IO_F_SWAP if k % 2 else 0), (k * 8 + t) % PAGES, 1)
                   for t in range(8)], [])
            serve([(t, 0, (k * 8 + t) % PAGES, 1) for t in range(8)], [])
        for i in range(0, PAGES, 3):
            s.discard(i * PAGE_SIZE, PAGE_SIZE)
        s.compact()
        json.dumps(s.stats())
        try:
            s.write(-PAGE_SIZE, bufs[0])
        except Exception as e:
            boundary(e)
    finally:
        s.close()


def main() -> int:
    logging.basicConfig(stream=open(os.devnull, "w"))
    out = {}

    def run():
        addr, size = thread_stack()
        try:
            work()
        finally:
            out["deepest"], out["size"] = deepest_page(addr, size), size

    threading.stack_size(STACK)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    print(f"deepest stack page touched: {out['deepest'] * PAGE_SIZE >> 10} KiB from the top of "
          f"{out['size'] >> 10} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
