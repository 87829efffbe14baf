"""The store under several queue threads at once (issue 11): random operation sequences from
2-4 threads -- fused page_server batches and general-path requests of one or several pages,
swap and ordinary writes, reads, discards -- on pages each thread owns and on pages they all
write, while another thread compacts. Afterwards table, allocator, pool and counters agree
(invariants.check), every owned page holds its thread's last write, every shared page one
thread's last write; and no read ever returned anything but a value once written there (or
zeros), nor failed. Thread switches are forced every few microseconds and python-lzo
releases the GIL while it works, so reads, overwrites, frees and moves of one slot overlap;
the "slow" compressor (LZO that lets the other threads run for a while before it reads its
input, in both directions) makes the overlaps wide: a read that decompressed a slot's bytes
in the arena after letting go of the store lock fails this test."""
import errno
import random
import sys
import threading
import time
import zlib

import pytest

import invariants
from ublkzswap import compress as cz, uapi
from ublkzswap.store import Store

SWAP = uapi.UBLK_IO_F_SWAP
PAGE = 4096
PAGES = 128
SHARED = 8                 # pages 0..SHARED-1: written by every thread
RUN = 4                    # beyond them, runs of 4 pages owned by one thread each


def page_kinds(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return rng.randbytes(8) * 512                          # same-filled
    if kind == 2:
        return rng.randbytes(PAGE)                             # raw
    if kind == 3:
        w = rng.randbytes(8)
        return w + rng.randbytes(PAGE - 16) + w                # first and last words alike
    if kind == 4:
        return bytes(2730) + rng.randbytes(PAGE - 2730)        # fio-like 3:1
    text = b"compcache page %d " % rng.randrange(100000)
    return (text * (PAGE // len(text) + 1))[:PAGE]


@pytest.fixture
def often_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _slow_lzo() -> cz.Compressor:
    lzo = cz.get("lzo")

    def compress(src):
        time.sleep(0.0001)                  # the GIL let go, as LZO does, for longer
        return lzo.compress(src)

    def decompress(src, size=PAGE):
        time.sleep(0.0001)
        return lzo.decompress(src, size)

    return cz.Compressor("slow", compress, decompress)


def mkstore(allocator, compressor):
    comp = _slow_lzo() if compressor == "slow" else compressor
    return Store(PAGES * PAGE, allocator=allocator, compressor=comp, keeper=False,
                 inline_refill=True, low=4, high=32)


class Shared:
    """What every thread may see on a page: the crc of every value ever written to it (added
    before the write is issued), zeros always (a discard, or nothing written yet)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen = {p: {zlib.crc32(bytes(PAGE))} for p in range(PAGES)}
        self.bad: list[str] = []

    def will_write(self, page: int, data: bytes) -> None:
        with self.lock:
            self.seen[page].add(zlib.crc32(data))

    def check_read(self, who: str, page: int, data: bytes) -> None:
        if zlib.crc32(data) not in self.seen[page]:
            with self.lock:
                self.bad.append(f"{who}: page {page} read a value never written there")


class Worker:
    def __init__(self, tid: int, nthreads: int, store: Store, shared: Shared, seed: int,
                 steps: int):
        self.tid, self.store, self.shared = tid, store, shared
        self.rng = random.Random(seed * 1000 + tid)
        self.steps = steps
        self.own = [p for p in range(SHARED, PAGES) if (p // RUN) % nthreads == tid]
        self.owned = set(self.own)
        self.content: dict[int, bytes] = {}       # page -> what this thread last stored there
        self.reads = self.writes = 0
        self.errors: list[str] = []
        self.bufs = [memoryview(bytearray(PAGE)) for _ in range(8)]
        self.serve = store.page_server(self.bufs, lambda e: -errno.EIO)   # made in this thread

    def pick(self) -> int:
        return self.rng.randrange(SHARED) if self.rng.random() < 0.4 else self.rng.choice(self.own)

    def expect(self, page: int) -> bytes:
        return self.content.get(page, bytes(PAGE))

    def run(self) -> None:
        try:
            for _ in range(self.steps):
                x = self.rng.random()
                if x < 0.5:
                    self.fused()
                elif x < 0.9:
                    self.general()
                else:
                    p = self.pick()
                    self.store.discard(p * PAGE, PAGE)
                    self.content[p] = bytes(PAGE)
        except BaseException as e:
            self.errors.append(f"thread {self.tid}: {type(e).__name__}: {e}")

    def fused(self) -> None:
        """One wake-up: up to 8 single-page requests on distinct pages (as the kernel gives:
        requests in flight together do not overlap)."""
        pages = list(dict.fromkeys(self.pick() for _ in range(self.rng.randrange(1, 9))))
        reqs, wrote = [], {}
        for tag, p in enumerate(pages):
            if self.rng.random() < 0.5:
                data = page_kinds(self.rng)
                self.bufs[tag][:] = data
                self.shared.will_write(p, data)
                wrote[tag] = (p, data)
                reqs.append((tag, 1 | (SWAP if self.rng.random() < 0.7 else 0), p, 1))
            else:
                reqs.append((tag, 0, p, 1))
        done = []
        self.serve(reqs, done)
        assert sorted(t for t, _ in done) == list(range(len(reqs)))
        for tag, r in done:
            p = pages[tag]
            if tag in wrote:
                self.writes += 1
                if r == PAGE:
                    self.content[p] = wrote[tag][1]
                elif r not in (-errno.ENOSPC, -errno.ENOMEM):
                    self.errors.append(f"write of page {p}: {r}")
            else:
                self.reads += 1
                if r != PAGE:
                    self.errors.append(f"read of page {p} failed: {r}")
                self.check(p, bytes(self.bufs[tag]), "fused")

    def general(self) -> None:
        n = self.rng.choice((1, 1, 2, 3))
        first = self.pick()
        pages = [first]
        while len(pages) < n and pages[-1] + 1 in self.owned:    # contiguous, all its own
            pages.append(pages[-1] + 1)
        buf = memoryview(bytearray(len(pages) * PAGE))
        if self.rng.random() < 0.5:
            data = [page_kinds(self.rng) for _ in pages]
            for k, (p, d) in enumerate(zip(pages, data)):
                buf[k * PAGE:(k + 1) * PAGE] = d
                self.shared.will_write(p, d)
            write = self.store.write_swap if self.rng.random() < 0.5 else self.store.write
            self.writes += len(pages)
            try:
                write(first * PAGE, buf)
                for p, d in zip(pages, data):
                    self.content[p] = d
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                self.errors.append("unexpected refusal")     # the pool refills inline
        else:
            self.reads += len(pages)
            self.store.read(first * PAGE, buf)
            for k, p in enumerate(pages):
                self.check(p, bytes(buf[k * PAGE:(k + 1) * PAGE]), "general")

    def check(self, p: int, got: bytes, how: str) -> None:
        self.shared.check_read(f"thread {self.tid} ({how})", p, got)
        if p >= SHARED and got != self.expect(p):
            self.errors.append(f"{how} read of owned page {p}: not its last write")


def compactor(store: Store, stop: threading.Event, errors: list) -> None:
    try:
        while not stop.wait(0.001):
            store.compact(max_fill=0.9, batches=2, wait=False)
    except BaseException as e:
        errors.append(f"compactor: {type(e).__name__}: {e}")


@pytest.mark.parametrize("compressor", ["lzo", "slow"])
@pytest.mark.parametrize("allocator", ["log", "xvmalloc"])
@pytest.mark.parametrize("nthreads", [2, 4])
@pytest.mark.parametrize("seed", range(2))
def test_threads_at_once_keep_the_store_consistent(allocator, nthreads, seed, compressor,
                                                   often_switching):
    store = mkstore(allocator, compressor)
    shared = Shared()
    try:
        workers = [Worker(t, nthreads, store, shared, seed, 600 // nthreads + 100)
                   for t in range(nthreads)]
        stop, cerrors = threading.Event(), []
        threads = [threading.Thread(target=w.run) for w in workers]
        comp = threading.Thread(target=compactor, args=(store, stop, cerrors))
        comp.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stop.set()
        comp.join(10)
        assert not any(t.is_alive() for t in threads)
        assert cerrors == [] and shared.bad == []
        for w in workers:
            assert w.errors == []
        st = store.stats()
        assert st["failed_reads"] == 0
        assert st["num_reads"] == sum(w.reads for w in workers)
        assert st["num_writes"] == sum(w.writes for w in workers)
        invariants.check(store)
        out = memoryview(bytearray(PAGE))
        for w in workers:
            for p in w.own:
                store.read(p * PAGE, out)
                assert bytes(out) == w.expect(p), f"page {p} of thread {w.tid}"
        for p in range(SHARED):
            store.read(p * PAGE, out)
            lasts = {zlib.crc32(w.expect(p)) for w in workers}
            assert zlib.crc32(bytes(out)) in lasts, f"shared page {p}: no thread's last write"
    finally:
        store.close()
