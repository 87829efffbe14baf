"""The daemon's memory discipline: nothing that serves I/O may make the kernel find a page.

Owns: process set-up (:func:`lock_process`: allocator settings, a pre-grown never-trimmed heap,
small thread stacks, locking what is touched, ``oom_score_adj -1000``), per-thread set-up
(:func:`lock_thread_stack`, :func:`set_io_flusher`, :func:`keeper_thread_init`), making a fresh
mapping resident (:func:`populate`), the free-memory line the store grows within
(:class:`GrowthGuard`) and whether the machine is swapping (:class:`SwapActivity`).

Why each piece (../shared/DESIGN.md "Memory and deadlock", ../shared/docs/ublk-protocol.md
section 4): a swap device served from user space deadlocks the machine if serving a request
needs a page the kernel must find first -- reclaim waits for swap writes that wait for us.
- Everything the I/O path touches must be resident and locked before the device serves: a
  page fault there (a new anonymous page, copy-on-write, or a file page read back from disk)
  is an allocation that may wait on reclaim. The tests trace allocations and count major
  faults of the queue threads.
- Locking everything mapped (``mlockall(MCL_CURRENT)``) would pin every library page, most of
  which the daemon never runs (numpy's BLAS alone is tens of MiB). Instead mappings are
  locked on fault: pages touched at start-up and by the warm-up (a self-test through the
  store before any device goes live) are locked, untouched ones cost nothing.
- ``MCL_ONFAULT`` makes ``MAP_POPULATE`` a no-op (the kernel skips populating lock-on-fault
  mappings): every buffer the I/O path touches is populated explicitly with
  :func:`populate`.
- Every thread of the daemon shares the GIL with the queue threads, so a thread that faults
  while holding the GIL stalls the I/O path just the same: every thread locks its stack first.

Still naive: the warm-up covers the paths it runs; a path first taken under memory pressure
(an error path, say) may still fault in code (the kernel tests count the queue threads' major
faults); the heap headroom is a constant sized from measurement.
"""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import os
import threading

import numpy as np

from . import uapi
from .libc import libc as _libc, oserror
from .uapi import PAGE_SIZE

HEAP_HEADROOM = 2 << 20
BIG_ANON = 4 << 20          # anonymous reservations this big are locked only where touched
MLOCK_ONFAULT = 1
# every thread's stack, locked whole: what the request path, compaction and an exception's
# logging reach is a small part of it (docs/NOTES.md, stop 28: measured natively)
THREAD_STACK = 256 << 10
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MADV_POPULATE_WRITE = 23

_mlock2 = _libc.mlock2


def lock_process(heap_headroom: int = HEAP_HEADROOM, oom_protect: bool = True) -> None:
    """Make this process safe to serve swap, locking what it has touched rather than everything
    it has mapped. Raises OSError with a one-line reason.

    - glibc: no mmap'ed chunks, no trimming, one arena; ``heap_headroom`` bytes of free heap
      pre-grown and touched, so the I/O path's small allocations never grow the heap;
    - ``mlockall(MCL_FUTURE|MCL_ONFAULT)``: every mapping made from now on is locked page by
      page as it is touched (a device-sized arena reservation costs nothing until used);
    - every current mapping gets the same lock-on-fault treatment (:func:`lock_touched`): its
      pages that are in our page tables now are locked, the rest are locked if and when they
      are touched. Untouched library code (most of numpy's BLAS, say) stays out of memory.
    Call :func:`warm` paths before serving so that what they touch is resident and locked."""
    _libc.mallopt(M_MMAP_MAX, 0)             # every malloc from the (locked) heap
    _libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # never give the heap back
    _libc.mallopt(M_ARENA_MAX, 1)            # no mmap'ed per-thread arenas
    _libc.mallopt(M_TOP_PAD, 1 << 20)
    ensure_heap_headroom(heap_headroom)
    threading.stack_size(THREAD_STACK)
    if _libc.mlockall(MCL_FUTURE | MCL_ONFAULT) != 0:
        raise oserror("cannot lock memory (mlockall)")
    lock_touched()
    if not oom_protect:
        return
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        raise OSError(e.errno, f"cannot set oom_score_adj: {e.strerror}") from None


def _mappings():
    """(start, end, perms, name) of every mapping of this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            yield start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""


def _present_runs(start: int, end: int):
    """(address, length) of the runs of pages of [start, end) that mincore reports present."""
    n = (end - start) // PAGE_SIZE
    vec = (C.c_ubyte * n)()
    if _libc.mincore(C.c_void_p(start), C.c_size_t(end - start), vec) != 0:
        return
    data = bytes(vec)
    i = 0
    while i < n:
        if not data[i] & 1:
            i += 1
            continue
        j = i
        while j < n and data[j] & 1:
            j += 1
        yield start + i * PAGE_SIZE, (j - i) * PAGE_SIZE
        i = j


PM_PRESENT, PM_SWAPPED = 1 << 63, 1 << 62


def _touched_runs(start: int, end: int, mask: int = PM_PRESENT | PM_SWAPPED):
    """(address, length) of the runs of pages of [start, end) this process has touched: in
    memory or swapped out (``/proc/self/pagemap``; ``mask=PM_SWAPPED``: swapped out only).
    mincore misses the swapped-out ones; a process prepared under memory pressure (a
    standby) may have had some swapped out -- to the very device it will serve -- before it
    locked them."""
    n = (end - start) // PAGE_SIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // PAGE_SIZE * 8)
            words = memoryview(f.read(n * 8)).cast("Q")
    except OSError:
        yield from _present_runs(start, end)
        return
    i, n = 0, len(words)
    while i < n:
        if not words[i] & mask:
            i += 1
            continue
        j = i
        while j < n and words[j] & mask:
            j += 1
        yield start + i * PAGE_SIZE, (j - i) * PAGE_SIZE
        i = j


FAULT_AROUND = 64 << 10     # the kernel's fault-around window (fault_around_bytes' default)


def _windows(start: int, end: int, runs):
    """``runs`` widened to whole FAULT_AROUND-aligned windows (clipped to [start, end)), merged.
    A page fault on a file mapping maps the pages of its window that are in the page cache:
    with the library's pages cached (any machine that ran it lately) what the self-test
    touched comes with its neighbours -- code that serving may run and the self-test did
    not. On a cold cache (a fresh boot, memory pressure) only the pages read come; locking
    the windows makes the coverage the same either way."""
    out = []
    for addr, length in runs:
        lo = max(start, addr & ~(FAULT_AROUND - 1))
        hi = min(end, (addr + length + FAULT_AROUND - 1) & ~(FAULT_AROUND - 1))
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in out]


def lock_touched(big_anon: int = BIG_ANON) -> None:
    """Give every current mapping lock-on-fault (``mlock2(MLOCK_ONFAULT)``: its mapped pages are
    locked now, others when first touched), and ``mlock`` every private writable one whole,
    which writes through its pages: copy-on-write (a library's data page still shared with
    its file, pages shared with a parent we forked from, the shared zero page) is broken
    here, not by a later first write -- an allocation in whatever thread does it, with the
    GIL held or on the I/O path. The one exception: an anonymous mapping of ``big_anon``
    bytes or more of which nothing has been touched yet (a library's reserved buffer that
    nothing has used, such as OpenBLAS's) is left to lock-on-fault. Touched includes
    swapped out (:func:`_touched_runs`): locking brings those pages back. In a private
    mapping that is not writable (a library's relocation data, made read-only after the
    loader wrote it: anonymous pages that are read on every call through it) the pages that
    are swapped out are brought back and locked too.
    Raises OSError if the kernel refuses to lock."""
    for start, end, perms, name in list(_mappings()):
        if name in ("[vsyscall]", "[vvar]", "[vdso]") or perms.startswith("---"):
            continue
        if _mlock2(C.c_void_p(start), C.c_size_t(end - start), MLOCK_ONFAULT) != 0:
            err = C.get_errno()
            if err in (errno.EPERM, errno.EAGAIN):
                raise oserror("cannot lock memory (mlock2)")
            continue                      # ENOMEM: the mapping went away meanwhile
        if perms[3] != "p":
            continue
        if perms[1] != "w":
            runs = _touched_runs(start, end, PM_SWAPPED)
            if name.startswith("/"):             # a library's code or read-only data
                runs = _windows(start, end, _touched_runs(start, end))
            for addr, length in runs:
                if _libc.mlock(C.c_void_p(addr), C.c_size_t(length)) != 0:
                    raise oserror("cannot lock memory (mlock)")
            if name.startswith("/"):             # a library's code or read-only data
                # best effort: the pages touched are locked already (lock-on-fault); under
                # memory pressure reading their neighbours in may fail (EAGAIN), and that
                # must not stop the daemon from starting
                for addr, length in _windows(start, end, _touched_runs(start, end)):
                    _libc.mlock(C.c_void_p(addr), C.c_size_t(length))
            continue
        if not name and end - start >= big_anon and not any(_touched_runs(start, end)):
            continue
        if _libc.mlock(C.c_void_p(start), C.c_size_t(end - start)) != 0:
            raise oserror("cannot lock memory (mlock)")


def locked_bytes() -> int:
    """VmLck of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0


def new_memory_bytes() -> int:
    """Memory this process has had the kernel find for it: its anonymous pages and its page
    tables (RssAnon + VmPTE, bytes). Shared pages it maps are not counted: they exist."""
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "VmPTE:")):
                total += int(line.split()[1]) * 1024
    return total


class Reserve:
    """``nbytes`` of anonymous memory made resident now, to be handed back to the kernel at
    the moment this process will need pages it cannot wait for (:meth:`release`). A standby
    holds one while it waits: the takeover then finds free pages for what it cannot make
    ahead (page tables, the kernel's io_uring rings, per-device arrays), where otherwise
    every page would have to be reclaimed -- by swapping out to the devices it takes over."""

    def __init__(self, nbytes: int):
        self._pages = resident_array(nbytes, np.uint8, "ublkzswap takeover reserve")
        self.nbytes = self._pages.nbytes

    def release(self) -> None:
        """Give the memory back (idempotent): the last reference to its mapping goes."""
        self._pages = None


def populate(address: int, length: int) -> None:
    """Fault in (and so, under mlockall, lock) ``length`` bytes at ``address`` now."""
    if _libc.madvise(C.c_void_p(address), C.c_size_t(length), MADV_POPULATE_WRITE) == 0:
        return
    if C.get_errno() != errno.EINVAL:       # EINVAL: a kernel older than 5.14
        raise oserror("madvise(MADV_POPULATE_WRITE)")
    buf = (C.c_char * length).from_address(address)
    for off in range(0, length, PAGE_SIZE):
        buf[off] = buf[off]


PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0
PR_SET_NAME = 15


def name_mapping(address: int, length: int, name: str) -> None:
    """Name an anonymous mapping (``[anon:NAME]`` in /proc/PID/smaps), best effort: it costs
    nothing and makes the daemon's memory readable by mapping (bench/bench_mem.py)."""
    buf = C.create_string_buffer(name.encode())
    _libc.prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, address, length, C.addressof(buf))


def resident_array(n: int, dtype, name: str):
    """A zeroed numpy array of ``n`` items in an anonymous mapping of its own, resident now.
    Per-device tables live here rather than on the heap: the heap's headroom is for the I/O
    path's small objects, and a table there would use it up (or grow the heap)."""
    nbytes = max(n * np.dtype(dtype).itemsize, 1)
    m = mmap.mmap(-1, (nbytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE,
                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=dtype, count=n)
    populate(a.ctypes.data, len(m))
    name_mapping(a.ctypes.data, len(m), name)
    return a


def ensure_heap_headroom(nbytes: int = HEAP_HEADROOM) -> None:
    """Make sure ``nbytes`` of free heap lie ready (glibc never trims it back), e.g. after a
    device was set up, and that the whole heap up to the program break is resident and locked:
    glibc grows the heap by more than it was asked (``M_TOP_PAD``), and under
    ``MCL_ONFAULT`` that untouched tail would be faulted in -- a new page -- by the first
    allocation that reaches it, on the I/O path as like as not. Raises OSError if the kernel
    refuses to lock."""
    p = _libc.malloc(nbytes)
    if p:
        C.memset(p, 1, nbytes)
        _libc.free(C.c_void_p(p))
    lock_heap_tail(force=True)


_heap_locked_to = 0


def lock_heap_tail(force: bool = False) -> None:
    """If the heap has grown since it was last locked (a big allocation outside the I/O path,
    say), make the new part resident and locked now, so that the I/O path never is the first
    to touch it. Cheap when nothing changed (one ``sbrk(0)``): the arena keeper calls it after
    every pass. Raises OSError if the kernel refuses to lock."""
    global _heap_locked_to
    end = _libc.sbrk(0) or 0
    if end == _heap_locked_to and not force:
        return
    start = heap_start()
    if start is None:
        return
    if end > start and _libc.mlock(C.c_void_p(start), C.c_size_t(end - start)) != 0:
        raise oserror("cannot lock the heap (mlock)")
    _heap_locked_to = end


def heap_start() -> int | None:
    """Where this process's ``[heap]`` begins, or None if it has none."""
    for start, _end, _perms, name in _mappings():
        if name == "[heap]":
            return start
    return None


class _sysinfo(C.Structure):
    _fields_ = [("uptime", C.c_long), ("loads", C.c_ulong * 3), ("totalram", C.c_ulong),
                ("freeram", C.c_ulong), ("sharedram", C.c_ulong), ("bufferram", C.c_ulong),
                ("totalswap", C.c_ulong), ("freeswap", C.c_ulong), ("procs", C.c_ushort),
                ("pad", C.c_ushort), ("totalhigh", C.c_ulong), ("freehigh", C.c_ulong),
                ("mem_unit", C.c_uint), ("_f", C.c_char * 8)]


_si = _sysinfo()
_si_ref = C.byref(_si)


def free_bytes() -> int:
    """The kernel's free memory now (``MemFree``), through sysinfo(2): no file, no allocation."""
    if _libc.sysinfo(_si_ref) != 0:
        raise oserror("sysinfo")
    return _si.freeram * _si.mem_unit


def min_watermark_bytes(zoneinfo: str = "/proc/zoneinfo") -> int:
    """Sum of every zone's ``min`` watermark: below it only the kernel's reserves remain and an
    allocation must reclaim first (or, for one that may not do I/O, wait). 0 if unreadable."""
    total = 0
    try:
        with open(zoneinfo) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "min":
                    total += int(parts[1])
    except (OSError, ValueError):
        return 0
    return total * PAGE_SIZE


class _KeptOpen:
    """A /proc file kept open, so that reading it allocates no descriptor: ``_field`` reads
    one number from its first ``size`` bytes. Unreadable, ``_fd`` is -1. Closed by
    :meth:`close` or when collected."""

    def __init__(self, path: str, size: int):
        self._size = size
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = -1

    def _field(self, key: bytes, end: bytes) -> int:
        """The number between ``key`` and the next ``end``; OSError or ValueError if the file
        is closed, unreadable or has no such field."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "closed")
        text = os.pread(self._fd, self._size, 0)
        i = text.index(key) + len(key)
        return int(text[i:text.index(end, i)])

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    __del__ = close


class GrowthGuard(_KeptOpen):
    """Whether the store may take ``nbytes`` more from the kernel now: only while what the
    kernel can give without swapping stays ``margin`` above zero afterwards. That is the larger
    of the free pages above every zone's ``min`` watermark (the allocator hands those out
    without direct reclaim) and ``MemAvailable`` (free pages beyond the reserves plus page
    cache and slab the kernel can drop: clean cache comes by a reclaim that needs no I/O,
    which a PR_SET_IO_FLUSHER allocation may do). Beyond that the allocation would have to
    wait for swap-out -- possibly our own. Stopping short makes swap writes fail with ENOSPC
    (the kernel keeps those pages, kswapd reclaims elsewhere, and if nothing helps the
    kernel's OOM killer decides); an ordinary write waits a while. Page cache must count:
    writeback of a filesystem on this device must not be refused because the dirty data it is
    cleaning fills RAM. Keeps /proc/meminfo open; :meth:`close` closes it (also done when
    collected), and the guard then judges by free pages alone."""

    def __init__(self, margin: int = 0, zoneinfo: str = "/proc/zoneinfo",
                 meminfo: str = "/proc/meminfo"):
        super().__init__(meminfo, 4096)           # MemAvailable is its third line
        self.floor = min_watermark_bytes(zoneinfo)
        self.margin = margin
        self.refused = 0   # times growth was deferred

    def available(self) -> int:
        """Bytes the kernel can give without swapping (see the class docstring)."""
        free = free_bytes() - self.floor
        try:
            return max(free, self._field(b"MemAvailable:", b"kB") * 1024)
        except (OSError, ValueError):
            return free

    def __call__(self, nbytes: int) -> bool:
        if self.available() - nbytes >= self.margin:
            return True
        self.refused += 1
        return False


class SwapActivity(_KeptOpen):
    """Whether the machine has swapped out since the last call: the kernel's ``pswpout``
    (/proc/vmstat) has advanced. Swapping out is reclaim finding no memory it can drop: every
    unit the store holds unused is then memory the machine needs, as zsmalloc's shrinker
    compacts when reclaim calls it. Keeps /proc/vmstat open; unreadable or closed
    (:meth:`close`, or collected), it says no."""

    def __init__(self, vmstat: str = "/proc/vmstat"):
        super().__init__(vmstat, 16384)           # pswpout is about 75 lines in
        self._last = self.pswpout()

    def pswpout(self) -> int:
        """Pages swapped out since boot (-1 if unreadable)."""
        try:
            return self._field(b"\npswpout ", b"\n")
        except (OSError, ValueError):
            return -1

    def __call__(self) -> bool:
        now = self.pswpout()
        swapped, self._last = now != self._last, now
        return swapped and now >= 0


def set_thread_name(name: str) -> None:
    """The calling thread's kernel name (``comm``, 15 bytes): how ps, tracing and the
    blocked-task dump tell the queue thread apart."""
    buf = C.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, C.addressof(buf), 0, 0, 0)


def set_command_line(words: list[str]) -> None:
    """Show this process as ``words`` in ps, pidof and /proc/PID/cmdline (``ublkzswapd
    num_devices=1`` rather than ``python3 -m ublkzswap.daemon ...``): the kernel's argument
    area (``arg_start``..``arg_end`` in /proc/self/stat) is overwritten in place, the rest of
    it NUL, cut to fit. Python keeps copies of its arguments; nothing reads that memory
    again. Best effort: a process whose area cannot be found keeps its command line."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])      # fields 48 and 49 (from 1)
    except (OSError, ValueError, IndexError):
        return
    n = end - start
    if n <= 1:
        return
    data = b"\0".join(os.fsencode(w) for w in words)[:n - 1]
    C.memmove(start, data + bytes(n - len(data)), n)


def set_io_flusher() -> None:
    """PR_SET_IO_FLUSHER on the calling thread (needs CAP_SYS_RESOURCE); threads it creates
    afterwards, and processes it spawns, inherit it."""
    if _libc.prctl(uapi.PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        raise oserror("prctl(PR_SET_IO_FLUSHER)")


def thread_stack() -> tuple[int, int] | None:
    """(lowest address, size) of the calling thread's stack, or None if glibc cannot say."""
    attr = (C.c_char * 128)()
    if _libc.pthread_getattr_np(_libc.pthread_self(), attr) != 0:
        return None
    addr, size = C.c_void_p(), C.c_size_t()
    try:
        if _libc.pthread_attr_getstack(attr, C.byref(addr), C.byref(size)) == 0 and addr.value:
            return addr.value, size.value
        return None
    finally:
        _libc.pthread_attr_destroy(attr)


def lock_thread_stack() -> None:
    """Fault in and lock the calling thread's whole stack (``mlock`` populates, unlike
    ``mlockall(MCL_ONFAULT)``). Call first thing in every thread of the daemon."""
    stack = thread_stack()
    if stack is None:
        return
    addr, size = stack
    # leave the lowest page alone: it may be the guard page
    if _libc.mlock(C.c_void_p(addr + PAGE_SIZE), C.c_size_t(size - PAGE_SIZE)) != 0:
        raise oserror("mlock(thread stack)")


def reserve_thread_stacks(n: int) -> None:
    """Have ``n`` thread stacks made, faulted in and locked now, for the next ``n`` threads this
    process starts: ``n`` threads lock their stacks (:func:`lock_thread_stack`) at the same
    time and end. glibc keeps the stacks of ended threads (up to 40 MiB) and gives them to new
    threads of the same stack size; a locked stack keeps its pages (glibc's MADV_DONTNEED of
    an ended thread's stack is refused for locked pages). A standby calls this while it
    prepares: a thread it starts while taking devices over then needs no new page, at a time
    when a page found for it might have to be swapped out to a device it has yet to serve."""
    if n <= 0:
        return
    all_up = threading.Barrier(n + 1)

    def hold():
        try:
            lock_thread_stack()
        finally:                 # every stack in use at once: n stacks, not one used n times
            try:
                all_up.wait(60)
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=hold, name="stack", daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        all_up.wait(60)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()


def daemon_thread_init() -> None:
    """What every non-I/O thread of the daemon does first (the arena keeper, the control
    server): lock its stack, so it never faults while holding the GIL."""
    if is_locked():
        lock_thread_stack()


def keeper_thread_init() -> None:
    """What a thread that brings memory in for the store does first: lock its stack and mark
    it PR_SET_IO_FLUSHER. Its allocations then carry no __GFP_IO/__GFP_FS, and the kernel never
    invokes the OOM killer for such an allocation: an arena that cannot grow fails swap
    writes (the kernel keeps those pages and picks its own victim) instead of OOM-killing on
    our behalf -- which, with the daemon itself unkillable and the victims' memory held in our
    arena until the kernel discards their swap, can leave the kernel nothing to kill."""
    daemon_thread_init()
    set_io_flusher()


def is_locked() -> bool:
    """True once :func:`lock_process` ran in this process (VmLck > 0)."""
    try:
        return locked_bytes() > 0
    except OSError:
        return False
