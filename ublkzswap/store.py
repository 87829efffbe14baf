"""The ramzswap store: where a swapped-out 4 KiB page goes, and how it comes back.

Owns: the slot table, the page write/read/free operations in compcache 0.6.2's order, the
memory limit and the ``--stats`` counters (../shared/docs/compcache-reference.md 1.3, 1.7, 1.8;
zram for same-filled pages, ``mem_used_max`` and the no-backing memory limit). A
:class:`Store` is a target (:mod:`ublkzswap.target`) and trusts its inputs: the queue checked
each request's shape (and counts ``invalid_io``).

Memory comes through two small interfaces (docs/CONTRACTS.md), as zram holds zsmalloc: a *page
pool* (:class:`ublkzswap.arena.Arena`: ``take(kind, timeout) -> page | -1``, ``give(page)``,
``mem``/``view`` of its bytes) and an *object allocator* (:class:`ublkzswap.xvmalloc.XvPool`,
or another from :data:`ALLOCATORS`: ``malloc(size, timeout) -> address`` or MemoryError,
``free(address)``, ``pages_used()``). An incompressible page takes a whole pool page.

Slot table: :mod:`ublkzswap.slots` (16 bytes a slot, as zram). A slot changes only in
:meth:`Store._set`: the new content is complete before its entry word is stored; the old
content is released after, and the counters follow (:func:`ublkzswap.slots.count`).

Write (compcache's order): same-filled -> the word, no memory; with backing and
``compr_data_size > memlimit - 4096`` -> forward; compress; ``clen > 2048`` with backing ->
forward; ``clen > 3072`` without -> raw, a whole page (``huge_pages``); else an object. No
memory ready: forward with backing, else ENOSPC. Without backing a memory limit caps
``mem_used_total`` (ENOMEM, the old content stays). A forwarded page keeps its RAM copy until
the backing write has succeeded. ``write`` may wait ``alloc_wait`` s for memory (an ordinary
write that fails is data lost); ``write_swap`` waits ``swap_wait`` s at most, for the keeper's
next batch, and not at all while the keeper is held back at the free-memory line or failing
to bring memory in (the pool's ``short``), nor after another swap-out of the same wake-up
waited in vain (the wait holds the store lock, and discards queue behind it): the kernel
keeps a page whose swap-out failed and writes it again later, but each failure wastes a
compression and the reclaim that chose the page.
Read: same-filled, raw or decompressed; an empty slot comes from the backing swap
(``bd_reads``) or reads as zeros. DISCARD and WRITE_ZEROES free pages (``notify_free``).

Threading: several queue threads (one per ublk queue) call a store at once. One lock per
store (compcache's per-device mutex) guards the table, the counters and the object
allocator; the pool's keeper runs apart (the arena has its own short lock). What takes the
time is outside it, and python-lzo and lz4 release the GIL there, so queue threads compress
on several CPUs at once:
- a write copies or views the page, rules out a same-filled page and compresses it without
  the lock, then holds it only to allocate, copy the result in, switch the slot's entry and
  free the old content (:meth:`_set`'s order);
- a read holds it only to read the slot and copy its bytes out -- compressed ones into the
  thread's scratch page (preallocated: :meth:`page_server` makes them in the queue thread
  before the queue is armed; a thread without one copies into a bytes object), a raw page
  straight into the request's buffer -- and decompresses after. Decompressing from the
  arena itself without the lock is not safe: once the lock is released an overwrite may
  free the object and another write reuse its bytes (xvmalloc reuses freed blocks at once;
  the log allocator's segments return to the pool and are taken again; compaction moves
  objects), and the keeper may give a freed page back to the kernel, so reading it would
  fault a new page in on the I/O path. The copy costs one memcpy of at most 3 KiB under
  the lock (tests/unit/test_store_threads.py fails if a read decompresses from the arena).
- counters are kept per call in locals on the fast path and added under the lock once per
  wake-up, so :meth:`stats` may lag the table by the calls under way.
Discard, write-zeroes, page 0, compaction (in batches) and the backing-swap completions
hold the lock throughout, as before.

Deduplication (swap-outs only): the kernel frees a swap slot without telling a ublk device
(only a discard of a whole free 2 MiB cluster reaches it), so the device keeps the data of
slots the kernel has freed. A page swapped in and out again goes to a new slot, identical to
its stale copy. A swap-out (``UBLK_IO_F_SWAP``) that compresses to exactly the bytes of a
stored object (or is the very raw page of one) shares it (:mod:`ublkzswap.slots`, "Shared
objects"): found by a lossy index
of half a bucket a slot (:func:`dedup_find`: a 32-bit key of the compressed bytes, the slot
that holds them, the oldest live entry kept; candidates compared byte for byte under the
lock), so only the page's key is computed per swap-out. Ordinary writes (fio, mkfs) never
share. ``dup_data_size`` counts what sharing saves. The index is process-local and starts
empty after a takeover.

Fast path: :meth:`Store.page_server` gives the queue one call per wake-up for its READs and
WRITEs of whole pages (all of swap's traffic: its swap-outs and readahead are often several
pages), doing what :meth:`read`/:meth:`write_swap`/
:meth:`write` and :meth:`_set` do per page with the counters kept in locals
(tests/unit/test_fast_path.py holds the two paths to the same results).

Still naive: one lock per store still serialises every slot and allocator update (a short
hold, but every queue takes it for every page); per-queue allocator pools (a log head per
queue, frees handed back to the owning queue) would take it off the hot path and are not
built. A write that may wait for memory (``alloc_wait``, not a swap-out) waits holding the
lock, stalling the other queues meanwhile.
"""

from __future__ import annotations

import errno
import threading
import time

import numpy as np

from . import arena as _arena
from . import compress as _compress
from . import logalloc, xvmalloc
from .memory import resident_array
from .slots import (BD_READS, BD_WRITES, COMP, COMPR_DATA_SIZE, COUNTERS, DUP_DATA_SIZE,
                    EMPTY, FAILED_READS, FAILED_WRITES, GOOD_COMPRESS, GOOD_COMPRESS_N,
                    HUGE_PAGES, LINK, MEM_USED_MAX, NOTIFY_FREE, NUM_READS, NUM_WRITES,
                    PAGES_COMPACTED, PAGES_STORED, RAW, SAME, SAME_PAGES, ZERO_PAGES, count,
                    decode, decode_all, rebuild_rings, recount, ring, share, unlink)
from .target import OP_READ, OP_WRITE, BackingIO
from .uapi import PAGE_SHIFT, PAGE_SIZE

MAX_ZPAGE_SIZE_BDEV = PAGE_SIZE // 2          # 2048: above, forward to backing swap
MAX_ZPAGE_SIZE_NOBDEV = PAGE_SIZE // 4 * 3    # 3072: above, store raw
ARENA_SLACK_PAGES = 256                       # > pages of the largest request
ALLOCATORS = {"log": logalloc.LogPool, "xvmalloc": xvmalloc.XvPool}   # default first
COMPACT_BATCH = 64            # objects moved per hold of the store lock
COMPACT_SCAN = 8192           # slots of the table scanned at a time
COMPACT_PASS = 256 << 10      # live bytes a background pass takes victims for (about)
COMPACT_PASS_BATCHES = 16     # ...and the batches it may move them in
COMPACT_PRESSURE_PASS = 1 << 20   # ...while the machine swaps out or is short of memory
DISCARD_SLICE = 512           # slots a discard clears at a time (a swap cluster: 2 MiB)
COMPACT_PLAN = 4              # a background pass's scan finds victims for this many passes
COMPACT_PLAN_AGE = 2.0        # seconds its later passes follow that scan before a new one
COMPACT_WAIT = 1.0            # seconds on-demand compaction waits for the keeper's next units
SWAP_WAIT = 0.02              # seconds a swap-out may wait for the keeper (see "Write")
BACKGROUND_WASTE = 0.08       # background compaction starts above this share of unused memory
PRESSURE_WASTE = 0.03         # ...while the machine swaps out
PRESSURE_WASTE_UNITS = 2      # ...and short of memory, above this many units unused

DEDUP_SAMPLE = 37             # every 37th byte of a compressed page goes into its dedup key

_ZERO_PAGE = bytes(PAGE_SIZE)


def dedup_buckets(npages: int) -> int:
    """Buckets of a device's dedup index: a power of two, half a bucket (2 bytes) a slot."""
    return 1 << max(10, (max(npages, 2) - 1).bit_length() - 1)


def dedup_key(z) -> int:
    """The 32-bit dedup key (bucket and tag) of a page as stored (compressed, or raw): a hash
    of a sample of its bytes and its length; equal pages have equal keys, the rest is
    checked byte for byte."""
    return (hash(bytes(z[::DEDUP_SAMPLE])) ^ len(z)) & LINK


def dedup_find(t, dd, mask: int, mem, idx: int, z: bytes, key: int) -> int:
    """The slot (index + 1) whose object holds exactly ``z``, by the dedup index ``dd``, or 0.
    On a miss slot ``idx`` (about to hold ``z``) takes the bucket, unless it holds a slot that
    still has what was indexed there (the oldest entry stays: a stale copy is old). Under the
    store lock."""
    b = key & mask
    c1 = dd[b]
    if c1 and c1 != idx + 1:
        ce = t[2 * c1 - 2]
        tag = t[2 * c1 - 1] >> 32
        if ce & 3 > SAME and tag & mask == b:
            if tag == key and (ce >> 2) & 0x1FFF == len(z):
                a = ce >> 16
                if mem[a:a + len(z)].tobytes() == bytes(z):
                    return c1
            return 0
    dd[b] = idx + 1
    return 0


class _CompactionPlan:
    """A compaction round's victims and their owners' slots, in the order they are moved;
    ``next``: the first owner not yet gone through (background passes go on from there)."""

    __slots__ = ("unit", "victims", "owners", "next", "made")

    def __init__(self, unit: int, victims: set, owners: list):
        self.unit, self.victims, self.owners = unit, victims, owners
        self.next = 0
        self.made = time.monotonic()

    def current(self) -> bool:
        """Owners left, and younger than COMPACT_PLAN_AGE s."""
        return self.next < len(self.owners) and time.monotonic() - self.made <= COMPACT_PLAN_AGE


def arena_pages(disksize: int, allocator: str = "log", high: int | None = None) -> int:
    """Pages of address space a store's arena reserves: every slot raw, the ready pool, the pages
    of the largest request (an overwrite allocates before it frees); twice that for an
    allocator that leaves holes until it compacts."""
    pages = disksize // PAGE_SIZE + (high or _arena.DEFAULT_HIGH) + ARENA_SLACK_PAGES
    if ALLOCATORS[allocator] is xvmalloc.XvPool:
        return min(pages, xvmalloc.MAX_ARENA_PAGES)
    unit = logalloc.SEGMENT_PAGES
    return -(-2 * pages // unit) * unit


class Store:
    """A ramzswap device's contents: ``disksize`` bytes in 4 KiB slots.

    disksize: bytes, a positive multiple of 4096. memlimit: bytes, 0 = none (see the module
    docstring; changeable with :meth:`set_memlimit`). compressor: a name from
    :func:`ublkzswap.compress.names` or a Compressor. backing: a backing swap
    (:class:`ublkzswap.backing.Backing`: ``fd``, ``offset(index)``, ``name``) or None.
    pool: a page pool to use (not closed by the store); by default the store makes an
    :class:`~ublkzswap.arena.Arena` sized for the device (every slot raw, plus the ready pool and
    ``ARENA_SLACK_PAGES``: an overwrite allocates before it frees), passing it ``pool_options``
    (low, high, lock, inline_refill, may_grow) and starting its keeper unless ``keeper=False``
    (``keeper_init``, ``keeper_interval`` go to :meth:`Arena.start`; ``keeper_idle`` runs in
    the keeper after each pass, after background compaction). allocator: an object
    allocator or a name from :data:`ALLOCATORS`. ``adopt=True`` (with ``state``) takes over
    what a dead process left and starts nothing that needs new memory until :meth:`resume`.
    alloc_wait: seconds :meth:`write` may wait for memory; swap_wait: the same for
    :meth:`write_swap`, unless the pool is ``short``. Raises ValueError for bad arguments.
    """

    def __init__(self, disksize: int, *, memlimit: int = 0, compressor="lzo", backing=None,
                 pool=None, allocator="log", alloc_wait: float = 2.0,
                 swap_wait: float = SWAP_WAIT, keeper: bool = True,
                 keeper_init=None, keeper_idle=None,
                 keeper_interval: float = _arena.DEFAULT_INTERVAL,
                 state=None, adopt: bool = False, dedup: bool = True, pressure=None,
                 **pool_options):
        if type(disksize) is not int or disksize <= 0 or disksize % PAGE_SIZE:
            raise ValueError(f"disksize must be a positive multiple of {PAGE_SIZE} bytes, got {disksize!r}")
        self.size = self.disksize = disksize
        self.npages = disksize >> PAGE_SHIFT
        self.set_memlimit(memlimit)
        self.comp = _compress.get(compressor)
        self.algorithm = self.comp.name
        self.backing = backing
        self.max_zpage_size = MAX_ZPAGE_SIZE_BDEV if backing is not None else MAX_ZPAGE_SIZE_NOBDEV
        self.alloc_wait = alloc_wait
        self.swap_wait = swap_wait
        self._own_pool = pool is None
        if pool is None:
            cls = ALLOCATORS[allocator]
            pages = arena_pages(disksize, allocator, pool_options.get("high"))
            if state is not None:
                pool_options.update(segment=state.arena, prefill=not adopt)
            pool = _arena.Arena(pages, unit=cls.UNIT_PAGES, **pool_options)
        self.pool = pool
        self.allocator = ALLOCATORS[allocator](pool) if isinstance(allocator, str) else allocator
        if state is None:
            # the slot table in a mapping of its own, resident now (the I/O path never faults on it)
            self._tab = resident_array(2 * self.npages, np.uint64, "ublkzswap slot table")
            self._counters = np.zeros(len(COUNTERS), dtype=np.int64)
            self._header = _ZERO_PAGE          # page 0 as preformat() left it
        else:                                  # in memory that outlives us (shmstate)
            self._tab, self._counters = state.table, state.counters[:len(COUNTERS)]
            self._header = memoryview(state.page0)
        self._state = state
        self._t = memoryview(self._tab)
        self._c = memoryview(self._counters)
        self._lock = threading.Lock()
        self._slotfree = None        # freed-slot notices (watch_freed_slots), if any
        self._compact_owed = 0       # pages compaction took and has not given back yet
        self._plan = None            # background compaction's victims and owners: _compact_round
        self._pressure = pressure    # () -> whether the machine swapped since the last call
        self._local = threading.local()        # per thread: its scratch page
        self._deferred = 0                     # the pool's growth_deferred, as last seen
        # the dedup index (swap-outs only, see "Deduplication"): process-local, empty after a
        # takeover; resident now, as the table (the I/O path writes it)
        self._dd = self._ddmask = None
        self._dedup = dedup and self.npages < LINK
        self._keeper = (keeper and self._own_pool, keeper_interval, keeper_init, keeper_idle)
        if adopt:
            self._adopt()                # the rest once the device is served: resume()
        else:
            self.resume()

    def resume(self) -> None:
        """Start what needs new memory: the dedup index and the arena keeper's thread. A new
        store does this as it is made; one made with ``adopt=True`` leaves it to its caller,
        to be called once the device is served again -- until then the kernel holds the
        device's I/O, and a page found for us might have to be swapped out to it first.
        Idempotent."""
        if self._dedup and self._dd is None:
            n = dedup_buckets(self.npages)
            dd = memoryview(resident_array(n, np.uint32, "ublkzswap dedup index"))
            self._ddmask = n - 1         # the mask first: a reader that sees the index has it
            self._dd = dd
        run, interval, init, user_idle = self._keeper
        if run and not self.pool.running:
            def idle():
                self.catch_up()          # freed slots come back with no I/O to wake a queue
                self.compact_if_wasteful()
                if user_idle is not None:
                    user_idle()
            self.pool.start(interval=interval, thread_init=init, idle=idle)

    # ---- configuration and numbers

    def set_memlimit(self, memlimit: int) -> None:
        """Change the memory limit (bytes, 0 = none); applies to following writes."""
        if type(memlimit) is not int or memlimit < 0:
            raise ValueError(f"memlimit must be a non-negative number of bytes, got {memlimit!r}")
        self.memlimit = memlimit
        if getattr(self, "_state", None) is not None:
            self._state.set_memlimit(memlimit)

    @property
    def mem_used_total(self) -> int:
        return self.allocator.pages_used() << PAGE_SHIFT

    def stats(self) -> dict:
        """Every counter, keyed by the names in docs/CONTRACTS.md (sizes in bytes)."""
        with self._lock:
            st = dict(zip(COUNTERS, self._counters.tolist()))
            st["mem_used_total"] = self.mem_used_total
        st.update(pool_misses=getattr(self.pool, "misses", 0),
                  growth_deferred=getattr(self.pool, "growth_deferred", 0),
                  disksize=self.disksize, mem_limit=self.memlimit,
                  backing_swap=str(self.backing.name) if self.backing is not None else "",
                  orig_data_size=st["pages_stored"] << PAGE_SHIFT)
        return st

    def slot(self, index: int) -> tuple[str, int, int, int]:
        """(kind name, address, length, fill word) of slot ``index``, for tests and tools."""
        return decode(self._t[2 * index], self._t[2 * index + 1])

    def table(self) -> dict[str, np.ndarray]:
        """The whole slot table decoded (copies): kind, address, length, value per slot."""
        with self._lock:
            return decode_all(self._tab.copy())

    # ---- the target contract

    def write(self, offset: int, buf: memoryview):
        """Store whole pages at byte ``offset``; may wait ``alloc_wait`` s for memory. Returns
        None, or a BackingIO for pages forwarded to the backing swap. Raises OSError: ENOSPC
        (no memory ready), ENOMEM (memory limit), EIO (compression failed)."""
        return self._write(offset, buf, self.alloc_wait, False)

    def write_swap(self, offset: int, buf: memoryview):
        """:meth:`write` for a swap-out: waits :attr:`swap_timeout` s at most for memory."""
        return self._write(offset, buf, self.swap_timeout, True)

    @property
    def swap_timeout(self) -> float:
        """How long a swap-out may wait for memory now: ``swap_wait``, or 0 (ENOSPC at once)
        while the pool is ``short`` (its keeper held back at the free-memory line, or unable
        to bring memory in)."""
        return 0.0 if getattr(self.pool, "short", False) else self.swap_wait

    def read(self, offset: int, buf: memoryview):
        """Fill ``buf`` (whole pages) from ``offset``. Returns None or a BackingIO; raises
        OSError(EIO) for a corrupt stream."""
        fwd = []
        self._read_pages(offset >> PAGE_SHIFT, len(buf) >> PAGE_SHIFT, buf, fwd)
        return self._backing_io(fwd) if fwd else None

    def _thread_scratch(self) -> np.ndarray:
        """The calling thread's scratch page, made now if it has none (page_server makes a
        queue thread's before the queue serves): a read copies a slot's compressed bytes
        there under the lock and decompresses them after, without it."""
        sc = getattr(self._local, "scratch", None)
        if sc is None:
            sc = self._local.scratch = np.zeros(PAGE_SIZE, dtype=np.uint8)
        return sc

    def page_server(self, bufs: list, boundary):
        """The queue's fast path (:mod:`ublkzswap.queue`) for this store, or None if it has a
        backing swap (forwarding needs the general path). ``bufs``: the queue's tag buffers
        (writable memoryviews, one per tag, at least a page each); ``boundary``: the queue's
        exception -> -errno boundary. Called once per queue, in the queue's own thread, before
        the queue is armed: what reads need later is made here (a scratch page for ``serve``,
        and another for the general path in the calling thread), none on the I/O path.

        Returns ``serve(reqs, done)``: ``reqs`` lists the READs and WRITEs of whole pages of
        one wake-up as ``(tag, op_flags, first page, pages)``, well-formed, in range and
        within the tag's buffer (the queue checked); each is done as :meth:`read`,
        :meth:`write_swap` (``UBLK_IO_F_SWAP``) or :meth:`write` would do it, page by page,
        and ``(tag, result)`` is appended to ``done``: the request's bytes or ``-errno`` (a
        request fails as a whole at its first failing page: the pages before it are done, a
        write's pages after it counted as written and failed, as the general path counts
        them). Fused: no wrapper per request, a page compressed straight from the tag's
        buffer (a numpy view, no copy), a same-filled page ruled out by two words before
        the page is compared, the counters kept in locals and added once per call.
        Compression and decompression run outside the store lock (see the module docstring,
        "Threading"): a write compresses first and locks only to place and publish; a read
        locks only to copy the slot's bytes out."""
        self._thread_scratch()
        if self.backing is not None:
            return None
        scratch = np.zeros(PAGE_SIZE, dtype=np.uint8)   # serve's own: one queue thread uses it
        from .uapi import UBLK_IO_F_SWAP
        bufs = list(bufs)
        pages = [b[:PAGE_SIZE] for b in bufs]           # a request's first page: no slicing
        words = [b.cast("Q") for b in bufs]
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in bufs]
        firsts = [a[:PAGE_SIZE] for a in arrays]
        sv = memoryview(scratch)
        lock, t, c = self._lock, self._t, self._c
        comp, alloc = self.comp, self.allocator
        view = self.pool.view
        header = self._header_view
        SWAP, ENOSPC, ENOMEM, EIO = UBLK_IO_F_SWAP, -errno.ENOSPC, -errno.ENOMEM, -errno.EIO

        cfn, cargs = comp.compress_call
        dfn, dargs = comp.decompress_call
        malloc, free, pages_used = alloc.malloc, alloc.free, alloc.pages_used
        max_zpage, wait = self.max_zpage_size, self.alloc_wait
        mem = self.pool.mem

        def serve(reqs, done):
            memlimit = self.memlimit
            dd, ddmask = self._dd, self._ddmask       # (the index may come after serving)
            swait = self.swap_timeout     # 0 after a swap-out of this wake-up waited in vain
            reads = writes = failed_r = failed_w = 0
            # what slots.count would add up, kept here and added once
            same = zero = stored = good = huge = size = dup = 0
            maxu = 0
            try:
                for tag, opf, first, n in reqs:
                    res = n << PAGE_SHIFT
                    try:
                        if not opf & 0xFF:                               # READ
                            for k in range(n):
                                i = (first + k) << 1
                                page = bufs[tag][k << PAGE_SHIFT:(k + 1) << PAGE_SHIFT] if k \
                                    else pages[tag]
                                reads += 1
                                with lock:   # copy the bytes out: once the lock is released
                                    e = t[i]  # the object may be freed, reused or moved
                                    kind = e & 3
                                    if kind == COMP:
                                        ln = (e >> 2) & 0x1FFF
                                        h = e >> 16
                                        sv[:ln] = view[h:h + ln]
                                    elif kind == SAME:
                                        v = t[i + 1]
                                    elif kind == RAW:
                                        b = e >> 16
                                        page[:] = view[b:b + PAGE_SIZE] if e & 0x7FFC else header()
                                if kind == COMP:
                                    try:
                                        page[:] = dfn(scratch[:ln], *dargs)   # no lock held
                                    except Exception:
                                        failed_r += 1
                                        res = EIO
                                        break
                                elif kind == SAME:
                                    page[:] = v.to_bytes(8, "little") * 512 if v else _ZERO_PAGE
                                elif kind != RAW:
                                    page[:] = _ZERO_PAGE
                            done.append((tag, res))
                            continue
                        w = words[tag]                                   # WRITE
                        for k in range(n):
                            writes += 1
                            i = (first + k) << 1
                            if k:
                                o = k << PAGE_SHIFT
                                page = bufs[tag][o:o + PAGE_SIZE]
                                src = arrays[tag][o:o + PAGE_SIZE]
                            else:
                                page, src = pages[tag], firsts[tag]
                            value = w[k << 9]
                            if value == w[(k << 9) + 511] and page.tobytes() == (
                                    value.to_bytes(8, "little") * 512 if value else _ZERO_PAGE):
                                kind, clen = SAME, 0
                            else:
                                try:
                                    z = cfn(src, *cargs)                 # no lock held
                                except Exception:
                                    res = EIO
                                    break
                                clen, kind = len(z), COMP
                                if clen > max_zpage:
                                    kind, clen, z = RAW, PAGE_SIZE, page
                            # a swap-out's dedup key (dedup_key, inline), outside the lock
                            key = ((hash(bytes(z[::DEDUP_SAMPLE])) ^ clen) & LINK
                                   if kind != SAME and opf & SWAP and dd is not None else 0)
                            idx = first + k
                            with lock:                # place, publish, free the old content
                                twin = 0
                                if key:
                                    b = dd[key & ddmask]
                                    if b and b != idx + 1:   # an entry: the full check
                                        twin = dedup_find(t, dd, ddmask, mem, idx, z, key)
                                    else:
                                        dd[key & ddmask] = idx + 1
                                if twin:
                                    addr = t[2 * twin - 2] >> 16   # its object: nothing taken
                                elif kind != SAME:
                                    try:
                                        addr = malloc(clen, swait if opf & SWAP else wait)
                                    except MemoryError:
                                        if opf & SWAP:   # the rest fail at once rather than
                                            swait = 0.0  # each after a wait, lock held
                                        res = ENOSPC
                                        break
                                    used = pages_used() << PAGE_SHIFT
                                    if memlimit and used > memlimit:
                                        free(addr, clen)
                                        res = ENOMEM
                                        break
                                    if used > maxu:
                                        maxu = used
                                    view[addr:addr + clen] = z
                                # the switch, as _set makes it: entry word last, old content after
                                old = t[i]
                                okind = old & 3
                                oval = t[i + 1] if okind == SAME else 0
                                olen = (old >> 2) & 0x1FFF
                                # a shared old object leaves its ring first (the second word is
                                # the new content's) and is not freed
                                kept = okind > SAME and olen and t[i + 1] & LINK and unlink(t, idx)
                                if kind == SAME:
                                    t[i + 1] = value
                                    t[i] = SAME
                                else:
                                    if twin:
                                        share(t, idx, twin - 1, key)
                                        dup += clen
                                    else:
                                        t[i + 1] = key << 32
                                    t[i] = (addr << 16) | (clen << 2) | kind
                                if kept:
                                    dup -= olen
                                elif okind > SAME and olen:              # (0: the header)
                                    free(old >> 16, olen)
                            if okind == SAME:
                                same -= 1
                                if oval:
                                    stored -= 1
                                    good -= 1
                                else:
                                    zero -= 1
                            elif okind and olen:
                                stored -= 1
                                size -= olen
                                if okind == RAW:
                                    huge -= 1
                                elif olen <= GOOD_COMPRESS:
                                    good -= 1
                            if kind == SAME:
                                same += 1
                                if value:
                                    stored += 1
                                    good += 1
                                else:
                                    zero += 1
                            else:
                                stored += 1
                                size += clen
                                if kind == RAW:
                                    huge += 1
                                elif clen <= GOOD_COMPRESS:
                                    good += 1
                        if res < 0:
                            # this page failed, and the ones after it are counted as written
                            # and failed (the kernel writes the whole request again)
                            rest = n - k - 1
                            writes += rest
                            failed_w += rest + 1
                        done.append((tag, res))
                    except Exception as ex:
                        done.append((tag, boundary(ex)))
            finally:
                if reads or writes:
                    with lock:
                        if reads:
                            c[NUM_READS] += reads
                            if failed_r:
                                c[FAILED_READS] += failed_r
                        if writes:
                            c[NUM_WRITES] += writes
                            if failed_w:
                                c[FAILED_WRITES] += failed_w
                            if same or zero:
                                c[SAME_PAGES] += same
                                c[ZERO_PAGES] += zero
                            if stored:
                                c[PAGES_STORED] += stored
                            if good:
                                c[GOOD_COMPRESS_N] += good
                            if huge:
                                c[HUGE_PAGES] += huge
                            if size:
                                c[COMPR_DATA_SIZE] += size
                            if dup:
                                c[DUP_DATA_SIZE] += dup
                            if maxu > c[MEM_USED_MAX]:
                                c[MEM_USED_MAX] = maxu

        return serve

    def _header_view(self):
        return self._header

    def discard(self, offset: int, length: int) -> None:
        """Free the pages of the range; ``notify_free`` counts every page. Done a slice of
        :data:`DISCARD_SLICE` slots at a time with numpy (:meth:`_clear`): the kernel discards
        swap a whole 2 MiB cluster at a time, and memory comes back to a machine short of it
        only as fast as those discards are served."""
        first, n = offset >> PAGE_SHIFT, length >> PAGE_SHIFT
        with self._lock:
            for lo in range(first, first + n, DISCARD_SLICE):
                self._clear(lo, min(lo + DISCARD_SLICE, first + n))
            self._c[NOTIFY_FREE] += n

    def watch_freed_slots(self, bdev: str) -> str:
        """Hear of the kernel's freed swap slots on ``bdev`` one by one from now on
        (:mod:`ublkzswap.slotfree`), as zram does, instead of only when a whole cluster is
        discarded. Returns "" or why the kernel offers no such signal (nothing changes then)."""
        from . import slotfree
        sf, why = slotfree.open_for(bdev)
        if sf is not None:
            old, self._slotfree = self._slotfree, sf
            if old is not None:
                old.close()
        return why

    def catch_up(self) -> None:
        """Drop the slots the kernel has freed since the last call. A queue calls it once a
        wake-up's completions are reaped, before serving them, so that a free is applied
        before any later write to its slot (:mod:`ublkzswap.slotfree`, "Ordering"); the
        keeper calls it every pass."""
        sf = self._slotfree
        if sf is not None:
            sf.drain(self._free_slots)

    def _free_slots(self, idxs: list) -> None:
        """Slots the kernel freed: emptied (``notify_free`` counts each, as zram's
        swap_slot_free_notify); slot 0, the swap header, is never a slot the kernel frees."""
        npages, t = self.npages, self._t
        with self._lock:
            for idx in idxs:
                if 0 < idx < npages and t[2 * idx] & 3:
                    self._set(idx, EMPTY)
            self._c[NOTIFY_FREE] += len(idxs)

    def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads as zeros from now on (freed, ``notify_free`` per page, as zram); with
        a backing swap the slots become zero-filled rather than empty, so reads do not go to
        stale backing data."""
        first = offset >> PAGE_SHIFT
        with self._lock:
            for idx in range(first, first + (length >> PAGE_SHIFT)):
                if self.backing is not None:
                    self._set(idx, SAME)
                elif self._t[2 * idx] & 3:
                    self._set(idx, EMPTY)
                self._c[NOTIFY_FREE] += 1

    def flush(self) -> None:
        """Nothing to make durable: RAM."""

    def preformat(self, page) -> None:
        """Page 0 as compcache's setup_swap_header leaves it (reference 1.6): kept raw and
        counted nowhere (num_writes, pages_stored, compr_data_size, mem_used_total) until it is
        overwritten or discarded."""
        with self._lock:
            if self._t[0] & 3:
                self._set(0, EMPTY)
            if isinstance(self._header, memoryview):
                self._header[:] = page           # shared: it outlives us like the rest
            else:
                self._header = bytes(page)
            self._t[0] = RAW                    # raw, length 0: the header, kept apart

    # ---- compaction (zram's compact)

    def compact(self, max_fill: float = 0.95, batches: int | None = None, reserve: int = 0,
                wait: bool = True, budget: int | None = None) -> int:
        """Move objects out of the emptiest units of memory (those at most ``max_fill`` full)
        into fresh ones, so that the emptied units go back to the pool: zram's ``compact``.
        In batches of COMPACT_BATCH objects per hold of the lock (at most ``batches``); it
        never waits for memory while holding the lock, and does not take the pool's ready
        units below ``reserve`` (they are for writes; -1: it may take the last of them, and
        with none ready it still moves into the allocator's heads). A round's moves take
        units before its victims give any back, often more than the ready pool holds: with
        ``wait`` (on demand) it then waits, the lock released, up to COMPACT_WAIT s for the
        keeper's next units and goes on. With ``wait`` false (the keeper itself) it stops
        instead, and stops rather than wait for the lock: the keeper must never wait on a
        writer that waits for the keeper. Returns the pages given back, net of what the moves
        took (also counted in ``pages_compacted``). An allocator that cannot move (xvmalloc) compacts nothing.
        Without a ``batches`` bound it goes round after round (each over the allocator's
        sparsest units then) until a round gives nothing back."""
        total = 0
        while True:
            got = self._compact_round(max_fill, batches, reserve, wait, budget)
            total += got
            if got == 0 or batches is not None:
                return total

    def _compact_round(self, max_fill: float, batches: int | None, reserve: int,
                       wait: bool, budget: int | None) -> int:
        victims = getattr(self.allocator, "victims", None)
        if victims is None or self.pool is None:
            return 0
        # A background pass with a budget follows a plan: the table scan that finds the
        # owners (most of a pass's cost when victims are sparse) is made for COMPACT_PLAN
        # passes' victims, and each pass moves about ``budget`` bytes of them, the next one
        # going on where it stopped -- also after a pass cut short, whose scan is not lost.
        # A plan grows stale (its entries are re-checked under the lock, as any scan's are:
        # what was freed or rewritten since is passed over): it is made again after
        # COMPACT_PLAN_AGE s, or when used up.
        planned = not wait and budget is not None
        plan = self._plan if planned else None
        if plan is None or not plan.current():
            self._plan = plan = None
            unit, segs = victims(max_fill, budget=budget * COMPACT_PLAN if planned else budget)
            if not segs:
                return 0
            owners = self._owners(unit, segs)
            # victim by victim, emptiest first (the allocator's order), each one's objects
            # by address: each victim gives its unit back as soon as its last object moved,
            # so a round needs about one fresh unit at a time, and one cut short (no ready
            # unit, the lock busy, the keeper's refill due, its part of a plan done) has
            # still emptied what it finished -- the victims worth the most first
            # (entries are read without the lock: one rewritten since the scan may point
            # anywhere, and sorts last; the move re-checks it)
            rank = np.full(max(segs) + 2, len(segs), dtype=np.uint16)
            rank[segs] = np.arange(len(segs), dtype=np.uint16)
            addr = self._tab[2 * owners].astype(np.int64) >> 16
            seg = np.minimum(addr // unit, len(rank) - 1)
            owners = owners[np.argsort(rank[seg].astype(np.int64) << 40 | addr,
                                       kind="stable")].tolist()
            plan = _CompactionPlan(unit, set(segs), owners)
            if planned:
                self._plan = plan
        unit, victim, owners, first = plan.unit, plan.victims, plan.owners, plan.next
        t, view, alloc = self._t, self.pool.view, self.allocator
        # pages given back net of what the moves took: a batch may take a unit (a new head)
        # that only a later batch's victims pay back, and a round may end before they do.
        # Such a unit is owed, paid before anything more counts as given back.
        batch, moved = 0, 0
        freed, credited = -self._compact_owed, 0
        while first < len(owners):
            if batches is not None and batch >= batches:
                break
            if planned and moved >= budget:
                break
            if self.pool.ready <= reserve and not (wait and self._pool_refilled(reserve)):
                break
            if not wait and self._refill_due():
                break
            if not self._lock.acquire(blocking=wait):
                break
            batch += 1
            short = False
            try:
                before = alloc.pages_used()
                for idx in owners[first:first + COMPACT_BATCH]:
                    old = t[2 * idx]
                    a, ln = old >> 16, (old >> 2) & 0x1FFF
                    if old & 3 < RAW or not ln or a // unit not in victim:
                        first += 1
                        continue                     # rewritten or freed meanwhile
                    try:
                        new = alloc.malloc(ln, 0.0)
                    except MemoryError:
                        short = True                 # nothing ready: never wait here
                        break
                    view[new:new + ln] = view[a:a + ln]
                    entry = (new << 16) | (old & 0xFFFF)
                    if t[2 * idx + 1] & LINK:
                        for m in ring(t, idx):          # a shared object: every holder
                            t[2 * m] = entry
                    else:
                        t[2 * idx] = entry              # the commit
                    alloc.free(a, ln)
                    moved += ln
                    first += 1
                used = alloc.pages_used()
                if used << PAGE_SHIFT > self._c[MEM_USED_MAX]:   # moves take before they free
                    self._c[MEM_USED_MAX] = used << PAGE_SHIFT
                freed += before - used
                if freed > credited:
                    self._c[PAGES_COMPACTED] += freed - credited
                    credited = freed
            finally:
                self._lock.release()
            # out of ready units mid-batch: on demand, wait (the lock released) for the
            # keeper to bring more and go on; a round's moves take units before its
            # victims free any, more than the ready pool holds
            if short and not (wait and self._pool_refilled(reserve)):
                break
        plan.next = first
        return self._compacted(freed, credited)

    def _owners(self, unit: int, segs: list) -> np.ndarray:
        """The slots whose objects lie in the units ``segs`` (``unit`` bytes each), in table
        order: one pass over the table a slice at a time, without the lock (each move
        re-checks its entry under it), numpy's temporaries small enough for the heap's
        headroom, which the I/O path relies on never having to grow. A unit number is
        looked up in a mask (a gather), not searched for: the pass is most of a round's cost
        when the victims are sparse."""
        mask = np.zeros(max(segs) + 2, dtype=bool)          # the last entry: out of range
        mask[segs] = True
        top = np.uint64(len(mask) - 1)
        shift = np.uint64(16 + unit.bit_length() - 1) if unit & (unit - 1) == 0 else None
        found = []
        for lo in range(0, self.npages, COMPACT_SCAN):
            e = self._tab[2 * lo:2 * min(lo + COMPACT_SCAN, self.npages):2]
            seg = e >> shift if shift is not None else (e >> np.uint64(16)) // np.uint64(unit)
            np.minimum(seg, top, out=seg)
            cand = np.flatnonzero(mask[seg])
            if len(cand):
                c = e[cand]               # the unit's objects, not a word a same page holds
                found.append(cand[((c & np.uint64(3)) >= RAW) & ((c & np.uint64(0x7FFC)) != 0)] + lo)
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def _compacted(self, freed: int, credited: int) -> int:
        """End a round that came to ``freed`` pages net, ``credited`` of them counted as
        compacted (its highest point): what it took after that is owed."""
        self._compact_owed = credited - freed
        return credited

    def _refill_due(self) -> bool:
        """The keeper's refill comes before its background compaction: the pool is under its
        low watermark and not short of memory (short, the moves' victims are the only units
        coming back, and compaction goes on)."""
        return self.pool.ready < self.pool.low and not getattr(self.pool, "short", False)

    def _pool_refilled(self, reserve: int) -> bool:
        """Wait up to COMPACT_WAIT s, holding no lock, for more than ``reserve`` ready units."""
        wait_ready = getattr(self.pool, "wait_ready", None)
        return wait_ready is not None and wait_ready(reserve + 1, COMPACT_WAIT)

    def compact_if_wasteful(self) -> int:
        """Background compaction, for the pool's keeper between its passes: only when more than
        BACKGROUND_WASTE of the memory held is unused (so that it keeps ``mem_used_total`` within
        about 1.09 x the live bytes), the sparsest units first, up to 95% full (single-slot
        frees and overwrites scatter their holes: segments evenly 80% full are a quarter more
        memory than their data, and would never be taken at a lower bound), victims for about
        COMPACT_PASS live bytes a pass (the keeper must get back to refilling), and never
        eating into the ready units writes need. A pass follows the plan of an earlier one
        (its table scan, made for COMPACT_PLAN passes: see :meth:`_compact_round`).

        While the machine swaps out (``pressure``), memory held unused is memory reclaim is
        looking for: it works down to PRESSURE_WASTE, takes victims for COMPACT_PRESSURE_PASS
        live bytes (holes come as fast as swap-ins free slots; the table scan that finds the
        owners costs the same for any number of victims), and may use the ready units down to
        one (the victims give them back within the pass). Whatever the line, a refill due
        (the pool under its low watermark and not short of memory) comes first: the pass does
        not start, or stops between batches, and the keeper's next pass goes on. Short of
        memory (the pool was refused growth since the last pass: ``growth_deferred``) every
        unit it can win back counts, as zsmalloc's shrinker compacts under pressure: then it
        starts above PRESSURE_WASTE_UNITS units unused and may use the last ready units (and
        the heads' room) to move into."""
        live = getattr(self.allocator, "live_bytes", None)
        if live is None or self.pool is None:
            return 0
        deferred = getattr(self.pool, "growth_deferred", 0)
        short, self._deferred = deferred != self._deferred, deferred
        held = self.allocator.pages_used() << PAGE_SHIFT
        waste = held - live()
        if short:
            if waste < PRESSURE_WASTE_UNITS * self.pool.unit_bytes:
                return 0
            return self.compact(max_fill=0.95, batches=COMPACT_PASS_BATCHES, reserve=-1,
                                wait=False, budget=COMPACT_PRESSURE_PASS)
        # the pressure signal reads /proc, and the keeper passes 50 times a second on an idle
        # device: it is asked only when the waste is above the lower line
        if waste <= PRESSURE_WASTE * held + (4 << 16) or self._refill_due():
            return 0
        if self.pool.ready > 1 and self._pressure is not None and self._pressure():
            reserve, budget = 1, COMPACT_PRESSURE_PASS
        elif self.pool.ready > self.pool.low and waste > BACKGROUND_WASTE * held + (4 << 16):
            reserve, budget = self.pool.low, COMPACT_PASS
        else:
            return 0
        return self.compact(max_fill=0.95, batches=COMPACT_PASS_BATCHES, reserve=reserve,
                            wait=False, budget=budget)

    def _adopt(self) -> None:
        """Take over a table a previous process left (crash, kill -9, restart): rebuild the
        allocator's and the pool's bookkeeping from it and recount the counters that follow
        content. A write interrupted before its entry was stored left only an unreferenced
        object: not counted here, its room is reused or compacted away."""
        adopt = getattr(self.allocator, "adopt", None)
        if adopt is None:
            raise OSError(errno.EOPNOTSUPP, "this allocator's state cannot be taken over")
        unit = np.uint64(self.pool.unit_bytes)
        live = np.zeros(self.pool.nunits, dtype=np.int64)
        ends = np.zeros(self.pool.nunits, dtype=np.int64)   # past each unit's last object
        linked = []                                      # (slots, addresses, lengths) in rings
        for lo in range(0, self.npages, COMPACT_SCAN):   # small temporaries: see compact()
            hi = min(lo + COMPACT_SCAN, self.npages)
            e, w = self._tab[2 * lo:2 * hi:2], self._tab[2 * lo + 1:2 * hi:2]
            length = ((e >> np.uint64(2)) & np.uint64(0x1FFF)).astype(np.int64)
            held = ((e & np.uint64(3)) >= RAW) & (length > 0)
            ring_ = held & ((w & np.uint64(LINK)) != 0)
            alone = held & ~ring_
            addr = e[alone] >> np.uint64(16)
            units = (addr // unit).astype(np.int64)
            np.add.at(live, units, length[alone])
            np.maximum.at(ends, units, (addr % unit).astype(np.int64) + length[alone])
            if ring_.any():
                linked.append((np.flatnonzero(ring_) + lo, e[ring_] >> np.uint64(16),
                               length[ring_]))
        dup = 0
        if linked:
            # shared objects: rings relinked from the entries' addresses (a crash may have
            # cut one), each object counted once
            idx, addr, lens = (np.concatenate(x) for x in zip(*linked))
            rebuild_rings(self._tab, idx, addr)
            _, first, holders = np.unique(addr, return_index=True, return_counts=True)
            units = (addr[first] // unit).astype(np.int64)
            np.add.at(live, units, lens[first])
            np.maximum.at(ends, units, (addr[first] % unit).astype(np.int64) + lens[first])
            dup = int(((holders - 1) * lens[first]).sum())
        adopt(live, ends)
        self.pool.adopt(live > 0, _arena.OBJECTS)
        recount(self._c, self._tab)
        c = self._c
        c[DUP_DATA_SIZE] = dup
        c[MEM_USED_MAX] = max(c[MEM_USED_MAX], self.mem_used_total)

    def close(self) -> None:
        """Stop and drop the pool if the store made it (shared state stays for the next)."""
        if self._own_pool and self.pool is not None:
            self.pool.close()             # (its keeper drains freed slots: stopped first)
        self.pool = None
        sf, self._slotfree = self._slotfree, None
        if sf is not None:
            sf.close()
        pressure, self._pressure = self._pressure, None
        if pressure is not None and hasattr(pressure, "close"):
            pressure.close()
        if self._state is not None:
            self._tab = self._counters = self._t = self._c = None
            self._header = _ZERO_PAGE
            self._state.detach()
            self._state = None

    def destroy(self) -> None:
        """Close, and remove the shared state too (a reset or a clean unload)."""
        if self._state is not None:
            self._state.remove()
        self.close()

    # ---- the page operations (each takes the store lock for the part that needs it)

    def _write(self, offset: int, buf: memoryview, wait: float, swap: bool):
        fwd = []
        try:
            self._write_pages(offset >> PAGE_SHIFT, len(buf) >> PAGE_SHIFT, buf, wait, swap, fwd)
        finally:
            pending = self._backing_io(fwd) if fwd else None
        return pending

    def _write_pages(self, first: int, n: int, mv: memoryview, wait: float, swap: bool,
                     fwd: list) -> None:
        """Page by page: copied out of ``mv``, checked and compressed without the lock, then
        placed and published under it (a swap-out shares an identical stored object)."""
        c = self._c
        dd = self._dd if swap else None
        cfn, cargs = self.comp.compress_call
        backing, memlimit, max_zpage = self.backing, self.memlimit, self.max_zpage_size
        alloc, view, lock = self.allocator, self.pool.view, self._lock
        k = -1
        try:
            for k in range(n):
                idx = first + k
                page = bytes(mv) if n == 1 else bytes(mv[k << PAGE_SHIFT:(k + 1) << PAGE_SHIFT])
                w0 = page[:8]
                failed, forward = None, False
                if w0 == page[4088:] and page == w0 * 512:
                    kind = SAME
                elif backing is not None and memlimit and c[COMPR_DATA_SIZE] > memlimit - PAGE_SIZE:
                    forward = True      # (read without the lock: a bound for new pages, as before)
                else:
                    try:
                        z = cfn(page, *cargs)
                    except Exception as e:
                        failed = str(e)           # (not e: its traceback would pin mv's buffer)
                    else:
                        clen, kind = len(z), COMP
                        if clen > max_zpage:
                            if backing is not None:
                                forward = True
                            else:
                                kind, clen, z = RAW, PAGE_SIZE, page   # huge page: kept as it is
                key = (dedup_key(z) if dd and failed is None and not forward and kind != SAME
                       else 0)
                with lock:
                    c[NUM_WRITES] += 1
                    if failed is not None:
                        c[FAILED_WRITES] += 1
                        raise OSError(errno.EIO, f"write: page {idx}: compression failed: {failed}") from None
                    if forward:
                        fwd.append((OP_WRITE, idx, k))
                        continue
                    if kind == SAME:
                        self._set(idx, SAME, 0, 0, int.from_bytes(w0, "little"))
                        continue
                    twin = key and dedup_find(self._t, dd, self._ddmask, self.pool.mem, idx, z, key)
                    if twin:
                        self._set(idx, kind, self._t[2 * twin - 2] >> 16, clen, tag=key, twin=twin)
                        continue
                    try:
                        addr = alloc.malloc(clen, wait)
                    except MemoryError:
                        c[FAILED_WRITES] += 1
                        if backing is not None:
                            fwd.append((OP_WRITE, idx, k))
                            continue
                        raise OSError(errno.ENOSPC, f"write: page {idx}: no memory ready (retry later)") from None
                    used = alloc.pages_used() << PAGE_SHIFT
                    if memlimit and backing is None and used > memlimit:
                        alloc.free(addr, clen)
                        c[FAILED_WRITES] += 1
                        raise OSError(errno.ENOMEM, f"write: page {idx}: memory limit {memlimit} reached")
                    if used > c[MEM_USED_MAX]:
                        c[MEM_USED_MAX] = used
                    view[addr:addr + clen] = z
                    self._set(idx, kind, addr, clen, tag=key)
        except OSError:
            # the request fails as a whole: the pages after the one that failed are
            # written and failed too, as the kernel counts them (it writes them all again)
            rest = n - k - 1
            if rest > 0:
                with lock:
                    c[NUM_WRITES] += rest
                    c[FAILED_WRITES] += rest
            raise

    def _read_pages(self, first: int, n: int, mv: memoryview, fwd: list) -> None:
        """Page by page: the slot read (and its compressed bytes copied out) under the lock,
        decompressed without it -- into the thread's scratch page if it has one (a queue
        thread), else into a bytes copy."""
        t, c, lock = self._t, self._c, self._lock
        dfn, dargs = self.comp.decompress_call
        view = self.pool.view
        sc = getattr(self._local, "scratch", None)
        scv = memoryview(sc) if sc is not None else None
        for k in range(n):
            idx = first + k
            o = k << PAGE_SHIFT
            with lock:
                e = t[2 * idx]
                kind = e & 3
                c[NUM_READS] += 1
                if kind == COMP:
                    h, ln = e >> 16, (e >> 2) & 0x1FFF
                    if scv is not None:
                        scv[:ln] = view[h:h + ln]
                        src = sc[:ln]
                    else:
                        src = bytes(view[h:h + ln])
                elif kind == SAME:
                    v = t[2 * idx + 1]
                elif kind == RAW:
                    b = e >> 16
                    mv[o:o + PAGE_SIZE] = view[b:b + PAGE_SIZE] if e & 0x7FFC else self._header
                elif self.backing is not None:
                    c[NUM_READS] -= 1                 # counted in bd_reads once it succeeded
                    fwd.append((OP_READ, idx, k))
            if kind == COMP:
                try:
                    mv[o:o + PAGE_SIZE] = dfn(src, *dargs)
                except Exception as ex:
                    with lock:
                        c[FAILED_READS] += 1
                    raise OSError(errno.EIO, f"read: page {idx}: decompression failed: {ex}") from None
            elif kind == SAME:
                mv[o:o + PAGE_SIZE] = v.to_bytes(8, "little") * 512 if v else _ZERO_PAGE
            elif kind == EMPTY and self.backing is None:
                mv[o:o + PAGE_SIZE] = _ZERO_PAGE

    def _set(self, idx: int, kind: int, addr: int = 0, length: int = 0, value: int = 0,
             tag: int = 0, twin: int = 0) -> None:
        """Slot ``idx`` holds (kind, addr, length, value) from now on (EMPTY: nothing); what it
        held before is released after the switch. ``tag``: a stored page's dedup key; ``twin``:
        the slot (index + 1) whose object at ``addr`` it shares, 0 = its own object. The one
        place counters follow content. An old object shared with other slots leaves its ring
        before the switch (the second word is the new content's) and is not freed."""
        t = self._t
        i = idx << 1
        old = t[i]
        okind = old & 3
        oval = t[i + 1] if okind == SAME else 0
        olen = (old >> 2) & 0x1FFF
        kept = okind > SAME and olen and t[i + 1] & LINK and unlink(t, idx)
        if kind == SAME:
            t[i + 1] = value
        elif twin:
            share(t, idx, twin - 1, tag)
            self._c[DUP_DATA_SIZE] += length
        elif kind:
            t[i + 1] = tag << 32
        t[i] = (addr << 16) | (length << 2) | kind
        if okind:
            if okind == SAME:
                count(self._c, SAME, 0, oval, -1)
            elif olen:                           # (raw with length 0: the header, uncounted)
                if kept:
                    self._c[DUP_DATA_SIZE] -= olen
                else:
                    self.allocator.free(old >> 16, olen)
                count(self._c, okind, olen, 0, -1)
        if kind:
            count(self._c, kind, length, value, 1)

    def _clear(self, lo: int, hi: int) -> None:
        """Slots ``lo``..``hi`` hold nothing from now on: :meth:`_set` (EMPTY) of each, in bulk.
        Every entry word is switched first, then what the entries held is freed
        (``allocator.free_many``; a shared object by its last holder) and uncounted, so a
        crash in between leaves no slot pointing at freed data. Its numpy temporaries are a
        few times ``hi - lo`` words, from the heap's headroom (the queue thread calls
        this)."""
        ent = self._tab[2 * lo:2 * hi:2]
        live = np.flatnonzero(ent & 3)
        if not len(live):
            return
        old = ent[live]
        kind = old & 3
        same = kind == SAME
        values = self._tab[2 * (lo + live[same]) + 1]
        length = (old >> 2) & 0x1FFF
        held = (kind > SAME) & (length > 0)            # (raw with length 0: the header, uncounted)
        linked = held & ((self._tab[2 * (lo + live) + 1] & np.uint64(LINK)) != 0)
        ent[live] = 0                                  # the switch, every entry word first
        owned = held
        if linked.any():
            # shared objects: each slot leaves its ring in turn; the last holder (alone by the
            # time it comes) frees the object
            owned = held.copy()
            for k in np.flatnonzero(linked).tolist():
                if unlink(self._t, lo + int(live[k])):
                    owned[k] = False
                    self._c[DUP_DATA_SIZE] -= int(length[k])
        if owned.any():
            self.allocator.free_many((old[owned] >> 16).astype(np.int64),
                                     length[owned].astype(np.int64))
        n_same, n_fill = int(np.count_nonzero(same)), int(np.count_nonzero(values))
        n_held = int(np.count_nonzero(held))
        c = self._c
        c[SAME_PAGES] -= n_same
        c[ZERO_PAGES] -= n_same - n_fill
        c[PAGES_STORED] -= n_fill + n_held
        c[GOOD_COMPRESS_N] -= n_fill + int(np.count_nonzero(held & (kind == COMP)
                                                              & (length <= GOOD_COMPRESS)))
        c[HUGE_PAGES] -= int(np.count_nonzero(held & (kind == RAW)))
        c[COMPR_DATA_SIZE] -= int(length[held].sum())

    def _backing_io(self, fwd: list) -> BackingIO:
        """The forwarded pages of a request as a BackingIO (contiguous runs merged); its done()
        frees the RAM copy of every page written, and counts what succeeded and failed."""
        ops, pages = self.backing.runs(fwd)

        def done(results):
            bad = 0
            with self._lock:
                c = self._c
                for (op, _, _, length, _), idxs, r in zip(ops, pages, results):
                    ok = r == length
                    if op == OP_WRITE:
                        c[BD_WRITES if ok else FAILED_WRITES] += len(idxs)
                        if ok:
                            for idx in idxs:
                                if self._t[2 * idx] & 3:
                                    self._set(idx, EMPTY)
                    else:
                        c[BD_READS if ok else FAILED_READS] += len(idxs)
                    bad += not ok
            if bad:
                raise OSError(errno.EIO, f"backing swap I/O failed ({bad} of {len(ops)} ops)")

        return BackingIO(ops, done)

