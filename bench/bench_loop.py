#!/usr/bin/env python3
"""The queue loop's own cost per wake-up, natively (no ublk): NOP SQEs stand in for
COMMIT_AND_FETCH, so what is timed is reaping CQEs, reading descriptors and writing the
next SQEs -- the bookkeeping around each request, not the request.

Two ways of doing that bookkeeping, on the same ring in the same run:
- ``numpy``: reap() into a structured array, vectorised tag/result arrays, fancy-index the
  descriptor array, claim() + fancy-index copy of template SQE rows (the first loop);
- ``ints``: reap_pairs() and put_rows() with memoryview word views (the loop now);
and ``queue``: the serving loop itself (``Queue._loop``, with its request handler and
counters) on the same ring, serving 4 KiB reads on a NullTarget.

Then the loop on a real store (the compressed target: LZO, the log allocator), 4 KiB swap writes of fio-like
3:1 pages and reads of them back, two ways in the same run: ``general`` (the request
handler and the store's read/write_swap per request) and ``fused`` (the store's page_server:
a wake-up's single-page requests under one lock); beside them bare ``lzo.compress`` /
``lzo.decompress`` of the same pages, and the loop's total over bare LZO.
A swap device mostly wakes up for one CQE (each swap-in fault waits for its page), so the
1-CQE figure is the one that matters; fio at QD32 gives larger batches. ``--pages N``: every
request is N pages (swap's swap-outs and readahead are often several), timed per page.

``--queues N``: instead, several queues at once on one store (issue 11): N threads, each
serving its own NOP ring with its own Queue loop and the fused path, fio-like 3:1 swap
writes (then reads of them) to pages of its own; requests per second of all threads together
for 1 queue and for N in the same run, and their ratio. Beside it, the bare compressor on
the same pages in 1 and N threads: the most threads could gain on this machine now (another
load on the CPUs shows there first). Only compression runs in parallel (the GIL serialises the
rest), so the slower the compressor, the more several queues can gain (``--compressor``).

Run: python3 bench/bench_loop.py [--iters N] [--pages N] [--queues N [--seconds S] [--compressor NAME]]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from ublkzswap import uapi  # noqa: E402
from ublkzswap.handler import request_handler  # noqa: E402
from ublkzswap.queue import Queue  # noqa: E402
from ublkzswap.target import NullTarget  # noqa: E402
from ublkzswap.uring import Ring  # noqa: E402

DEPTH = 64


def setup():
    ring = Ring(2 * DEPTH, flags=uapi.IORING_SETUP_SQE128, cq_entries=8 * DEPTH)
    rows = np.zeros((DEPTH, ring.sqe_size), dtype=np.uint8)
    t = rows.view(ring.sqes.dtype).reshape(DEPTH)
    t["opcode"] = uapi.IORING_OP_NOP
    t["user_data"] = np.arange(DEPTH)
    iod = np.zeros(DEPTH, dtype=uapi.IO_DESC_DTYPE)
    iod["nr_sectors"] = 8
    return ring, rows, iod


def numpy_way(ring, rows, iod, batch, iters):
    results = np.zeros(DEPTH, dtype=np.int32)
    ctags = np.zeros(DEPTH, dtype=np.uint16)
    idx = ring.claim(batch, zero=False)
    ring.sqe_rows[idx] = rows[np.arange(batch)]
    for _ in range(iters):
        ring.submit_and_wait(batch)
        cqes = ring.reap()
        ud, res = cqes["user_data"], cqes["res"]
        tags = (ud & 0xFFFF).astype(np.uint16)
        ok = res == 0
        if not ok.all():
            tags = tags[ok]
        nc = 0
        for tag, (opf, nr, start, _a) in zip(tags.tolist(), iod[tags].tolist()):
            ctags[nc] = tag
            results[nc] = (nr << 9) + (opf & 0) + (start & 0)
            nc += 1
        idx = ring.claim(nc, zero=False)
        ring.sqe_rows[idx] = rows[ctags[:nc]]
        ring.sqes["io_result"][idx] = results[:nc]
    ring.submit_and_wait(batch)
    ring.reap()


def ints_way(ring, rows, iod, batch, iters):
    desc = memoryview(iod).cast("B")
    d32, d64 = desc.cast("I"), desc.cast("Q")
    rmv = memoryview(rows).cast("B")
    at = ring.sqes.dtype.fields["io_result"][1]
    ring.put_rows(rmv, [(k, 0) for k in range(batch)], at)
    for _ in range(iters):
        ring.submit_and_wait(batch)
        done = []
        for ud, res in ring.reap_pairs():
            tag = ud & 0xFFFF
            if res != 0:
                continue
            opf, nr, start = d32[tag * 6], d32[tag * 6 + 1], d64[tag * 3 + 1]
            done.append((tag, (nr << 9) + (opf & 0) + (start & 0)))
        ring.put_rows(rmv, done, at)
    ring.submit_and_wait(batch)
    ring.reap_pairs()


class _Stop(BaseException):
    """Ends the serving loop after the requests timed (passes the loop's boundary)."""


class _Counting(NullTarget):
    def __init__(self, size: int, n: int):
        super().__init__(size)
        self.left = n

    def read(self, offset, buf):
        self.left -= 1
        if self.left < 0:
            raise _Stop


_queue: list[Queue] = []   # one, made on first use: its buffers are set up outside the timing


def queue_way(ring, rows, iod, batch, iters):
    if not _queue:
        _queue.append(Queue(0, None, depth=DEPTH, buf_bytes=4096))
    q = _queue[0]
    target = _Counting(1 << 20, batch * iters)
    handle = request_handler(target, q.buf_bytes, q.counters)
    ring.put_rows(memoryview(rows).cast("B"), [(k, 0) for k in range(batch)],
                  ring.sqes.dtype.fields["io_result"][1])
    try:
        q._loop(ring, iod, handle, rows)
    except _Stop:
        pass


class _Budget:
    """Raises _Stop once ``n`` requests were served (inside the fast path's batch, or per
    request on the general path)."""

    def __init__(self, n: int):
        self.left = n

    def take(self, k: int = 1) -> None:
        self.left -= k
        if self.left < 0:
            raise _Stop


class _General:
    """The store without its page_server: every request through the handler."""

    def __init__(self, store, budget):
        self.size = store.size

        def counted(fn):
            def call(offset, buf):
                budget.take()
                return fn(offset, buf)
            return call
        self.read, self.write = counted(store.read), counted(store.write)
        self.write_swap = counted(store.write_swap)


class _Fused(_General):
    def __init__(self, store, budget):
        super().__init__(store, budget)
        self._store, self._budget = store, budget

    def page_server(self, bufs, boundary):
        serve = self._store.page_server(bufs, boundary)

        def counted(reqs, done):
            self._budget.take(len(reqs))
            serve(reqs, done)
        return counted


def store_pages(q: Queue, per: int = 1) -> list[bytes]:
    """fio-like 3:1 pages (2730 zero bytes at a different place in each, the rest random),
    ``per`` to a tag."""
    rng = np.random.default_rng(1)
    out = []
    for k in range(DEPTH * per):
        b = bytearray(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        b[k % 64 * 20:k % 64 * 20 + 2730] = bytes(2730)
        o = k % per * 4096
        q.bufs[k // per][o:o + 4096] = b
        out.append(bytes(b))
    return out


def store_way(way, op, ring, rows, iod, batch, iters, store, q, per=1):
    budget = _Budget(batch * iters)
    target = (_Fused if way == "fused" else _General)(store, budget)
    q.target = target
    iod["op_flags"] = op | (uapi.UBLK_IO_F_SWAP if op == uapi.UBLK_IO_OP_WRITE else 0)
    iod["start_sector"] = np.arange(DEPTH) * 8 * per + 8
    iod["nr_sectors"] = 8 * per
    handle = request_handler(target, q.buf_bytes, q.counters)
    fast = target.page_server(q.bufs, handle) if way == "fused" else None
    ring.put_rows(memoryview(rows).cast("B"), [(k, 0) for k in range(batch)],
                  ring.sqes.dtype.fields["io_result"][1])
    try:
        q._loop(ring, iod, handle, rows, fast)
    except _Stop:
        pass
    ring.submit_and_wait(0)
    while ring.cq_ready():                   # the NOPs of the last wake-up
        ring.reap_pairs()


def bare_lzo(pages, n):
    import lzo
    zs = [lzo.compress(p, 1, False) for p in pages]
    t0 = time.perf_counter()
    for k in range(n):
        lzo.compress(pages[k % DEPTH], 1, False)
    tc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(n):
        lzo.decompress(zs[k % DEPTH], False, 4096)
    return tc / n * 1e6, (time.perf_counter() - t0) / n * 1e6


def main_store(args, ring, rows, iod):
    from ublkzswap.store import Store
    per = args.pages
    store = Store((DEPTH * per + 2) * 4096)
    q = Queue(0, None, depth=DEPTH, buf_bytes=4096 * per)
    pages = store_pages(q, per)
    print(f"\ncompressed store, us per 4 KiB page, {per} a request ({'CQEs per wake-up'}: "
          f"1 / 8 / 32)")
    print(f"{'':>10}{'batch':>6}{'general':>10}{'fused':>10}{'ratio':>8}{'bare lzo':>10}"
          f"{'fused/bare':>11}")
    for op, name in ((uapi.UBLK_IO_OP_WRITE, "write"), (uapi.UBLK_IO_OP_READ, "read")):
        for batch in (1, 8, 32):
            iters = max(100, args.iters // batch)
            best = {}
            for way in ("general", "fused") * 3:
                t0 = time.perf_counter()
                store_way(way, op, ring, rows, iod, batch, iters, store, q, per)
                dt = (time.perf_counter() - t0) / (iters * batch * per) * 1e6
                best[way] = min(best.get(way, dt), dt)
            bc, bd = bare_lzo(pages, 5000)
            bare = bc if op == uapi.UBLK_IO_OP_WRITE else bd
            print(f"{name:>10}{batch:>6}{best['general']:>10.2f}{best['fused']:>10.2f}"
                  f"{best['general'] / best['fused']:>8.2f}{bare:>10.2f}{best['fused'] / bare:>11.2f}")
    st = store.stats()
    assert st["failed_writes"] == 0 and st["failed_reads"] == 0, st
    out = bytearray(32 * per * 4096)                # the tags the largest batch used
    store.read(8 * 512, memoryview(out))
    assert out == b"".join(pages[:32 * per]), "a page did not round-trip"
    iod["nr_sectors"] = 8
    q.close()
    store.close()


def _bare_rate(compressor: str, pages, nthreads: int, seconds: float) -> float:
    """Pages per second that ``nthreads`` threads compress together with the bare compressor."""
    from ublkzswap import compress
    fn, extra = compress.get(compressor).compress_call
    arrays = [np.frombuffer(p, dtype=np.uint8) for p in pages]
    counts = [0] * nthreads
    start = threading.Barrier(nthreads + 1)
    stop = threading.Event()

    def work(j):
        start.wait()
        n = 0
        while not stop.is_set():
            for a in arrays:
                fn(a, *extra)
            n += len(arrays)
        counts[j] = n

    threads = [threading.Thread(target=work, args=(j,)) for j in range(nthreads)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def _queues_run(store, queues, op, batch, count):
    """Each queue's loop in a thread of its own on its own NOP ring, ``count`` requests each
    (``batch`` in flight); returns requests per second of all of them together."""
    start = threading.Barrier(len(queues) + 1)
    errors = []

    def serve(q, ring, rows, iod):
        budget = _Budget(count)
        target = _Fused(store, budget)
        q.target = target
        iod["op_flags"] = op | (uapi.UBLK_IO_F_SWAP if op == uapi.UBLK_IO_OP_WRITE else 0)
        handle = request_handler(target, q.buf_bytes, q.counters)
        fast = target.page_server(q.bufs, handle)
        ring.put_rows(memoryview(rows).cast("B"), [(k, 0) for k in range(batch)],
                      ring.sqes.dtype.fields["io_result"][1])
        start.wait()
        try:
            q._loop(ring, iod, handle, rows, fast)
        except _Stop:
            pass
        except BaseException as e:
            errors.append(e)
        ring.submit_and_wait(0)
        while ring.cq_ready():
            ring.reap_pairs()

    threads = [threading.Thread(target=serve, args=x) for x in queues]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return len(queues) * count / dt


def main_queues(args):
    """Requests per second of 1 queue and of ``args.queues`` queues at once on one store."""
    from ublkzswap.store import Store
    nq = args.queues
    store = Store(1 << 26, compressor=args.compressor)
    queues = []
    for j in range(nq):
        ring, rows, iod = setup()
        q = Queue(0, None, q_id=j, depth=DEPTH, buf_bytes=4096)
        pages = store_pages(q)
        iod["start_sector"] = (np.arange(DEPTH) + j * DEPTH) * 8 + 8   # pages of its own
        queues.append((q, ring, rows, iod))
    print(f"{nq} queues on one store ({args.compressor}), fused path, fio-like 3:1 pages; "
          f"requests/s of all queues together (best of 3)")
    print(f"{'':>7}{'batch':>6}{'1 queue':>11}{f'{nq} queues':>11}{'ratio':>8}")
    for op, name in ((uapi.UBLK_IO_OP_WRITE, "write"), (uapi.UBLK_IO_OP_READ, "read")):
        for batch in (1, 8, 32):
            count = max(2000, int(args.seconds * 20000))
            best = {1: 0.0, nq: 0.0}
            for _ in range(3):
                for n in (1, nq):
                    best[n] = max(best[n], _queues_run(store, queues[:n], op, batch, count))
            print(f"{name:>7}{batch:>6}{best[1]:>11.0f}{best[nq]:>11.0f}{best[nq] / best[1]:>8.2f}")
    st = store.stats()
    assert st["failed_writes"] == 0 and st["failed_reads"] == 0, st
    one = _bare_rate(args.compressor, pages, 1, args.seconds)
    many = _bare_rate(args.compressor, pages, nq, args.seconds)
    print(f"bare {args.compressor} compress, pages/s: 1 thread {one:.0f}, {nq} threads "
          f"{many:.0f}, ratio {many / one:.2f}")
    print(f"(os.cpu_count() {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} now)")
    for q, ring, _, _ in queues:
        ring.close()
        q.close()
    store.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--queues", type=int, default=0,
                    help="measure 1 queue against this many queues at once on one store")
    ap.add_argument("--seconds", type=float, default=0.5,
                    help="with --queues: about how long each timed run takes")
    ap.add_argument("--compressor", default="lzo",
                    help="with --queues: the store's compressor (lzo, lz4, deflate)")
    ap.add_argument("--pages", type=int, default=1,
                    help="pages per request on the compressed store (swap: often 2-8)")
    args = ap.parse_args(argv)
    if args.queues:
        main_queues(args)
        return
    ring, rows, iod = setup()
    print(f"{'CQEs per wake-up':>18}{'numpy us/req':>14}{'ints us/req':>13}{'ratio':>8}"
          f"{'queue us/req':>14}")
    for batch in (1, 8, 32):
        iters = max(200, args.iters // batch)
        best = {}
        for name, fn in (("numpy", numpy_way), ("ints", ints_way), ("queue", queue_way)):
            fn(ring, rows, iod, batch, 100)
            t = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn(ring, rows, iod, batch, iters)
                t.append(time.perf_counter() - t0)
            best[name] = min(t) / (iters * batch) * 1e6
        print(f"{batch:>18}{best['numpy']:>14.2f}{best['ints']:>13.2f}{best['ints'] / best['numpy']:>8.2f}"
              f"{best['queue']:>14.2f}")
    main_store(args, ring, rows, iod)
    ring.close()


if __name__ == "__main__":
    main()
