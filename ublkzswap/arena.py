"""The arena: all memory the store keeps pages in, and the keeper that feeds it.

Owns: one anonymous private mapping (``MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE``)
reserved once for the device's maximum and viewed as a numpy ``uint8`` array
(:attr:`Arena.mem`), a ``uint32`` memoryview of it for xvmalloc's headers
(:attr:`Arena.words`), and the life cycle of each of its 4 KiB pages::

    UNBACKED --keeper: populate (+lock)--> READY --take()--> OBJECTS / WHOLE
        ^                                    ^                   |
        +--keeper: munlock, DONTNEED, relock-+-------give()------+

- ``take(kind)`` / ``give(page)`` are the I/O path's only calls: O(1) pops and
  pushes on a stack of READY pages under a short lock. They never make the
  kernel find memory: a READY page is already resident (and locked when the
  process runs under ``mlockall``). When no page is READY, ``take`` returns -1
  and the caller fails the write with ENOSPC (back-pressure, not loss).
- The keeper (:meth:`step`, run by a thread from :meth:`start` or called
  directly in tests) keeps the number of READY pages between the watermarks:
  below ``low`` it populates UNBACKED pages up to ``high`` with
  ``madvise(MADV_POPULATE_WRITE)`` (fallback: ``memset`` through ctypes, which
  also releases the GIL); above ``high`` it hands the surplus, down to the
  midpoint, back to the kernel: ``munlock`` (locked pages refuse DONTNEED),
  ``madvise(MADV_DONTNEED)``, then ``mlock2(MLOCK_ONFAULT)`` again so the range
  keeps the lock-on-fault flag and its VMA merges back (no VMA fragmentation).
  Every system call goes through ctypes, which drops the GIL, so a keeper
  stalled in reclaim never blocks the I/O thread.
- Locking: with ``lock=True`` the whole mapping is ``mlock2(MLOCK_ONFAULT)``-ed
  at creation (pages are locked as they are populated). With ``lock=False``
  the arena still notices a mapping locked by ``mlockall(MCL_FUTURE|MCL_ONFAULT)``
  (DONTNEED answers EINVAL) and switches to the locked sequence. The process
  must not use ``MCL_FUTURE`` *without* ``MCL_ONFAULT``: the kernel would
  populate the whole reservation at mmap time.
- Transparent huge pages are disabled on the mapping (``MADV_NOHUGEPAGE``) so
  residency follows 4 KiB pages exactly.

The ready pool follows demand: a ``take`` that finds nothing ready (a *miss*: a swap write
then waits briefly, and fails with ENOSPC if the keeper is still behind) makes the keeper's next pass
double both watermarks, up to ``grow`` times the configured ones; after ``SHRINK_AFTER``
seconds without a miss they halve again, and the keeper gives the surplus back. An idle
device keeps only the configured pool; a burst of swap-outs gets a deeper one.

Out of memory the pool stops hoarding: while :attr:`Arena.short` (the keeper's last fill was
held back by ``may_grow`` or its populate failed) the watermarks are back at their setting
and the keeper gives back everything above ``low``, woken as soon as a ``give`` passes it.
When the kernel has OOM-killed a process whose memory was all swapped out to us, the memory
it frees comes back only as the kernel discards the process's swap clusters; it must reach
the kernel at once, or the OOM killer takes a second victim while we refill our pool.

Resident memory = pages not UNBACKED = READY + OBJECTS + WHOLE (+ pages the keeper is
working on). Only OBJECTS + WHOLE count as the store's ``mem_used_total``.

Still naive: a single stack of ready pages (no NUMA, no preference for
contiguous runs beyond sorting each keeper batch); the keeper polls every
``interval`` seconds besides being woken when the pool drops under ``low``;
``close`` leaves the unmapping to the garbage collector if views are alive.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time

import numpy as np

from .libc import check as _check, libc as _libc
from .memory import name_mapping, resident_array
from .uapi import PAGE_SIZE


# page states; OBJECTS and WHOLE are the two kinds a page is taken for: carved into objects by
# the object allocator (xvmalloc.OBJECTS), or holding one incompressible page whole
UNBACKED, READY, OBJECTS, WHOLE, BUSY = 0, 1, 2, 3, 4

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_NOHUGEPAGE = 15
MADV_POPULATE_WRITE = 23
MLOCK_ONFAULT = 1

DEFAULT_LOW = 64      # pages (256 KiB)
DEFAULT_HIGH = 256    # pages (1 MiB)
DEFAULT_INTERVAL = 0.02
ADOPT_CHUNK = 16384  # pages adopt() asks mincore about at a time
POPULATE_BATCH = 256  # pages the keeper brings in before handing them out (1 MiB)
DEFAULT_GROW = 4      # the watermarks may grow after misses to this many times their setting
SHRINK_AFTER = 5.0    # seconds without a miss before grown watermarks halve

log = logging.getLogger("ublkzswap.arena")

_mlock2 = _libc.mlock2


def _runs(pages: np.ndarray, most: int = 0):
    """Yield (first page, count) of the contiguous runs in sorted ``pages``, each run cut
    into pieces of at most ``most`` pages when ``most`` > 0."""
    if len(pages) == 0:
        return
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        first, count = int(pages[s]), e - s
        step = most if most > 0 else count
        for off in range(0, count, step):
            yield first + off, min(step, count - off)


class Arena:
    """``npages`` 4 KiB pages of address space, handed out ``unit`` pages at a time from a
    pool of ready units, and a keeper.

    Arguments:
      npages: size of the reservation in pages (no memory is used until pages
        are populated); rounded up to whole units.
      unit: pages per unit (1 for xvmalloc's pages, a segment for the log allocator).
        ``take`` and ``give`` deal in unit numbers.
      low, high: watermarks of the ready pool in pages (in whole units, clamped to the
        arena; defaults 64 and 256).
      grow: after misses the watermarks may double up to ``grow`` times ``low`` and ``high``
        (1: fixed watermarks).
      lock: ``mlock2(MLOCK_ONFAULT)`` the mapping now (OSError if refused).
      inline_refill: tests and benchmarks without a keeper thread only — when
        the pool is empty, ``take`` runs :meth:`step` itself (this populates
        memory on the I/O path, which a swap device must never do).
      prefill: run one :meth:`step` now, so the pool starts at ``high``.
      may_grow: ``callable(nbytes) -> bool`` asked before each batch is populated (e.g.
        :class:`ublkzswap.memory.GrowthGuard`); False defers growth to a later pass. The arena
        owns it: its ``close()``, if it has one, is called by :meth:`close`.
      segment: a :class:`ublkzswap.shmstate.Segment` to use as the memory instead of a private
        mapping (it outlives the process; pages go back with ``MADV_REMOVE``). Units of an
        existing segment are taken over with :meth:`adopt`.
    """

    def __init__(self, npages: int, *, unit: int = 1, low: int | None = None,
                 high: int | None = None, lock: bool = False, inline_refill: bool = False,
                 prefill: bool = True, may_grow=None, segment=None, grow: int = DEFAULT_GROW):
        if npages <= 0 or unit <= 0:
            raise ValueError(f"arena needs at least one page and unit, got {npages}, {unit}")
        low = DEFAULT_LOW if low is None else low
        high = DEFAULT_HIGH if high is None else high
        if low < 0 or high < 1 or low > high:
            raise ValueError(f"watermarks need 0 <= low <= high and high >= 1, got low={low} high={high}")
        self.unit = unit
        self.unit_bytes = unit * PAGE_SIZE
        self.nunits = nunits = -(-npages // unit)
        self.npages = npages = nunits * unit
        self.size = npages * PAGE_SIZE
        if grow < 1:
            raise ValueError(f"grow must be at least 1, got {grow}")
        self.high = min(-(-high // unit), nunits)
        self.low = min(-(-low // unit), self.high)
        self._set_low, self._set_high = self.low, self.high
        self.high_max = min(self.high * grow, nunits)
        self.misses = 0            # takes that found the pool empty
        self._misses_seen = 0      # as of the keeper's last pass
        self._grown_at = 0.0
        if segment is None:
            self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
            self.mem = np.frombuffer(self._map, dtype=np.uint8)
            self.view = memoryview(self._map)
            self._dontneed = MADV_DONTNEED
        else:
            if segment.size < self.size:
                raise ValueError(f"segment of {segment.size} bytes for an arena of {self.size}")
            self._map = None
            self.mem = segment.array(0, self.size, np.uint8)
            self.view = memoryview(self.mem)
            self._dontneed = MADV_REMOVE          # punch the pages out of the segment
        self.base = self.mem.ctypes.data
        self.words = self.view.cast("I")
        _libc.madvise(self.base, self.size, MADV_NOHUGEPAGE)  # best effort
        self._locked = False
        if lock:
            self.lock_all()
        name_mapping(self.base, self.size, "ublkzswap arena")
        # per-page state (UNBACKED = 0) and the stack of READY pages, resident in mappings of
        # their own (the I/O path touches them: it must never fault there)
        self.state = resident_array(nunits, np.uint8, "ublkzswap arena state")
        self._st = memoryview(self.state)
        self._ready = resident_array(nunits, np.uint32, "ublkzswap arena state")
        self._rv = memoryview(self._ready)
        self._nready = 0
        self._nunbacked = nunits
        self._lock = threading.Lock()
        self._refilled = threading.Condition(self._lock)
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.inline_refill = inline_refill
        self.may_grow = may_grow
        self.growth_deferred = 0   # batches not populated because may_grow said no
        self.short = False         # the keeper's last fill was held back or failed
        self.keeper_errors = 0
        self.last_keeper_error: OSError | None = None
        self._logged_at = -1e9
        self.populate_method = "madvise"
        self._unmapped: list[tuple[int, int]] = []   # runs adopt() took over, not yet mapped
        self.populated = 0   # pages brought in, cumulative
        self.released = 0    # pages given back to the kernel, cumulative
        if prefill:
            self.step()

    # ---- I/O path

    def take(self, kind: int, timeout: float = 0.0) -> int:
        """Pop a READY unit for ``kind`` (OBJECTS or WHOLE); -1 if none is ready.

        With ``timeout > 0`` and the keeper running, an empty pool wakes the keeper and waits
        up to ``timeout`` seconds for its next batch (long for writes whose failure the kernel
        would not retry; short for a swap write, and 0 -- it fails at once -- while
        :attr:`short` says the keeper is held back for want of memory)."""
        with self._lock:
            p = self._pop(kind)
            n = self._nready
        if p < 0:
            self.misses += 1      # (whether or not a wait below then gets a unit)
        if n < self.low and self._thread is not None and not self._event.is_set():
            self._event.set()
        if p < 0 and timeout > 0 and self._thread is not None:
            p = self._take_waiting(kind, timeout)
        if p < 0 and self.inline_refill:
            self.step()
            with self._lock:
                p = self._pop(kind)
        return p

    def _pop(self, kind: int) -> int:
        """Top of the READY stack for ``kind``, or -1 (caller holds ``_lock``)."""
        n = self._nready
        if not n:
            return -1
        n -= 1
        self._nready = n
        p = self._rv[n]
        self._st[p] = kind
        return p

    def _take_waiting(self, kind: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._refilled:
            while True:
                p = self._pop(kind)
                if p >= 0 or not self._await_batch(deadline):
                    return p

    def _await_batch(self, deadline: float) -> bool:
        """Wake the keeper and wait a little for its next batch (caller holds ``_refilled``);
        False, without waiting, once ``deadline`` has passed or if there is no keeper."""
        left = deadline - time.monotonic()
        if left <= 0 or self._thread is None:
            return False
        self._event.set()
        self._refilled.wait(min(left, 0.05))
        return True

    def wait_ready(self, n: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds, waking the keeper, until at least ``n`` units are
        ready; True if they are. For callers off the I/O path that may wait for memory
        (on-demand compaction); without a keeper, an inline-refill pool refills once."""
        if self._nready < n and self._thread is None and self.inline_refill:
            self.step()
        deadline = time.monotonic() + timeout
        with self._refilled:
            while self._nready < n and self._await_batch(deadline):
                pass
            return self._nready >= n

    def give(self, page: int) -> None:
        """Return a unit (content irrelevant) to the READY pool."""
        with self._lock:
            n = self._nready
            self._rv[n] = page
            self._st[page] = READY
            self._nready = n + 1
        if n >= self._cap() and self._thread is not None and not self._event.is_set():
            self._event.set()

    # ---- keeper

    @property
    def ready(self) -> int:
        """Units in the READY pool."""
        return self._nready

    @property
    def resident(self) -> int:
        """Pages not given back to the kernel (READY + in use + in transit)."""
        return (self.nunits - self._nunbacked) * self.unit

    def pages_of(self, kind: int) -> np.ndarray:
        """Unit numbers currently in state ``kind`` (pages when ``unit`` is 1)."""
        return np.flatnonzero(self.state == kind)

    def step(self) -> tuple[int, int]:
        """One keeper pass: refill to ``high`` if below ``low``, or give the
        surplus above ``high`` back down to the midpoint. Returns (pages
        populated, pages released). System-call failures while populating
        (ENOMEM under memory pressure) leave the pages UNBACKED and are
        recorded in ``keeper_errors`` / ``last_keeper_error``. The watermarks are adapted
        first (misses since the last pass grow them, a quiet spell shrinks them)."""
        self._adapt()
        self._map_adopted()
        fill = trim = None
        with self._lock:
            nr = self._nready
            if nr < self.low or (nr == 0 and self.high > 0):
                want = min(self.high - nr, self._nunbacked)
                if want > 0:
                    fill = np.flatnonzero(self.state == UNBACKED)[:want]   # lowest first
                    self._nunbacked -= len(fill)
                    self.state[fill] = BUSY
            elif nr > self._cap():
                keep = self.low if self.short else (self.low + self.high) // 2
                trim = self._ready[keep:nr].copy()
                self._nready = keep
                self.state[trim] = BUSY
        populated = released = 0
        if fill is not None:
            fill.sort()
            refused = failed = False
            for start, count in _runs(fill, max(1, POPULATE_BATCH // self.unit)):
                n = 0 if refused else count
                if self.may_grow is not None:
                    while n and not self.may_grow(n * self.unit_bytes):
                        n //= 2                 # short of memory: as much as can be had
                    if n < count:
                        refused = True          # the rest of this pass goes back unbacked
                        with self._lock:
                            self._push_unbacked(np.arange(start + n, start + count, dtype=np.int64))
                if not n:
                    continue
                try:
                    self._populate(start, n)
                except OSError as e:
                    self._keeper_error(e)
                    failed = True
                    with self._lock:
                        self._push_unbacked(np.arange(start, start + n, dtype=np.int64))
                    continue
                with self._refilled:   # each batch usable at once, waiters woken
                    self._push_ready(np.arange(start, start + n, dtype=np.int64))
                    self._refilled.notify_all()
                populated += n
            self.populated += populated
            self.short = refused or failed
            if refused:
                self.growth_deferred += 1
        if trim is not None:
            trim.sort()
            for start, count in _runs(trim):
                self._release(start, count)
            with self._lock:
                self._push_unbacked(trim)
            released = len(trim)
            self.released += released
        return populated, released

    def _map_adopted(self) -> None:
        """Map what :meth:`adopt` took over into this process (no new page: they exist), so
        that the I/O path does not fault on them. A failure leaves the rest for the next pass."""
        while self._unmapped:
            start, count = self._unmapped[-1]
            try:
                self._populate(start, count)
            except OSError as e:
                self._keeper_error(e)
                return
            self._unmapped.pop()

    def _adapt(self) -> None:
        """Double the watermarks if a take missed since the last pass (up to ``high_max``);
        halve them, down to their setting, after ``SHRINK_AFTER`` seconds without a miss."""
        misses = self.misses
        if self.short:
            # out of memory, a miss is a swap-out failed on purpose, not demand to store
            # ahead of: back to the setting, and what the store frees goes to the kernel
            self._misses_seen = misses
            high = self._set_high
        elif misses != self._misses_seen:
            self._misses_seen = misses
            self._grown_at = time.monotonic()
            high = min(self.high * 2, self.high_max)
        elif self.high > self._set_high and time.monotonic() - self._grown_at >= SHRINK_AFTER:
            self._grown_at = time.monotonic()
            high = max(self.high // 2, self._set_high)
        else:
            return
        if high != self.high:
            self.high = high
            self.low = min(self._set_low * high // self._set_high, high)

    def _cap(self) -> int:
        """Ready units above which the keeper gives the surplus back: ``high``, or ``low``
        while :attr:`short` (the memory the store frees is the kernel's first then: a
        machine out of memory gets the memory of a killed process's swap back as the
        discards come, not after the pool has refilled)."""
        return self.low if self.short else self.high

    def _push_ready(self, pages: np.ndarray) -> None:
        n = self._nready
        k = len(pages)
        self._ready[n:n + k] = pages[::-1]  # lowest page on top
        self.state[pages] = READY
        self._nready = n + k

    def _push_unbacked(self, pages: np.ndarray) -> None:
        self.state[pages] = UNBACKED
        self._nunbacked += len(pages)

    def _populate(self, first: int, count: int) -> None:
        addr = self.base + first * self.unit_bytes
        length = count * self.unit_bytes
        if self.populate_method == "madvise":
            if _libc.madvise(addr, length, MADV_POPULATE_WRITE) == 0:
                return
            e = ctypes.get_errno()
            if e != errno.EINVAL:
                raise OSError(e, f"madvise(MADV_POPULATE_WRITE): {os.strerror(e)}")
            self.populate_method = "memset"  # kernel older than 5.14
        ctypes.memset(addr, 0, length)  # pages are fresh zeros; ctypes drops the GIL

    def _release(self, first: int, count: int) -> None:
        addr = self.base + first * self.unit_bytes
        length = count * self.unit_bytes
        if self._locked:
            _check(_libc.munlock(addr, length), "munlock")
        if _libc.madvise(addr, length, self._dontneed) != 0:
            e = ctypes.get_errno()
            if e != errno.EINVAL or self._locked:
                raise OSError(e, f"madvise({self._dontneed}): {os.strerror(e)}")
            # locked by mlockall(MCL_FUTURE|MCL_ONFAULT): switch to the locked sequence
            self._locked = True
            _check(_libc.munlock(addr, length), "munlock")
            _check(_libc.madvise(addr, length, self._dontneed), f"madvise({self._dontneed})")
        if self._locked:
            self._relock(addr, length)

    def _relock(self, addr: int, length: int) -> None:
        _check(_mlock2(addr, length, MLOCK_ONFAULT), "mlock2(MLOCK_ONFAULT)")

    def lock_all(self) -> None:
        """Lock the whole mapping on fault (pages are locked as they come in)."""
        self._relock(self.base, self.size)
        self._locked = True

    @property
    def locked(self) -> bool:
        return self._locked

    def start(self, interval: float = DEFAULT_INTERVAL, thread_init=None, idle=None) -> None:
        """Start the keeper thread: it runs :meth:`step` every ``interval``
        seconds and whenever the I/O path wakes it (pool under ``low`` or over
        ``high``). ``thread_init`` (e.g. a prctl(PR_SET_IO_FLUSHER) call) runs
        first in the new thread; ``idle`` (the store's background compaction) after every
        pass."""
        if self._thread is not None:
            return
        self._stop = False

        def run():
            if thread_init is not None:
                thread_init()
            while not self._stop:
                self._event.wait(interval)
                self._event.clear()
                if self._stop:
                    break
                try:
                    while True:
                        populated, released = self.step()
                        if not (populated or released) or self._stop:
                            break
                        if self.low <= self._nready <= self.high:
                            break
                except OSError as e:  # the I/O path sees ENOSPC meanwhile
                    self._keeper_error(e)
                if idle is not None:
                    try:
                        idle()
                    except Exception as e:   # a bug there must not end the keeper
                        self._idle_error(e)

        self._thread = threading.Thread(target=run, name="arena-keeper", daemon=True)
        self._thread.start()

    def _idle_error(self, e: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at >= 60.0:
            log.error("arena keeper: background work failed: %s: %s", type(e).__name__, e)
            self._logged_at = now

    def _keeper_error(self, e: OSError) -> None:
        """Count and log (at most one record a minute) a failure to bring memory in."""
        self.keeper_errors += 1
        self.last_keeper_error = e
        now = time.monotonic()
        if now - self._logged_at >= 60.0:
            log.warning("arena keeper: %s (%d failures so far; swap writes get ENOSPC meanwhile)",
                        e, self.keeper_errors)
            self._logged_at = now

    def stop(self) -> None:
        """Stop the keeper thread (no-op if not running)."""
        t = self._thread
        if t is None:
            return
        self._stop = True
        self._event.set()
        t.join()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def close(self) -> None:
        """Stop the keeper and drop the mapping (unmapped now if no view of
        it is still alive elsewhere, else when the last one goes)."""
        self.stop()
        close = getattr(self.may_grow, "close", None)
        if close is not None:
            close()
        self.mem = None
        for v in (self.words, self.view):
            try:
                v.release()
            except (BufferError, ValueError):
                pass
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass

    def adopt(self, used: np.ndarray, kind: int) -> None:
        """Take over a segment a previous process filled: the units where ``used`` is true are
        in use for ``kind``; of the rest, those wholly resident in the segment are READY (the
        first ``high`` of them; the keeper gives any surplus back), the others UNBACKED (a
        partly resident one is populated whole when the keeper next needs it).

        Makes no page: it runs while the kernel holds the device's I/O, when any allocation
        may wait for a swap-out to that very device. The adopted units are mapped into this
        process by the keeper's next pass (:meth:`step`); until then the I/O path finds them
        by minor faults on pages that exist (the segment is SHM_LOCKed)."""
        n = self.nunits
        whole = np.zeros(n, dtype=bool)
        step = max(1, ADOPT_CHUNK // self.unit)       # units a mincore call looks at
        vec = (ctypes.c_ubyte * (step * self.unit))()  # (a small buffer: the heap's headroom)
        for first in range(0, n, step):
            k = min(step, n - first)
            if _libc.mincore(ctypes.c_void_p(self.base + first * self.unit_bytes),
                             ctypes.c_size_t(k * self.unit_bytes), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore of the arena")
            pages = np.frombuffer(vec, dtype=np.uint8, count=k * self.unit).reshape(k, self.unit)
            whole[first:first + k] = (pages & 1).all(axis=1)
        inuse = used[:n]
        with self._lock:
            self.state[:] = UNBACKED
            self.state[inuse] = kind
            self._nready = 0
            self._push_ready(np.flatnonzero(whole & ~inuse))
            self._nunbacked = int(np.count_nonzero(self.state == UNBACKED))
            self._unmapped = list(_runs(np.flatnonzero(inuse | whole)))
