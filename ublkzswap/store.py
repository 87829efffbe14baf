"""The ramzswap store: where a swapped-out 4 KiB page goes, and how it comes back.

Owns: the slot table, the per-page write/read/free operations in compcache
0.6.2's order, the memory limit and every ``--stats`` counter
(../shared/docs/compcache-reference.md sections 1.3, 1.7, 1.8; zram 6.x for
same-filled pages, ``mem_used_max`` and the no-backing memory limit).
A :class:`Store` is a target (``ublkzswap/target.py``): byte offsets,
page-aligned, multi-page requests.

Write of page *i* (:meth:`Store.write_page`; :meth:`Store.write` per page):

1. ``num_writes++``.
2. Same-filled page (every 8-byte word equal, zero the common case, as zram):
   no memory, the slot keeps the fill word. Checked before anything else, so
   such pages are never forwarded.
3. With a backing swap and ``compr_data_size > memlimit - 4096``: forward the
   page to the backing swap (compcache).
4. Compress (LZO1X-1 by default). Failure: ``failed_writes++``, EIO.
5. ``clen > 2048`` with a backing swap: forward. ``clen > 3072`` without one:
   store the page raw in a whole arena page (``huge_pages``, compcache's
   ``pages_expand``; it counts 4096 in ``compr_data_size``).
6. Otherwise ``xv_malloc(clen)`` (the object header is xvmalloc's 4 bytes;
   compcache's zobj_header is empty). No ready arena page: with a backing swap
   forward (compcache), without one ``failed_writes++`` and ENOSPC.
7. Without a backing swap and with a memory limit (as zram, runtime
   changeable): if ``mem_used_total`` would exceed it the new allocation is
   undone, ``failed_writes++`` and the write fails with ENOMEM; the old
   content of the slot is kept.
8. ``mem_used_max`` follows ``mem_used_total`` (zram's watermark, measured
   after allocating and before freeing the old object, like zram).
9. Copy, free the slot's old content, publish (handle, length, kind).

Free-on-overwrite is how compcache works without swap-free notify; a ublk
device gets no free notify, so DISCARD (``swapon --discard``) and
WRITE_ZEROES free whole pages and count ``notify_free`` per page, as zram.

Read of page *i*: ``num_reads++``; a same-filled slot is filled with its word,
a raw slot copied, a compressed slot decompressed (failure: ``failed_reads++``,
EIO); an empty slot (never written, discarded, or forwarded) is read from the
backing swap (``num_reads--``, ``bd_reads++``) or, without one, returns zeros
(compcache left the buffer untouched; a ublk buffer holds stale data, so we
zero it). Reads never need memory, so they never fail for lack of it.

Counters (``stats()`` keys, the names agreed in docs/CONTRACTS.md):

- ``zero_pages`` = compcache's ZeroPages: zero-filled slots;
- ``same_pages`` = zram's same_pages: all same-filled slots, zero included;
- ``pages_stored`` = compcache's pages_stored: compressed + raw pages, plus
  non-zero same-filled pages (compcache would have compressed those to a few
  bytes, so they count as stored and as ``good_compress`` with length 0);
  zero pages are excluded, as in compcache, so ``orig_data_size =
  pages_stored * 4096`` excludes them;
- ``good_compress``: stored objects with ``clen <= 2048`` (plus the non-zero
  same-filled pages above); ``huge_pages``: raw pages;
- ``compr_data_size``: sum of compressed lengths, 4096 per raw page;
- ``mem_used_total = (xvmalloc pages + raw pages) * 4096`` — raw pages live in
  the arena too, one whole page each, outside xvmalloc;
- ``mem_used_max``: high-water mark of ``mem_used_total``;
- ``invalid_io``: requests refused for their shape (alignment, length, range);
- ``bd_reads`` / ``bd_writes``: pages forwarded to the backing swap.

Backing swap interface (the backing device itself is another module): any
object with ``offset(index)`` (byte offset of page ``index`` on ``fd``),
``read_page(index, out: memoryview)``, ``write_page(index, page:
bytes)`` and ``name`` (a string, shown as ``backing_swap``); slot *i*
maps to backing page *i* (compcache's 1:1 mapping).

Threading: one lock per store serialises requests (compcache's per-device
mutex). The arena keeper runs in its own thread (see :mod:`ublkzswap.arena`).

Speed (bench/bench_store.py, single-page requests, this host): writes run at
about 0.5x bare python-lzo compress, reads at about 0.8x bare decompress; the
rest is Python per page (xvmalloc's list and header updates are ~2 us, the
table, counters and request checks another ~3 us).

Still naive: counters are Python ints (they do not yet survive the process
like the arena could); free of a slot happens only on overwrite, discard or
write_zeroes; one lock, so one core per store.
"""

from __future__ import annotations

import errno
import functools
import threading

import numpy as np

from .target import OP_READ, OP_WRITE, BackingIO

from . import arena as _arena
from . import compress as _compress
from .xvmalloc import MAX_ARENA_PAGES, XvPool

PAGE_SIZE = 4096
PAGE_SHIFT = 12
ARENA_SLACK_PAGES = 256                       # > pages of the largest request (256 KiB = 64)
MAX_ZPAGE_SIZE_BDEV = PAGE_SIZE // 2          # 2048: above, forward to backing swap
MAX_ZPAGE_SIZE_NOBDEV = PAGE_SIZE // 4 * 3    # 3072: above, store raw
GOOD_COMPRESS = PAGE_SIZE // 2                # clen <= 2048 counts as good_compress

# slot kinds (the table's flags column)
EMPTY, SAME, RAW, COMP = 0, 1, 2, 3
KIND_NAMES = {EMPTY: "empty", SAME: "same", RAW: "raw", COMP: "compressed"}

STAT_KEYS = ("disksize", "mem_limit", "backing_swap", "num_reads", "num_writes", "failed_reads",
             "failed_writes", "invalid_io", "notify_free", "zero_pages", "same_pages", "good_compress",
             "huge_pages", "pages_stored", "orig_data_size", "compr_data_size", "mem_used_total",
             "mem_used_max", "bd_reads", "bd_writes")

_ZERO_PAGE = bytes(PAGE_SIZE)


def _err(code: int, msg: str) -> OSError:
    return OSError(code, msg)


class Store:
    """A ramzswap device's contents: ``disksize`` bytes in 4 KiB slots.

    Arguments (keyword-only after ``disksize``):
      disksize: device size in bytes, a positive multiple of 4096.
      memlimit: bytes; 0 = none. Without backing it caps ``mem_used_total``
        (zram: the write fails with ENOMEM); with backing it is compcache's
        forward threshold on ``compr_data_size``. See :meth:`set_memlimit`.
      compressor: a name from :func:`ublkzswap.compress.names` (default
        "lzo") or a :class:`ublkzswap.compress.Compressor`.
      backing: backing swap object (see module docstring) or None.
      arena: an existing :class:`ublkzswap.arena.Arena` to use (the store then
        neither starts its keeper nor closes it); else the store creates one
        of ``arena_pages`` pages (default ``disksize / 4096`` -- the most the data can ever
        need, every xvmalloc page holding at least one live object -- plus the ready pool
        and the pages a full device needs to overwrite itself: allocation comes before
        the old slot is freed).
      pool_low, pool_high: ready-pool watermarks in pages for a created arena.
      lock_memory: ``mlock2(MLOCK_ONFAULT)`` the created arena (OSError if
        refused).
      keeper: start the created arena's keeper thread (default True). Tests
        pass False and call ``store.arena.step()`` or use ``inline_refill``.
      keeper_init: callable run first inside the keeper thread (e.g.
        ``prctl(PR_SET_IO_FLUSHER, 1)``); keeper_interval: its poll period in
        seconds (it is also woken when the pool crosses a watermark).
      alloc_wait: seconds :meth:`write` may wait for the keeper when no arena
        page is ready (:meth:`write_swap` never waits).
      inline_refill: tests/benchmarks only, see :class:`ublkzswap.arena.Arena`.

    Raises ValueError for bad arguments.
    """

    def __init__(self, disksize: int, *, memlimit: int = 0, compressor="lzo", backing=None,
                 arena: _arena.Arena | None = None, arena_pages: int | None = None,
                 pool_low: int | None = None, pool_high: int | None = None,
                 lock_memory: bool = False, keeper: bool = True, inline_refill: bool = False,
                 keeper_init=None, keeper_interval: float = _arena.DEFAULT_INTERVAL,
                 alloc_wait: float = 2.0, may_grow=None):
        if not isinstance(disksize, int) or disksize <= 0 or disksize % PAGE_SIZE:
            raise ValueError(f"disksize must be a positive multiple of {PAGE_SIZE} bytes, got {disksize!r}")
        if not isinstance(memlimit, int) or memlimit < 0:
            raise ValueError(f"memlimit must be a non-negative number of bytes, got {memlimit!r}")
        self.size = disksize
        self.disksize = disksize
        self.npages = disksize >> PAGE_SHIFT
        self.memlimit = memlimit
        self.comp = _compress.get(compressor)
        self.algorithm = self.comp.name
        self.backing = backing
        self.max_zpage_size = MAX_ZPAGE_SIZE_BDEV if backing is not None else MAX_ZPAGE_SIZE_NOBDEV
        if arena is None:
            if arena_pages is None:
                # address space only (nothing is resident until the keeper brings it in):
                # every slot stored raw, plus the ready pool, plus one page per page of the
                # largest request, which is allocated before the slot's old page is freed
                high = _arena.DEFAULT_HIGH if pool_high is None else pool_high
                arena_pages = min(self.npages + high + ARENA_SLACK_PAGES, MAX_ARENA_PAGES)
            arena = _arena.Arena(arena_pages, low=pool_low, high=pool_high, lock=lock_memory,
                                 inline_refill=inline_refill, may_grow=may_grow)
            self._own_arena = True
        else:
            self._own_arena = False
        self.arena = arena
        self.xv = XvPool(arena.words, functools.partial(arena.take, _arena.XV), arena.give)
        self._xv_total = self.xv._total
        # slot table, touched now so that the I/O path never faults on it
        n = self.npages
        self.handle = np.empty(n, dtype=np.uint64)
        self.handle.fill(0)
        self.length = np.empty(n, dtype=np.uint16)
        self.length.fill(0)
        self.kind = np.empty(n, dtype=np.uint8)
        self.kind.fill(EMPTY)
        self._hv = memoryview(self.handle)
        self._lv = memoryview(self.length)
        self._kv = memoryview(self.kind)
        self._mem = arena.mem
        self._av = arena.view
        self._lock = threading.Lock()
        # counters
        self.num_reads = self.num_writes = 0
        self.failed_reads = self.failed_writes = 0
        self.invalid_io = self.notify_free = 0
        self.zero_pages = self.same_pages = 0
        self.good_compress = self.huge_pages = self.pages_stored = 0
        self.compr_data_size = 0
        self.mem_used_max = 0
        self.bd_reads = self.bd_writes = 0
        self.alloc_wait = alloc_wait
        self._wait = 0.0
        self._fwd: list = []
        #: True when the caller (the queue) runs the BackingIO that read/write return;
        #: False: backing I/O is done synchronously inside read/write.
        self.backing_async = False
        if keeper and self._own_arena:
            arena.start(interval=keeper_interval, thread_init=keeper_init)

    # ---- configuration

    def set_memlimit(self, memlimit: int) -> None:
        """Change the memory limit (bytes, 0 = none); applies to following writes."""
        if not isinstance(memlimit, int) or memlimit < 0:
            raise ValueError(f"memlimit must be a non-negative number of bytes, got {memlimit!r}")
        self.memlimit = memlimit

    def reset_mem_used_max(self) -> None:
        """zram's ``echo 0 > mem_used_max``: restart the watermark from now."""
        with self._lock:
            self.mem_used_max = self.mem_used_total

    @property
    def mem_used_total(self) -> int:
        return (self._xv_total[0] + self.huge_pages) << PAGE_SHIFT

    def stats(self) -> dict:
        """All counters, keyed by the names in docs/CONTRACTS.md (sizes in bytes)."""
        with self._lock:
            return {
                "disksize": self.disksize,
                "mem_limit": self.memlimit,
                "backing_swap": str(getattr(self.backing, "name", "")) if self.backing is not None else "",
                "num_reads": self.num_reads,
                "num_writes": self.num_writes,
                "failed_reads": self.failed_reads,
                "failed_writes": self.failed_writes,
                "invalid_io": self.invalid_io,
                "notify_free": self.notify_free,
                "zero_pages": self.zero_pages,
                "same_pages": self.same_pages,
                "good_compress": self.good_compress,
                "huge_pages": self.huge_pages,
                "pages_stored": self.pages_stored,
                "orig_data_size": self.pages_stored << PAGE_SHIFT,
                "compr_data_size": self.compr_data_size,
                "mem_used_total": self.mem_used_total,
                "mem_used_max": self.mem_used_max,
                "bd_reads": self.bd_reads,
                "bd_writes": self.bd_writes,
            }

    # ---- request validation

    def _invalid(self, msg: str) -> OSError:
        self.invalid_io += 1
        return _err(errno.EINVAL, msg)

    def _bytes_view(self, buf, writable: bool, what: str) -> memoryview:
        try:
            mv = memoryview(buf)
            if mv.ndim != 1 or mv.format != "B":
                mv = mv.cast("B")
        except (TypeError, ValueError) as e:
            raise self._invalid(f"{what}: buffer is not a contiguous byte buffer ({e})") from None
        if writable and mv.readonly:
            raise self._invalid(f"{what}: read buffer is read-only")
        return mv

    def _range(self, offset, length, what: str) -> tuple[int, int]:
        if not isinstance(offset, (int, np.integer)) or not isinstance(length, (int, np.integer)):
            raise self._invalid(f"{what}: offset and length must be integers")
        offset = int(offset)
        length = int(length)
        if offset < 0 or offset % PAGE_SIZE:
            raise self._invalid(f"{what}: offset {offset} is not a non-negative multiple of {PAGE_SIZE}")
        if length <= 0 or length % PAGE_SIZE:
            raise self._invalid(f"{what}: length {length} is not a positive multiple of {PAGE_SIZE}")
        if offset + length > self.size:
            raise self._invalid(f"{what}: bytes {offset}..{offset + length} beyond the device size {self.size}")
        return offset >> PAGE_SHIFT, length >> PAGE_SHIFT

    def _index(self, index, what: str) -> int:
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise self._invalid(f"{what}: page index must be an integer, got {type(index).__name__}")
        index = int(index)
        if not 0 <= index < self.npages:
            raise self._invalid(f"{what}: page index {index} outside 0..{self.npages - 1}")
        return index

    # ---- target contract

    def write(self, offset: int, buf) -> None:
        """Store ``len(buf)`` bytes (whole pages) at byte ``offset``.
        Raises OSError: EINVAL (bad request; nothing changes), ENOSPC (no ready
        arena page even after waiting ``alloc_wait`` seconds for the keeper),
        ENOMEM (memory limit), EIO (compressor or backing failure). Pages before
        a failing one are stored."""
        return self._write(offset, buf, self.alloc_wait)

    def write_swap(self, offset: int, buf) -> None:
        """A swap-out: as :meth:`write`, but never waits for memory. The kernel keeps a
        swap page whose write failed and retries later, so an empty pool fails the write
        with ENOSPC at once instead of stalling the queue (and with it every swap-in)."""
        return self._write(offset, buf, 0.0)

    def _write(self, offset: int, buf, wait: float) -> None:
        if type(buf) is not memoryview or buf.format != "B" or buf.ndim != 1:
            buf = self._bytes_view(buf, False, "write")
        n = len(buf)
        if type(offset) is not int or offset < 0 or (offset | n) & 4095 or not n or offset + n > self.size:
            offset = self._range(offset, n, "write")[0] << PAGE_SHIFT
        with self._lock:
            self._wait = wait
            self._fwd = []
            try:
                self._write_pages(offset >> PAGE_SHIFT, n >> PAGE_SHIFT, buf)
            finally:
                pending = self._backing_io("failed_writes")
        return pending

    def read(self, offset: int, buf) -> None:
        """Fill ``buf`` (whole pages) with the bytes at ``offset``.
        Raises OSError: EINVAL (bad request), EIO (corrupt stream or backing
        failure)."""
        if type(buf) is not memoryview or buf.readonly or buf.format != "B" or buf.ndim != 1:
            buf = self._bytes_view(buf, True, "read")
        n = len(buf)
        if type(offset) is not int or offset < 0 or (offset | n) & 4095 or not n or offset + n > self.size:
            offset = self._range(offset, n, "read")[0] << PAGE_SHIFT
        with self._lock:
            self._fwd = []
            try:
                self._read_pages(offset >> PAGE_SHIFT, n >> PAGE_SHIFT, buf)
            finally:
                pending = self._backing_io("failed_reads")
        return pending

    def discard(self, offset: int, length: int) -> None:
        """Free the pages of the range (reads return zeros, or the backing
        swap's content with one); ``notify_free`` counts every page."""
        first, n = self._range(offset, length, "discard")
        with self._lock:
            for idx in range(first, first + n):
                if self._kv[idx]:
                    self._free_slot(idx)
                self.notify_free += 1

    def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads as zeros from now on (pages freed, ``notify_free``
        per page, as zram). With a backing swap the slots are marked zero-filled
        instead of empty, so that reads are not forwarded to stale backing data."""
        first, n = self._range(offset, length, "write_zeroes")
        with self._lock:
            for idx in range(first, first + n):
                if self._kv[idx]:
                    self._free_slot(idx)
                self.notify_free += 1
                if self.backing is not None:
                    self._hv[idx] = 0
                    self._kv[idx] = SAME
                    self.same_pages += 1
                    self.zero_pages += 1

    def flush(self) -> None:
        """Nothing to make durable: RAM."""
        return None

    # ---- page API

    def write_page(self, index: int, page) -> None:
        """Store one 4096-byte page at slot ``index`` (errors as :meth:`write`)."""
        mv = self._bytes_view(page, False, "write_page")
        idx = self._index(index, "write_page")
        if len(mv) != PAGE_SIZE:
            raise self._invalid(f"write_page: page is {len(mv)} bytes, expected {PAGE_SIZE}")
        with self._lock:
            self._write_pages(idx, 1, mv)

    def read_page(self, index: int, out) -> None:
        """Fill the writable 4096-byte ``out`` with slot ``index`` (errors as :meth:`read`)."""
        mv = self._bytes_view(out, True, "read_page")
        idx = self._index(index, "read_page")
        if len(mv) != PAGE_SIZE:
            raise self._invalid(f"read_page: buffer is {len(mv)} bytes, expected {PAGE_SIZE}")
        with self._lock:
            self._read_pages(idx, 1, mv)

    def free_page(self, index: int) -> None:
        """Swap-free notify for slot ``index``: free it, ``notify_free++``."""
        idx = self._index(index, "free_page")
        with self._lock:
            if self._kv[idx]:
                self._free_slot(idx)
            self.notify_free += 1

    def slot(self, index: int) -> tuple[str, int, int]:
        """(kind name, handle, length) of slot ``index``, for tests and tools."""
        idx = self._index(index, "slot")
        return KIND_NAMES[self._kv[idx]], self._hv[idx], self._lv[idx]

    def close(self) -> None:
        """Stop and drop the arena if the store created it."""
        if self._own_arena and self.arena is not None:
            self.arena.close()
        self._mem = self._av = None

    # ---- the page operations

    def _write_pages(self, first: int, n: int, mv: memoryview) -> None:
        hv, lv, kv = self._hv, self._lv, self._kv
        cfn, cargs = self.comp.compress_call
        backing = self.backing
        max_zpage = self.max_zpage_size
        xv = self.xv
        av = self._av
        for k in range(n):
            idx = first + k
            self.num_writes += 1
            if n == 1:
                page = bytes(mv)
            else:
                o = k << PAGE_SHIFT
                page = bytes(mv[o:o + PAGE_SIZE])
            w0 = page[:8]
            if w0 == page[4088:] and page == w0 * 512:
                v = int.from_bytes(w0, "little")
                if kv[idx]:
                    self._free_slot(idx)
                hv[idx] = v
                lv[idx] = 0
                kv[idx] = SAME
                self.same_pages += 1
                if v:
                    self.pages_stored += 1
                    self.good_compress += 1
                else:
                    self.zero_pages += 1
                continue
            if backing is not None and self.memlimit and self.compr_data_size > self.memlimit - PAGE_SIZE:
                self._forward_write(idx, page, k)
                continue
            try:
                c = cfn(page, *cargs)
            except Exception as e:
                self.failed_writes += 1
                raise _err(errno.EIO, f"write: page {idx}: compression failed: {e}") from None
            clen = len(c)
            if clen > max_zpage:
                if backing is not None:
                    self._forward_write(idx, page, k)
                    continue
                # huge page: a whole arena page, stored raw
                p = self.arena.take(_arena.RAW, self._wait)
                if p < 0:
                    self.failed_writes += 1
                    raise _err(errno.ENOSPC, f"write: page {idx}: no ready arena page (retry later)")
                used = (self._xv_total[0] + self.huge_pages + 1) << PAGE_SHIFT
                if self.memlimit and used > self.memlimit:
                    self.arena.give(p)
                    self.failed_writes += 1
                    raise _err(errno.ENOMEM, f"write: page {idx}: memory limit {self.memlimit} reached")
                if used > self.mem_used_max:
                    self.mem_used_max = used
                b = p << PAGE_SHIFT
                av[b:b + PAGE_SIZE] = page
                if kv[idx]:
                    self._free_slot(idx)
                hv[idx] = p
                lv[idx] = PAGE_SIZE
                kv[idx] = RAW
                self.huge_pages += 1
                self.pages_stored += 1
                self.compr_data_size += PAGE_SIZE
                continue
            try:
                h = xv.malloc(clen)
            except MemoryError:
                self.failed_writes += 1
                if backing is not None:
                    self._forward_write(idx, page, k)
                    continue
                raise _err(errno.ENOSPC, f"write: page {idx}: no ready arena page (retry later)") from None
            used = (self._xv_total[0] + self.huge_pages) << PAGE_SHIFT
            if self.memlimit and backing is None and used > self.memlimit:
                xv.free(h)
                self.failed_writes += 1
                raise _err(errno.ENOMEM, f"write: page {idx}: memory limit {self.memlimit} reached")
            if used > self.mem_used_max:
                self.mem_used_max = used
            av[h:h + clen] = c
            if kv[idx]:
                self._free_slot(idx)
            hv[idx] = h
            lv[idx] = clen
            kv[idx] = COMP
            self.pages_stored += 1
            self.compr_data_size += clen
            if clen <= GOOD_COMPRESS:
                self.good_compress += 1

    def _forward_write(self, idx: int, page, k: int) -> None:
        """Send slot ``idx`` (page ``k`` of the request) to the backing swap: at once
        (synchronous mode), or as an op of the request's :class:`BackingIO`."""
        if self.backing_async:
            self._fwd.append((OP_WRITE, idx, k))
        else:
            try:
                self.backing.write_page(idx, page)
            except Exception as e:
                self.failed_writes += 1
                raise _err(errno.EIO, f"write: page {idx}: backing swap write failed: {e}") from None
        self.bd_writes += 1
        if self._kv[idx]:
            self._free_slot(idx)

    def _backing_io(self, failed_attr: str) -> BackingIO | None:
        """The forwarded pages of this request as a BackingIO (contiguous runs merged)."""
        fwd = self._fwd
        if not fwd:
            return None
        self._fwd = []
        fd = self.backing.fd
        where = self.backing.offset
        ops = []
        for op, idx, k in fwd:
            foff = where(idx)
            if ops and ops[-1][0] == op and ops[-1][2] + ops[-1][3] == k << PAGE_SHIFT \
                    and ops[-1][4] + ops[-1][3] == foff:
                o = ops[-1]
                ops[-1] = (o[0], o[1], o[2], o[3] + PAGE_SIZE, o[4])
            else:
                ops.append((op, fd, k << PAGE_SHIFT, PAGE_SIZE, foff))

        def done(results, ops=ops):
            bad = sum(1 for (o, r) in zip(ops, results) if r != o[3])
            if bad:
                with self._lock:
                    setattr(self, failed_attr, getattr(self, failed_attr) + bad)
                raise _err(errno.EIO, f"backing swap I/O failed ({bad} of {len(ops)} ops)")

        return BackingIO(ops, done)

    def _read_pages(self, first: int, n: int, mv: memoryview) -> None:
        hv, lv, kv = self._hv, self._lv, self._kv
        dfn, dargs = self.comp.decompress_call
        mem = self._mem
        for k in range(n):
            idx = first + k
            self.num_reads += 1
            kind = kv[idx]
            if kind == COMP:
                h = hv[idx]
                try:
                    if n == 1:
                        mv[:] = dfn(mem[h:h + lv[idx]], *dargs)
                    else:
                        o = k << PAGE_SHIFT
                        mv[o:o + PAGE_SIZE] = dfn(mem[h:h + lv[idx]], *dargs)
                except Exception as e:
                    self.failed_reads += 1
                    raise _err(errno.EIO, f"read: page {idx}: decompression failed: {e}") from None
                continue
            o = k << PAGE_SHIFT
            if kind == SAME:
                v = hv[idx]
                if v:
                    mv[o:o + PAGE_SIZE] = v.to_bytes(8, "little") * 512
                else:
                    mv[o:o + PAGE_SIZE] = _ZERO_PAGE
            elif kind == RAW:
                b = hv[idx] << PAGE_SHIFT
                mv[o:o + PAGE_SIZE] = self._av[b:b + PAGE_SIZE]
            elif self.backing is not None:
                self.num_reads -= 1
                self.bd_reads += 1
                if self.backing_async:
                    self._fwd.append((OP_READ, idx, k))
                    continue
                try:
                    self.backing.read_page(idx, mv[o:o + PAGE_SIZE])
                except Exception as e:
                    self.failed_reads += 1
                    raise _err(errno.EIO, f"read: page {idx}: backing swap read failed: {e}") from None
            else:
                mv[o:o + PAGE_SIZE] = _ZERO_PAGE

    def _free_slot(self, idx: int) -> None:
        """ramzswap_free_page: release what slot ``idx`` holds, fix the counters."""
        kind = self._kv[idx]
        if kind == COMP:
            clen = self._lv[idx]
            self.xv.free(self._hv[idx])
            self.compr_data_size -= clen
            self.pages_stored -= 1
            if clen <= GOOD_COMPRESS:
                self.good_compress -= 1
        elif kind == RAW:
            self.arena.give(self._hv[idx])
            self.huge_pages -= 1
            self.compr_data_size -= PAGE_SIZE
            self.pages_stored -= 1
        elif kind == SAME:
            self.same_pages -= 1
            if self._hv[idx]:
                self.pages_stored -= 1
                self.good_compress -= 1
            else:
                self.zero_pages -= 1
        self._kv[idx] = EMPTY
        self._hv[idx] = 0
        self._lv[idx] = 0

    # ---- invariants (tests; slow)

    def check(self) -> None:
        """Verify allocator, table and counters agree; AssertionError if not."""
        with self._lock:
            live = self.xv.check(self.arena.pages_of(_arena.XV))
            kinds = self.kind
            comp = np.flatnonzero(kinds == COMP)
            handles = {int(self.handle[i]): int(self.length[i]) for i in comp}
            assert len(handles) == len(comp), "two slots share one xvmalloc object"
            assert handles == live, (
                f"table and allocator disagree: {len(handles)} compressed slots, {len(live)} live objects")
            raw = np.flatnonzero(kinds == RAW)
            raw_pages = set(int(self.handle[i]) for i in raw)
            assert len(raw_pages) == len(raw), "two slots share one raw page"
            assert raw_pages == set(self.arena.pages_of(_arena.RAW).tolist()), "raw slots and arena RAW pages disagree"
            same = np.flatnonzero(kinds == SAME)
            zero = int(np.count_nonzero(self.handle[same] == 0))
            lens = self.length[comp].astype(np.int64)
            assert self.same_pages == len(same), f"same_pages {self.same_pages} != {len(same)}"
            assert self.zero_pages == zero, f"zero_pages {self.zero_pages} != {zero}"
            assert self.huge_pages == len(raw), f"huge_pages {self.huge_pages} != {len(raw)}"
            stored = len(comp) + len(raw) + (len(same) - zero)
            assert self.pages_stored == stored, f"pages_stored {self.pages_stored} != {stored}"
            good = int(np.count_nonzero(lens <= GOOD_COMPRESS)) + (len(same) - zero)
            assert self.good_compress == good, f"good_compress {self.good_compress} != {good}"
            compr = int(lens.sum()) + PAGE_SIZE * len(raw)
            assert self.compr_data_size == compr, f"compr_data_size {self.compr_data_size} != {compr}"
            xv_pages = len(self.arena.pages_of(_arena.XV))
            assert self.mem_used_total == (xv_pages + len(raw)) * PAGE_SIZE, "mem_used_total != pages in use"
            assert self.mem_used_max >= self.mem_used_total, "mem_used_max below mem_used_total"
            assert np.all(self.length[kinds == EMPTY] == 0), "empty slot with a length"


def warm_up(compressor="lzo") -> None:
    """Run every page path of a small throw-away store once and check the data came back, so
    that the code and data the I/O path needs are resident (and, in a locked process, locked)
    before any device goes live. Raises AssertionError or OSError on a failure."""
    n = 32
    s = Store(n * PAGE_SIZE, compressor=compressor, keeper=False, inline_refill=True,
              pool_low=4, pool_high=16)
    try:
        text = (bytes(range(32, 127)) * 44)[:PAGE_SIZE]
        pages = [bytes(PAGE_SIZE), b"\x5a" * PAGE_SIZE, text, bytes(reversed(text)),
                 (b"\x01\x02\x03\x04\x05\x06\x07\x08" * 512)]
        seed = 0x9E3779B97F4A7C15
        rnd = bytearray()
        while len(rnd) < PAGE_SIZE:
            seed = (seed * 6364136223846793005 + 1442695040888963407) & ((1 << 64) - 1)
            rnd += seed.to_bytes(8, "little")
        pages.append(bytes(rnd))
        data = b"".join(pages)
        s.write(0, memoryview(data))
        for i, p in enumerate(pages):
            s.write_swap((8 + i) * PAGE_SIZE, memoryview(p))
            s.write_page(16 + i, p)
        out = bytearray(len(data))
        s.read(0, memoryview(out))
        assert out == data, "store self-test: multi-page read back differs"
        one = bytearray(PAGE_SIZE)
        for i, p in enumerate(pages):
            s.read((8 + i) * PAGE_SIZE, memoryview(one))
            assert one == p, f"store self-test: page kind {i} read back differs"
        s.discard(8 * PAGE_SIZE, 2 * PAGE_SIZE)
        s.write_zeroes(10 * PAGE_SIZE, 2 * PAGE_SIZE)
        s.free_page(16)
        s.stats()
    finally:
        s.close()
