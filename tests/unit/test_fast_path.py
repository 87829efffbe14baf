"""The queue's fast path (Store.page_server: a wake-up's READs and WRITEs of whole pages, one
page or several, in one call) against the general path (the request handler, one request at a time):
random request sequences through two queues, each on a store of its own, must leave the same
results, read data, counters, slot table and invariants. Requests of one wake-up touch
different pages: the fast path serves its requests after the others of the wake-up, and the
kernel gives no order to requests in flight together either."""
import errno
import random
import zlib

import pytest

import invariants
from fakering import FakeRing
from fakeublk import make_swapfile, small_store, text_page
from ublkzswap import compress as cz, uapi
from ublkzswap.backing import Backing
from ublkzswap import store as store_module
from ublkzswap.queue import Queue
from ublkzswap.store import dedup_find

R, W, D, WZ = (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_OP_DISCARD,
               uapi.UBLK_IO_OP_WRITE_ZEROES)
SWAP = uapi.UBLK_IO_F_SWAP
PAGE = 4096
PAGES = 96                  # the device
DEPTH = 8
BUF_PAGES = 4               # a tag's buffer


class GeneralOnly:
    """A store seen without its page_server: every request takes the general path."""

    def __init__(self, store):
        self.size = store.size
        for name in ("read", "write", "write_swap", "discard", "write_zeroes", "flush"):
            setattr(self, name, getattr(store, name))


class Spied:
    """A store whose page_server notes every request the fast path is handed and its result."""

    def __init__(self, store):
        self.size = store.size
        self.seen: list[tuple] = []                 # (op_flags, pages, result)
        for name in ("read", "write", "write_swap", "discard", "write_zeroes", "flush"):
            setattr(self, name, getattr(store, name))
        self._store = store

    def page_server(self, bufs, boundary):
        serve = self._store.page_server(bufs, boundary)

        def spied(reqs, done):
            n = len(done)
            serve(reqs, done)
            results = dict(done[n:])
            self.seen.extend((opf, pages, results[tag]) for tag, opf, _, pages in reqs)
        return spied


class BoundaryCompressor:
    """Output lengths on every limit the store tests (good_compress at 2048, raw above 3072);
    a page starting b"NOZ!" fails to compress, one starting b"BAD!" to decompress."""

    LENS = (64, 2047, 2048, 2049, 3071, 3072, 3073)

    def __init__(self):
        self.ids: dict[bytes, int] = {}
        self.pages: list[bytes] = []
        self.comp = cz.Compressor("boundary", self.compress, self.decompress)

    def compress(self, src):
        page = bytes(src)
        if page.startswith(b"NOZ!"):
            raise cz.CompressionError("cannot")
        if page not in self.ids:
            self.ids[page] = len(self.pages)
            self.pages.append(page)
        i = self.ids[page] if not page.startswith(b"BAD!") else 0xFFFFFFFF
        return i.to_bytes(4, "little") + bytes(self.LENS[zlib.crc32(page) % len(self.LENS)] - 4)

    def decompress(self, src, size=PAGE):
        i = int.from_bytes(bytes(src[:4]), "little")
        if i >= len(self.pages):
            raise cz.CompressionError("corrupt")
        return self.pages[i]


def page_of(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind >= 6:
        return (b"NOZ!", b"BAD!")[kind - 6] + rng.randbytes(PAGE - 4)
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return rng.randbytes(8) * 512                       # same-filled, non-zero
    if kind == 2:
        return rng.randbytes(PAGE)                          # incompressible: a raw page
    if kind == 3:                                           # first and last words alike only
        w = rng.randbytes(8)
        return w + rng.randbytes(PAGE - 16) + w
    text = b"compcache ramzswap page %d " % rng.randrange(1000)
    return (text * (PAGE // len(text) + 1))[:PAGE] if kind == 4 else \
        bytes(2730) + rng.randbytes(PAGE - 2730)            # fio-like 3:1


def script(seed: int, steps: int):
    """Wake-ups of random requests, each as (memlimit or None, [(tag, op|flags, start, nr, data)])."""
    rng = random.Random(seed)
    out, history = [], []
    for _ in range(steps):
        free_pages = list(range(PAGES))
        rng.shuffle(free_pages)
        reqs = []
        for tag in range(rng.randrange(1, DEPTH + 1)):
            x = rng.random()
            if x < 0.15:
                # several pages (a swap-out or a readahead): the fast path up to the tag's
                # buffer (BUF_PAGES), the general path's refusal beyond it; a page of a write
                # may fail to compress (the request fails there, as a whole)
                first = free_pages.pop()
                n = rng.randrange(2, BUF_PAGES + 1) if rng.random() < 0.95 else BUF_PAGES + 1
                if first + n > PAGES or any(
                        set(range(first, first + n)) & set(range(r[2] // 8, (r[2] + r[3]) // 8))
                        for r in reqs):
                    continue
                for p in range(first, first + n):
                    if p in free_pages:
                        free_pages.remove(p)
                op = rng.choice((R, W, W | SWAP)) if n <= BUF_PAGES else R   # (no data overflows)
                data = b"".join(page_of(rng) for _ in range(n)) if op != R else None
                reqs.append((tag, op, first * 8, n * 8, data))
                continue
            p = free_pages.pop()
            if x < 0.5:
                # a third of them again a page written before (a swap-out of a page whose
                # slot the kernel freed: deduplication's case)
                again = history and rng.random() < 0.33
                data = rng.choice(history[-16:]) if again else page_of(rng)
                if not data.startswith((b"NOZ!", b"BAD!")) and len(set(data)) > 1:
                    history.append(data)
                reqs.append((tag, W | (SWAP if rng.random() < 0.7 else 0), p * 8, 8, data))
            elif x < 0.85:
                reqs.append((tag, R, p * 8, 8, None))
            elif x < 0.93:
                reqs.append((tag, D if rng.random() < 0.7 else WZ, p * 8, 8, None))
            elif x < 0.96:
                reqs.append((tag, R, PAGES * 8, 8, None))              # beyond the end: -EIO
            else:
                reqs.append((tag, W, p * 8 + 1, 8, page_of(rng)))     # misaligned: -EINVAL
        memlimit = rng.choice((0, 0, 0, 24 * PAGE, 64 * PAGE)) if rng.random() < 0.1 else None
        # the general path's requests first, as the fast path's queue serves them: a swap-out
        # may share a page another request of the wake-up has just written or overwritten
        # (deduplication), so both paths must meet the requests in one order
        reqs.sort(key=lambda r: (0 < r[3] <= BUF_PAGES * 8 and not (r[2] | r[3]) % 8
                                 and r[2] + r[3] <= PAGES * 8 and r[1] & 0xFF in (R, W)))
        out.append((memlimit, [(tag, *r[1:]) for tag, r in enumerate(reqs)]))
    return out


def run(target, store, wakeups):
    q = Queue(7, target, depth=DEPTH, buf_bytes=BUF_PAGES * PAGE)

    def step(memlimit, reqs):
        def post(k):
            if memlimit is not None:
                store.set_memlimit(memlimit)
            return [k.request(tag, op, start, nr, data=data) for tag, op, start, nr, data in reqs]
        return post

    ring = FakeRing(DEPTH, [step(m, r) for m, r in wakeups] + [FakeRing.stop])
    try:
        q.run(ring, ring.iod, cdev=-1)
    finally:
        ring.close()
        q.close()
    by_tag = {}
    for tag, result in ring.commits:
        by_tag.setdefault(tag, []).append(result)
    data = {}
    for tag, d in ring.read_data:
        data.setdefault(tag, []).append(d)
    return by_tag, data, q.counters


@pytest.mark.parametrize("compressor", ["lzo", "boundary"])
@pytest.mark.parametrize("seed", range(4))
def test_fast_and_general_paths_agree(seed, compressor, monkeypatch):
    shared = []                                 # the swap-outs that found a stored twin

    def find(*args):
        twin = dedup_find(*args)
        shared.append(twin)
        return twin
    monkeypatch.setattr(store_module, "dedup_find", find)
    wakeups = script(seed, 120)
    comp = BoundaryCompressor().comp if compressor == "boundary" else "lzo"
    fast_store = small_store(0, PAGES * PAGE, compressor=comp)
    general_store = small_store(0, PAGES * PAGE, compressor=comp)
    try:
        spied = Spied(fast_store)
        fast = run(spied, fast_store, wakeups)
        general = run(GeneralOnly(general_store), general_store, wakeups)
        assert fast[0] == general[0]                          # every request's result
        assert fast[1] == general[1]                          # every page read
        fc, gc = fast[2], general[2]
        for name in ("reads", "writes", "discards", "requests", "batches", "errors", "invalid_io"):
            assert getattr(fc, name) == getattr(gc, name), name
        assert fast_store.stats() == general_store.stats()
        ft, gt = fast_store.table(), general_store.table()
        for k in ("kind", "length", "value"):
            assert (ft[k] == gt[k]).all(), k
        invariants.check(fast_store)
        invariants.check(general_store)
        st = fast_store.stats()
        # the sequence reached the paths it was meant to
        assert st["same_pages"] and st["huge_pages"] and st["good_compress"]
        assert sum(map(bool, shared)) >= 2       # (each path once at least)
        # several pages a request took the fast path, writes and swap-outs among them
        many = [(opf, r) for opf, n, r in spied.seen if n > 1]
        assert {opf for opf, _ in many} >= {R, W, W | SWAP}
        assert any(r > PAGE for _, r in many)
        if compressor == "boundary":
            assert st["failed_writes"] and st["failed_reads"]
            # and some failed part way: a page that did not compress, or not decompress
            assert {r for opf, r in many if opf & 0xFF == W} >= {-errno.EIO}
            assert {r for opf, r in many if opf & 0xFF == R} >= {-errno.EIO}
    finally:
        fast_store.close()
        general_store.close()


def test_a_store_with_a_backing_swap_has_no_fast_path(tmp_path):
    b = Backing(make_swapfile(tmp_path / "swap", 256), remap=False)
    s = small_store(0, PAGES * PAGE, backing=b)
    try:
        assert s.page_server([memoryview(bytearray(PAGE))], lambda e: -5) is None
    finally:
        s.close()
        b.close()


@pytest.mark.parametrize("general", [False, True])
def test_a_swap_out_waits_for_memory_only_while_the_keeper_is_not_held_back(general):
    """How long each write may wait for a ready unit, through either path: an ordinary write
    its alloc_wait, a swap-out its swap_wait, and a swap-out nothing while the pool is short
    (the keeper held back at the free-memory line)."""
    s = small_store(0, PAGES * PAGE, alloc_wait=1.5, swap_wait=0.25)
    waits = []
    real = s.allocator.malloc

    def malloc(size, timeout=0.0):
        waits.append(timeout)
        return real(size, timeout)
    s.allocator.malloc = malloc
    try:
        def wakeup(start):
            return (None, [(0, W, start * 8, 8, text_page(start)),
                           (1, W | SWAP, (start + 1) * 8, 8, text_page(start + 1))])
        target = GeneralOnly(s) if general else s
        assert not s.pool.short
        results = run(target, s, [wakeup(0)])[0]
        assert waits == [1.5, 0.25] and results == {0: [PAGE], 1: [PAGE]}
        s.pool.short = True
        waits.clear()
        results = run(target, s, [wakeup(10)])[0]
        assert waits == [1.5, 0.0] and results == {0: [PAGE], 1: [PAGE]}
    finally:
        s.close()


def test_after_one_swap_out_waited_in_vain_the_rest_of_the_wake_up_fail_at_once():
    """The wait holds the store lock (discards queue behind it): one swap-out of a wake-up
    may wait swap_wait for memory; once one has waited in vain the others fail at once, and
    the next wake-up may wait again."""
    s = small_store(0, PAGES * PAGE, alloc_wait=1.5, swap_wait=0.25)
    waits = []

    def malloc(size, timeout=0.0):
        waits.append(timeout)
        raise MemoryError("no ready unit")
    s.allocator.malloc = malloc
    try:
        def wakeup(start):
            return (None, [(k, W | SWAP, (start + k) * 8, 8, text_page(start + k))
                           for k in range(3)])
        results = run(s, s, [wakeup(0), wakeup(10)])[0]
        assert waits == [0.25, 0.0, 0.0, 0.25, 0.0, 0.0]
        assert results == {k: [-errno.ENOSPC] * 2 for k in range(3)}
        assert s.stats()["failed_writes"] == 6
    finally:
        s.close()
