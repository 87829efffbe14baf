"""The ramzswap store: compcache 0.6.2's write/read/free rules, counters,
memlimit, backing forwarding, malformed input, and a model-based property test
with the full invariant check after every step."""

import errno
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from ublkzswap import compress as cz
from ublkzswap.arena import Arena
from ublkzswap.backing import Backing
from ublkzswap.store import Store
from ublkzswap.target import features, run_backing_io

from invariants import check

PAGE = 4096
# deeper runs: UBLKZSWAP_EXAMPLES=2000 python3 -m pytest tests/unit/test_store.py
EXAMPLES = int(os.environ.get("UBLKZSWAP_EXAMPLES", 60))


def mkstore(npages=64, **kw):
    kw.setdefault("keeper", False)
    kw.setdefault("inline_refill", True)
    kw.setdefault("low", 4)
    kw.setdefault("high", 16)
    return Store(npages * PAGE, **kw)


class LenCompressor:
    """Injectable compressor: the output length is chosen per page.

    A page built by page(n, seed) compresses to exactly n bytes; the stream
    carries a 4-byte id, decompress looks the page up again."""

    def __init__(self):
        self.pages = {}
        self.comp = cz.Compressor("fixedlen", self.compress, self.decompress)

    def page(self, clen, seed=0):
        rng = random.Random(seed * 7919 + clen)
        p = bytes(rng.getrandbits(8) for _ in range(PAGE))
        self.pages[len(self.pages)] = (p, clen)
        return p

    def compress(self, src):
        src = bytes(src)
        for i, (p, clen) in self.pages.items():
            if p == src:
                return i.to_bytes(4, "little") + bytes(clen - 4)
        raise cz.CompressionError("unknown page")

    def decompress(self, src, size=PAGE):
        i = int.from_bytes(bytes(src[:4]), "little")
        if i not in self.pages:
            raise cz.CompressionError("corrupt")
        return self.pages[i][0]


class FakeBacking:
    """A backing swap in a memfd: what the store needs of one (fd, offset, runs, name)."""
    name = "/dev/fake"
    runs = Backing.runs              # the real batching, over this fd and offset()

    def __init__(self, npages):
        self.npages = npages
        self.fd = os.memfd_create("fake-backing")
        os.ftruncate(self.fd, npages * PAGE)
        self._rw = self.fd
        self.fail = False

    @property
    def fail(self):
        return self.fd != self._rw

    @fail.setter
    def fail(self, on):
        if on:   # writes now get EBADF, as a dying disk would give EIO
            self.fd = os.open(f"/proc/self/fd/{self._rw}", os.O_RDONLY)
        else:
            self.fd = self._rw

    def offset(self, idx):
        return idx * PAGE

    @property
    def data(self):
        """{page index: bytes} of the pages written so far (non-zero ones)."""
        out = {}
        for i in range(self.npages):
            p = os.pread(self._rw, PAGE, i * PAGE)
            if p != bytes(PAGE):
                out[i] = p
        return out

    def put(self, idx, page):
        os.pwrite(self._rw, page, idx * PAGE)


def rd(store, idx):
    out = memoryview(bytearray(b"\xee" * PAGE))
    pending = store.read(idx * PAGE, out)
    if pending is not None:
        run_backing_io(pending, out)
    return bytes(out)


def wr(store, idx, page):
    buf = memoryview(bytearray(page))
    pending = store.write(idx * PAGE, buf)
    if pending is not None:
        run_backing_io(pending, buf)


def compressible(seed=0, n=1500):
    rng = random.Random(seed)
    text = b" ".join(rng.choice([b"swap", b"page", b"ramzswap", b"compcache", b"xvmalloc", b"lzo"]) for _ in range(n))
    return (text * (PAGE // len(text) + 2))[:PAGE]


# ---------------------------------------------------------------- basics

def test_is_a_target_with_all_optional_ops():
    s = mkstore()
    assert s.size == 64 * PAGE
    assert features(s) == {"discard", "write_zeroes", "flush"}
    assert s.algorithm == "lzo"


def test_never_written_reads_zero_not_stale_buffer():
    s = mkstore()
    assert rd(s, 5) == bytes(PAGE)
    st_ = s.stats()
    assert st_["num_reads"] == 1 and st_["mem_used_total"] == 0


def test_roundtrip_kinds_and_multi_page_requests():
    s = mkstore()
    pages = [bytes(PAGE), b"\x01\x02\x03\x04\x05\x06\x07\x08" * 512, os.urandom(PAGE), compressible(1), compressible(2)]
    s.write(8 * PAGE, memoryview(bytearray(b"".join(pages))))
    out = bytearray(len(pages) * PAGE)
    s.read(8 * PAGE, memoryview(out))
    assert bytes(out) == b"".join(pages)
    assert [s.slot(8 + i)[0] for i in range(5)] == ["same", "same", "raw", "compressed", "compressed"]
    st_ = s.stats()
    assert st_["num_writes"] == 5 and st_["num_reads"] == 5
    check(s)


def test_zero_page_uses_no_memory_and_is_counted_as_compcache():
    s = mkstore()
    wr(s, 3, bytes(PAGE))
    st_ = s.stats()
    assert st_["zero_pages"] == 1 and st_["same_pages"] == 1
    assert st_["pages_stored"] == 0 and st_["orig_data_size"] == 0
    assert st_["mem_used_total"] == 0 and st_["compr_data_size"] == 0
    assert rd(s, 3) == bytes(PAGE)
    check(s)


def test_same_filled_page_every_word_equal():
    s = mkstore()
    word = b"\xde\xad\xbe\xef\x01\x02\x03\x04"
    wr(s, 1, word * 512)
    st_ = s.stats()
    assert st_["same_pages"] == 1 and st_["zero_pages"] == 0
    assert st_["pages_stored"] == 1 and st_["good_compress"] == 1
    assert st_["mem_used_total"] == 0 and st_["compr_data_size"] == 0
    assert rd(s, 1) == word * 512
    # a page equal in the first and last word but not everywhere is not same-filled
    p = bytearray(word * 512)
    p[2000] ^= 1
    wr(s, 2, p)
    assert s.slot(2)[0] == "compressed"
    assert rd(s, 2) == bytes(p)
    # byte-periodic but not word-periodic (period 3)
    wr(s, 4, (b"abc" * 1366)[:PAGE])
    assert s.slot(4)[0] == "compressed"
    check(s)


def test_high_word_fill_value_round_trips():
    s = mkstore()
    p = (0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") * 512
    wr(s, 0, p)
    assert rd(s, 0) == p


def test_incompressible_page_stored_raw_without_backing():
    s = mkstore(allocator="xvmalloc")
    p = os.urandom(PAGE)
    wr(s, 7, p)
    kind, handle, length, _ = s.slot(7)
    assert kind == "raw" and length == PAGE
    st_ = s.stats()
    assert st_["huge_pages"] == 1 and st_["pages_stored"] == 1
    assert st_["compr_data_size"] == PAGE and st_["mem_used_total"] == PAGE
    assert st_["good_compress"] == 0
    assert rd(s, 7) == p
    check(s)


def test_compressed_page_counters():
    s = mkstore(allocator="xvmalloc")
    p = compressible(3)
    clen = len(cz.get("lzo").compress(p))
    wr(s, 0, p)
    st_ = s.stats()
    assert st_["pages_stored"] == 1 and st_["orig_data_size"] == PAGE
    assert st_["compr_data_size"] == clen and st_["good_compress"] == 1
    assert st_["mem_used_total"] == PAGE  # one xvmalloc page
    assert s.allocator.object_size(s.slot(0)[1]) == clen
    check(s)


# ----------------------------------------------- boundary compressed lengths

@pytest.mark.parametrize("clen,kind,good", [
    (31, "compressed", 1), (32, "compressed", 1), (2048, "compressed", 1), (2049, "compressed", 0),
    (3072, "compressed", 0), (3073, "raw", 0), (4092, "raw", 0), (4093, "raw", 0),
])
def test_compressed_length_boundaries_without_backing(clen, kind, good):
    lc = LenCompressor()
    s = mkstore(compressor=lc.comp, allocator="xvmalloc")
    p = lc.page(clen)
    wr(s, 0, p)
    assert s.slot(0)[0] == kind
    st_ = s.stats()
    assert st_["good_compress"] == good
    assert st_["huge_pages"] == (kind == "raw")
    assert st_["compr_data_size"] == (PAGE if kind == "raw" else clen)
    if kind == "compressed":
        assert s.slot(0)[2] == clen and s.allocator.object_size(s.slot(0)[1]) == clen
    assert rd(s, 0) == p
    check(s)


@pytest.mark.parametrize("clen,forwarded", [(2048, False), (2049, True), (3072, True), (3073, True)])
def test_compressed_length_boundaries_with_backing(clen, forwarded):
    lc = LenCompressor()
    b = FakeBacking(64)
    s = mkstore(compressor=lc.comp, backing=b, memlimit=64 * PAGE)
    p = lc.page(clen)
    wr(s, 0, p)
    st_ = s.stats()
    assert st_["bd_writes"] == int(forwarded)
    assert st_["backing_swap"] == "/dev/fake"
    assert (0 in b.data) == forwarded
    assert s.slot(0)[0] == ("empty" if forwarded else "compressed")
    assert rd(s, 0) == p
    st_ = s.stats()
    assert st_["bd_reads"] == int(forwarded)
    assert st_["num_reads"] == int(not forwarded)  # forwarded reads are not counted as num_reads
    assert st_["num_writes"] == 1  # forwarded writes are
    check(s)


# ---------------------------------------------------------------- overwrite, discard

def test_overwrite_frees_the_old_slot():
    s = mkstore()
    wr(s, 0, os.urandom(PAGE))
    wr(s, 0, compressible(4))
    st_ = s.stats()
    assert st_["huge_pages"] == 0 and st_["pages_stored"] == 1
    wr(s, 0, bytes(PAGE))
    st_ = s.stats()
    assert st_["pages_stored"] == 0 and st_["zero_pages"] == 1 and st_["mem_used_total"] == 0
    assert st_["mem_used_max"] >= 2 * PAGE  # raw page + xv page during the overwrite
    check(s)


def test_discard_frees_whole_pages_and_counts_notify_free():
    s = mkstore()
    for i in range(4):
        wr(s, i, compressible(i))
    wr(s, 4, os.urandom(PAGE))
    s.discard(0, 6 * PAGE)
    st_ = s.stats()
    assert st_["notify_free"] == 6  # every page of the range, as zram
    assert st_["pages_stored"] == 0 and st_["mem_used_total"] == 0
    assert all(rd(s, i) == bytes(PAGE) for i in range(6))
    assert s.pool.pages_of(2).size == 0 and s.pool.pages_of(3).size == 0
    check(s)


def test_write_zeroes_and_discard_of_one_page():
    s = mkstore()
    wr(s, 2, compressible(9))
    s.write_zeroes(2 * PAGE, PAGE)
    assert rd(s, 2) == bytes(PAGE)
    wr(s, 3, compressible(8))
    s.discard(3 * PAGE, PAGE)
    st_ = s.stats()
    assert st_["notify_free"] == 2 and st_["pages_stored"] == 0
    assert rd(s, 3) == bytes(PAGE)
    s.flush()
    check(s)


def test_write_zeroes_with_backing_does_not_expose_backing_data():
    b = FakeBacking(16)
    s = mkstore(16, backing=b, memlimit=16 * PAGE)
    b.put(5, b"\x55" * PAGE)
    s.write_zeroes(5 * PAGE, PAGE)
    assert rd(s, 5) == bytes(PAGE)
    check(s)


def test_page_returned_to_pool_when_last_object_freed():
    s = mkstore()
    wr(s, 0, compressible(5))
    page = s.slot(0)[1] >> 12
    assert s.pool.state[page] == 2  # XV
    s.discard(0, PAGE)
    assert s.pool.state[page] == 1  # READY again
    assert s.stats()["mem_used_total"] == 0


# ---------------------------------------------------------------- memory limit, ENOSPC

def test_memlimit_without_backing_fails_write_and_keeps_old_content():
    s = mkstore(memlimit=2 * PAGE, allocator="xvmalloc")
    a, b = os.urandom(PAGE), os.urandom(PAGE)
    wr(s, 0, a)
    wr(s, 1, b)
    old = rd(s, 1)
    with pytest.raises(OSError) as ei:
        wr(s, 1, os.urandom(PAGE))  # would need a third page before the old one is freed
    assert ei.value.errno == errno.ENOMEM
    assert rd(s, 1) == old
    with pytest.raises(OSError):
        wr(s, 2, compressible(1))
    st_ = s.stats()
    assert st_["failed_writes"] == 2 and st_["num_writes"] == 4
    assert st_["mem_used_total"] == 2 * PAGE and st_["mem_used_max"] == 2 * PAGE
    assert st_["mem_limit"] == 2 * PAGE
    check(s)
    s.set_memlimit(0)  # runtime change, as zram
    wr(s, 2, compressible(1))
    check(s)


def test_memlimit_with_backing_forwards_as_compcache():
    b = FakeBacking(64)
    s = mkstore(backing=b, memlimit=2 * PAGE)
    p1, p2, p3 = compressible(1, 2000), compressible(2, 2000), compressible(3, 2000)
    for i, p in enumerate((p1, p2)):
        wr(s, i, p)
    # forward once compr_data_size > memlimit - PAGE
    while s.stats()["compr_data_size"] <= 2 * PAGE - PAGE:
        i += 1
        wr(s, i, compressible(i + 10, 2000))
    before = s.stats()["bd_writes"]
    wr(s, 40, p3)
    assert s.stats()["bd_writes"] == before + 1 and 40 in b.data
    assert rd(s, 40) == p3
    # zero pages are never forwarded
    wr(s, 41, bytes(PAGE))
    assert 41 not in b.data and s.slot(41)[0] == "same"
    check(s)


def test_backing_write_failure_is_eio_and_keeps_slot():
    b = FakeBacking(8)
    s = mkstore(8, backing=b, memlimit=8 * PAGE)
    wr(s, 0, compressible(1))
    b.fail = True
    with pytest.raises(OSError) as ei:
        wr(s, 0, os.urandom(PAGE))
    assert ei.value.errno == errno.EIO
    assert rd(s, 0) == compressible(1)
    assert s.stats()["failed_writes"] == 1


def test_empty_pool_gives_enospc_and_reads_still_work():
    s = mkstore(inline_refill=False, low=0, high=2, allocator="xvmalloc")
    assert s.pool.ready == 2
    wr(s, 0, os.urandom(PAGE))
    wr(s, 1, os.urandom(PAGE))
    with pytest.raises(OSError) as ei:
        wr(s, 2, os.urandom(PAGE))
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as ei:
        wr(s, 3, compressible(1))
    assert ei.value.errno == errno.ENOSPC
    assert rd(s, 2) == bytes(PAGE) and len(rd(s, 0)) == PAGE
    wr(s, 4, bytes(PAGE))  # same-filled pages need no memory
    st_ = s.stats()
    assert st_["failed_writes"] == 2 and st_["failed_reads"] == 0
    assert st_["pool_misses"] == 2 and st_["growth_deferred"] == 0
    check(s)
    s.pool.step()  # the keeper brings pages in; the retried write succeeds
    wr(s, 3, compressible(1))
    assert rd(s, 3) == compressible(1)
    check(s)


def test_corrupt_stream_is_failed_read_eio():
    s = mkstore()
    wr(s, 0, compressible(1))
    h = s.slot(0)[1]
    s.pool.mem[h:h + 8] = 0xFF
    with pytest.raises(OSError) as ei:
        rd(s, 0)
    assert ei.value.errno == errno.EIO
    assert s.stats()["failed_reads"] == 1


@pytest.mark.parametrize("name", ["lzo", "lz4", "deflate"])
def test_other_compressors(name):
    s = mkstore(compressor=name)
    assert s.algorithm == name
    pages = [compressible(i) for i in range(5)] + [os.urandom(PAGE)]
    for i, p in enumerate(pages):
        wr(s, i, p)
    assert [rd(s, i) for i in range(6)] == pages
    check(s)


@pytest.mark.parametrize("kw", [dict(disksize=0), dict(disksize=4097), dict(disksize=-PAGE),
                                dict(disksize=PAGE, memlimit=-1), dict(disksize=PAGE, compressor="nope")])
def test_bad_constructor_arguments(kw):
    with pytest.raises(ValueError):
        Store(keeper=False, **kw)


def test_keeper_thread_default_and_close():
    s = Store(256 * PAGE, low=4, high=8)
    try:
        assert s.pool.running
        for i in range(40):  # more pages than the pool holds: the keeper refills
            for _ in range(200):
                try:
                    wr(s, i, os.urandom(PAGE))
                    break
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    import time
                    time.sleep(0.005)
            else:
                raise AssertionError("keeper never refilled the pool")
        assert s.stats()["huge_pages"] == 40
        check(s)
        pool = s.pool
    finally:
        s.close()
    assert not pool.running


def test_shared_arena_is_not_closed_by_store():
    a = Arena(64, unit=16, low=16, high=32, inline_refill=True)
    s = Store(32 * PAGE, pool=a)
    wr(s, 0, compressible(1))
    s.close()
    assert a.mem is not None and not a.running


# ---------------------------------------------------------------- property test

PAGE_KINDS = st.sampled_from(["zero", "same", "random", "compressible", "half"])


def make_page(kind, seed):
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(PAGE)
    if kind == "same":
        return rng.getrandbits(64).to_bytes(8, "little") * 512
    if kind == "random":
        return rng.randbytes(PAGE)
    if kind == "compressible":
        return compressible(seed, rng.randint(1, 1500))
    n = rng.randint(1, PAGE - 1)  # random prefix, zero tail: every compressed length
    return rng.randbytes(n) + bytes(PAGE - n)


OPS = st.lists(st.tuples(st.sampled_from(["write", "write", "write", "read", "discard", "multi"]),
                         st.integers(0, 23), PAGE_KINDS, st.integers(0, 2**32)), min_size=1, max_size=40)


@settings(max_examples=EXAMPLES, deadline=None)
@given(OPS, st.sampled_from([0, 6 * PAGE]))
def test_random_operations_against_dict_model(ops, memlimit):
    s = mkstore(24, memlimit=memlimit, low=2, high=6)
    model = {}
    for op, idx, kind, seed in ops:
        if op == "write":
            p = make_page(kind, seed)
            try:
                wr(s, idx, p)
                model[idx] = p
            except OSError as e:
                assert memlimit and e.errno == errno.ENOMEM
        elif op == "multi":
            n = min(3, 24 - idx)
            ps = [make_page(kind, seed + i) for i in range(n)]
            try:
                s.write(idx * PAGE, memoryview(bytearray(b"".join(ps))))
                model.update({idx + i: p for i, p in enumerate(ps)})
            except OSError as e:
                assert memlimit and e.errno == errno.ENOMEM
                # pages before the failing one were stored: learn which from a read
                for i, p in enumerate(ps):
                    if rd(s, idx + i) == p:
                        model[idx + i] = p
        elif op == "read":
            assert rd(s, idx) == model.get(idx, bytes(PAGE))
        else:
            s.discard(idx * PAGE, PAGE)
            model.pop(idx, None)
        check(s)
        st_ = s.stats()
        if memlimit:
            assert st_["mem_used_total"] <= memlimit
    for i in range(24):
        assert rd(s, i) == model.get(i, bytes(PAGE))


def test_keeper_init_runs_in_the_keeper_thread():
    import threading
    seen = []
    s = Store(16 * PAGE, low=1, high=4, keeper_init=lambda: seen.append(threading.current_thread().name),
              keeper_interval=0.01)
    try:
        import time
        deadline = time.time() + 5
        while not seen and time.time() < deadline:
            time.sleep(0.01)
        assert seen == ["arena-keeper"]
    finally:
        s.close()


def test_preformatted_header_is_counted_nowhere_until_replaced():
    s = mkstore()
    header = b"\x11" * 4086 + b"SWAPSPACE2"
    s.preformat(header)
    assert all(not v for k, v in s.stats().items() if k != "disksize"), s.stats()
    assert rd(s, 0) == header
    check(s)
    wr(s, 0, compressible(1))          # swapon/mkswap rewrote it: now an ordinary page
    st_ = s.stats()
    assert st_["pages_stored"] == 1 and st_["num_writes"] == 1 and st_["huge_pages"] == 0
    check(s)
    s.preformat(header)
    s.discard(0, PAGE)
    assert s.stats()["pages_stored"] == 0 and s.stats()["notify_free"] == 1
    check(s)


def test_a_request_refused_part_way_counts_every_page_written_and_failed():
    # as the block layer counts it: a 4-page write whose third page finds no memory fails
    # as a whole, so NumWrites grows by 4 and FailedWrites by the 2 pages not stored
    s = mkstore(inline_refill=False, low=0, high=2, allocator="xvmalloc")
    assert s.pool.ready == 2
    data = compressible(1) + os.urandom(PAGE) + os.urandom(PAGE) + compressible(2)
    with pytest.raises(OSError) as ei:
        s.write_swap(8 * PAGE, memoryview(data))
    assert ei.value.errno == errno.ENOSPC
    st_ = s.stats()
    assert st_["num_writes"] == 4 and st_["failed_writes"] == 2
    assert st_["pages_stored"] == 2                # the two before the one refused
    check(s)


# ---------------------------------------------------------------- deduplication

def test_a_swapped_out_page_identical_to_a_stored_one_shares_its_object():
    """The kernel frees swap slots without telling the device; a page swapped out again goes
    to a new slot while its old copy stays. A swap-out identical to a stored page shares that
    page's object; the object goes only with its last holder."""
    s = mkstore(64, low=2, high=8)
    p, q = compressible(1), compressible(2)
    try:
        s.write_swap(1 * PAGE, memoryview(p))
        mem = s.stats()["mem_used_total"]
        for i in (2, 3):
            s.write_swap(i * PAGE, memoryview(bytearray(p)))
        st_ = s.stats()
        clen = s.slot(1)[2]
        assert s.slot(2)[1] == s.slot(3)[1] == s.slot(1)[1]          # one object
        assert st_["dup_data_size"] == 2 * clen and st_["compr_data_size"] == 3 * clen
        assert st_["pages_stored"] == 3 and st_["mem_used_total"] == mem
        check(s)
        s.write(4 * PAGE, memoryview(p))               # not a swap-out: an object of its own
        assert s.slot(4)[1] != s.slot(1)[1] and s.stats()["dup_data_size"] == 2 * clen
        wr(s, 1, q)                                    # holders leave one by one...
        check(s)
        s.discard(3 * PAGE, PAGE)
        check(s)
        assert s.stats()["dup_data_size"] == 0 and rd(s, 2) == p and rd(s, 1) == q
        s.write_swap(5 * PAGE, memoryview(p))           # (the index remembers slot 2 or 4)
        s.discard(0, 64 * PAGE)                        # ...or all at once
        check(s)
        st_ = s.stats()
        assert st_["pages_stored"] == 0 and st_["dup_data_size"] == 0
        assert s.allocator.live_bytes() == 0
    finally:
        s.close()


def test_an_overwrite_with_the_same_page_and_a_ring_left_in_any_order():
    s = mkstore(64, low=2, high=8)
    p = compressible(3)
    rng = random.Random(5)
    try:
        for _ in range(3):
            slots = rng.sample(range(64), 6)
            for i in slots:
                s.write_swap(i * PAGE, memoryview(p))
            s.write_swap(slots[2] * PAGE, memoryview(p))      # the same page again, same slot
            check(s)
            assert len({s.slot(i)[1] for i in slots}) == 1
            rng.shuffle(slots)
            for i in slots:
                (s.discard(i * PAGE, PAGE) if rng.random() < 0.5 else
                 wr(s, i, compressible(rng.randrange(99) + 10)))
                check(s)
                assert all(rd(s, j) == p for j in slots[slots.index(i) + 1:])
    finally:
        s.close()


def test_an_incompressible_swap_out_shares_too_and_sharing_passes_the_memory_limit():
    s = mkstore(64, low=2, high=8)
    rnd = random.Random(9).randbytes(PAGE)
    try:
        s.write_swap(1 * PAGE, memoryview(rnd))
        s.set_memlimit(s.stats()["mem_used_total"])    # full: a new object is refused...
        with pytest.raises(OSError) as e:
            s.write_swap(2 * PAGE, memoryview(compressible(4)))
        assert e.value.errno == errno.ENOMEM
        s.write_swap(3 * PAGE, memoryview(bytearray(rnd)))   # ...a shared one takes nothing
        st_ = s.stats()
        assert s.slot(3)[:3] == ("raw", s.slot(1)[1], PAGE) and st_["dup_data_size"] == PAGE
        assert st_["huge_pages"] == 2 and rd(s, 3) == rnd
        check(s)
        s.discard(1 * PAGE, PAGE)
        assert rd(s, 3) == rnd and s.stats()["dup_data_size"] == 0
        check(s)
    finally:
        s.close()
