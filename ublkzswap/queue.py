"""One ublk queue: the generic loop between the kernel and a target.

Owns: opening ``/dev/ublkcN``, mapping the queue's descriptor array, the per-tag I/O
buffers, FETCH_REQ for every tag, and the serving loop

    submit_and_wait -> reap all ready CQEs -> read their descriptors ->
    handle(request) per tag -> copy in a ready-made COMMIT_AND_FETCH SQE per tag -> repeat

with one ``io_uring_enter`` per batch (protocol: ../shared/docs/ublk-protocol.md sections 2-3).
Set-up (FETCH for every tag, the COMMIT templates) is vectorised with numpy; the loop itself
works on Python ints through memoryview word views, because a swap device wakes up for one or
two CQEs at a time, where numpy's fixed cost per call dominates (bench/bench_loop.py).

Between the loop and the target sits the request handler (:func:`request_handler`), built once
per queue: it checks each request's shape (alignment, length, range; refusals counted as
``invalid_io``, as zram's ``valid_io_request`` does) so that targets may trust their inputs,
calls the target's method for the op (optional ones looked up once), and is, with
:func:`finish_backing` for backing-I/O callbacks, inside the one exception -> errno boundary
(:class:`Boundary`): ``OSError`` keeps its errno, anything else is ``-EIO``, counted and logged
at a bounded rate. A target can fail its requests but cannot stop the queue.

The loop (:meth:`Queue.run`) needs of its ring only what :class:`~ublkzswap.uring.Ring` offers
and of the descriptor array only its memory, so a unit test runs it on a ring whose kernel
side it plays (tests/unit/fakering.py); :meth:`Queue.serve` supplies the real ones.

Memory discipline (../shared/DESIGN.md "Memory and deadlock", :mod:`ublkzswap.memory`):
everything the loop touches is made resident before the device starts (buffers populated
explicitly, the thread's stack locked); the loop itself allocates only small, bounded objects
from the pre-grown heap. The queue thread marks itself PR_SET_IO_FLUSHER.

Backing I/O (a target's :class:`~ublkzswap.target.BackingIO`) runs as READ/WRITE SQEs on the
same ring, at most ``backing_inflight`` at a time (more wait in a FIFO). io_uring allocates a
request and an ``io_async_rw`` per READ/WRITE with GFP_KERNEL unless its per-ring caches hold
one; the first backing I/O happens when memory is short (memlimit reached), when such an
allocation can enter direct reclaim that only our own swap-out could satisfy, and the machine
freezes. So :meth:`Queue.run`, with every FETCH live, prewarms those caches with
``backing_inflight`` + PREWARM_SPARE concurrent reads of the backing device before arming, and
the bound keeps the loop inside what was prewarmed.

Still naive: one queue per device; no USER_COPY or zero-copy; requests of a batch are
handled one after another in this thread.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import mmap
import os
import threading
import sys
import time
import traceback

import numpy as np

from . import uapi
from .memory import lock_thread_stack, populate, set_io_flusher
from .target import OP_READ, OP_WRITE, BackingIO, optional_op
from .uring import Ring

SECTOR_SHIFT = 9
PAGE_MASK = 4095       # requests start and end on a 4 KiB boundary (logical block size 4096)
BACKING_IO = 1 << 40   # user_data bit of a backing-swap read/write (FETCH/COMMIT carry the tag only)
PREWARM_IO = 1 << 41   # user_data bit of the start-up reads that fill io_uring's caches
PREWARM_SPARE = 8      # prewarmed beyond the backing bound: io_uring refills requests 8 at a time
FAULT_LOG_INTERVAL = 10.0   # seconds between two log records of target faults
PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger("ublkzswap.queue")


def describe(e: BaseException, tb=None) -> str:
    """``Type: message (file:line)`` of ``e``'s innermost frame (in ``tb``, by default its
    own traceback): the one line of a failure that must survive the kernel log's rate limit
    (10 lines per 5 s from user space)."""
    if tb is None:
        tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    at = f" ({os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{at}"


def set_thread_name(name: str) -> None:
    """The calling thread's kernel name (``comm``, 15 bytes): how ps, tracing and the
    blocked-task dump tell the queue thread apart."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


class QueueCounters:
    """Plain counters kept by the loop (what the queue sees, for targets without their own
    stats): requests by op, the shape refusals (``invalid_io``, as zram counts them), the
    non-OSError exceptions turned into EIO (``faults``), and every negative result."""
    __slots__ = ("reads", "writes", "discards", "flushes", "errors", "invalid_io", "faults",
                 "batches", "requests")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class Boundary:
    """The one exception -> errno rule for everything a queue runs on a target's behalf (its
    request methods and its :class:`~ublkzswap.target.BackingIO` callbacks).

    ``boundary(e)`` returns the result to commit: ``OSError`` -> ``-errno`` (``-EIO`` when it
    has none); anything else is a bug in the target -> ``-EIO``, counted in ``faults`` and
    logged as :func:`describe` gives it to ``log`` ("ublkzswap.queue"), at most one record per
    ``interval`` seconds, carrying the number left out since the previous one. The bound keeps
    a failing target from flooding the kernel log (and from making the I/O path allocate per
    request); a swap device that fails every I/O still says why once. ``e`` leaves without its
    traceback, whose frames hold views of the tag buffers: a target that keeps its exceptions
    must not pin them (the queue could not unmap its buffers).
    """
    __slots__ = ("counters", "where", "interval", "_logged_at", "_suppressed")

    def __init__(self, counters: QueueCounters, where: str = "queue",
                 interval: float = FAULT_LOG_INTERVAL):
        self.counters = counters
        self.where = where
        self.interval = interval
        self._logged_at = -interval - 1.0
        self._suppressed = 0

    def __call__(self, e: Exception) -> int:
        tb = e.__traceback__
        e.__traceback__ = None
        if isinstance(e, OSError):
            err = e.errno
            if err is None:
                return -errno.EIO
            if type(err) is int and 0 < err < 4096:
                return -err
            # an errno the kernel could not take (negative, huge): a bug like any other
        self.counters.faults += 1
        now = time.monotonic()
        if now - self._logged_at < self.interval:
            self._suppressed += 1
            return -errno.EIO
        try:
            what = describe(e, tb)
        except Exception:   # a broken __str__ must not take the queue down with it
            what = type(e).__name__
        more = f" ({self._suppressed} more since the last record)" if self._suppressed else ""
        log.error("%s: %s; the request fails with EIO%s", self.where, what, more)
        self._logged_at = now
        self._suppressed = 0
        return -errno.EIO


def request_handler(target, max_bytes: int, counters: QueueCounters | None = None,
                    boundary: Boundary | None = None):
    """The request handler for ``target``: ``handle(op_flags, nr_sectors, start_sector, buf)``
    returns bytes done (>= 0) or ``-errno``, or the target's
    :class:`~ublkzswap.target.BackingIO` when it needs I/O done first. ``buf`` is the tag's
    I/O buffer, ``max_bytes`` long (the most a READ/WRITE may move).

    The target's methods are looked up here, once: a missing optional one
    (:func:`~ublkzswap.target.optional_op`) answers its op with ``-EOPNOTSUPP`` (FLUSH: 0),
    so an ``AttributeError`` raised inside a target is a fault like any other.

    The request's shape is checked here, once, as zram's ``valid_io_request`` does, so that
    targets may trust it: READ, WRITE, DISCARD and WRITE_ZEROES must start and end on a 4 KiB
    boundary and not be empty, and READ/WRITE must fit the buffer (``-EINVAL``); the range must
    lie within ``target.size`` (``-EIO``, what the block layer answers for I/O beyond the end of
    a device). Each refusal counts in ``counters.invalid_io``. Everything the target runs is
    inside ``boundary``.

    The checks are made on the descriptor's sector numbers, before any bytes are computed: a
    test that yields a small int costs the loop no allocation.
    """
    if counters is None:
        counters = QueueCounters()
    if boundary is None:
        boundary = Boundary(counters)
    sectors = target.size >> SECTOR_SHIFT
    max_sectors = max_bytes >> SECTOR_SHIFT
    read, write = target.read, target.write
    write_swap = optional_op(target, "write_swap") or write
    flush = optional_op(target, "flush")
    frees = {uapi.UBLK_IO_OP_DISCARD: optional_op(target, "discard"),
             uapi.UBLK_IO_OP_WRITE_ZEROES: optional_op(target, "write_zeroes")}
    SWAP = uapi.UBLK_IO_F_SWAP
    assert (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE, PAGE_MASK >> SECTOR_SHIFT) == (0, 1, 7)

    def other(op: int, nr_sectors: int, start_sector: int) -> int:
        """Every request but a well-formed READ/WRITE."""
        if op == uapi.UBLK_IO_OP_FLUSH:
            if flush is not None:
                flush()
            return 0
        free = frees.get(op) if op > 1 else None
        if op > 1 and free is None:
            return -errno.EOPNOTSUPP
        if start_sector & 7 or nr_sectors & 7 or not nr_sectors or (op <= 1 and nr_sectors > max_sectors):
            counters.invalid_io += 1
            return -errno.EINVAL
        if start_sector + nr_sectors > sectors:
            counters.invalid_io += 1
            return -errno.EIO
        # here only DISCARD / WRITE_ZEROES: a READ/WRITE that passed these came the fast way
        free(start_sector << SECTOR_SHIFT, nr_sectors << SECTOR_SHIFT)
        return 0

    def handle(op_flags: int, nr_sectors: int, start_sector: int, buf: memoryview):
        op = op_flags & 0xFF
        try:
            if (op <= 1 and not (start_sector & 7 or nr_sectors & 7)
                    and 0 < nr_sectors <= max_sectors and start_sector + nr_sectors <= sectors):
                offset = start_sector << SECTOR_SHIFT
                length = nr_sectors << SECTOR_SHIFT
                if op == 0:
                    pending = read(offset, buf[:length])
                elif op_flags & SWAP:
                    pending = write_swap(offset, buf[:length])
                else:
                    pending = write(offset, buf[:length])
                return length if pending is None else _checked(pending, length)
            return other(op, nr_sectors, start_sector)
        except Exception as e:
            return boundary(e)

    return handle


def _checked(pending, length: int):
    """``pending`` (what a target's read/write returned) if it is a well-formed BackingIO for
    a request of ``length`` bytes; raises otherwise. One without ops is finished here."""
    if not isinstance(pending, BackingIO):
        raise TypeError(f"a target returned {type(pending).__name__}, not None or BackingIO")
    if not pending.ops:
        pending.done([])
        return length
    for op, fd, boff, n, foff in pending.ops:
        if op not in (OP_READ, OP_WRITE) or boff < 0 or n <= 0 or boff + n > length or foff < 0:
            raise ValueError(f"BackingIO op {(op, fd, boff, n, foff)} does not fit "
                             f"a {length}-byte request")
    return pending


def finish_backing(pending: BackingIO, results: list[int], length: int, boundary: Boundary) -> int:
    """The result to commit for a request whose backing ops all completed with ``results``:
    ``length`` if ``pending.done`` accepts them, else its error through ``boundary``."""
    try:
        pending.done(results)
        return length
    except Exception as e:
        return boundary(e)


class Queue:
    """Queue ``q_id`` of ublk device ``dev_id``, serving ``target``.

    Life: construct (allocates and populates buffers; no kernel contact) -> run :meth:`serve`
    in the queue thread -> :attr:`armed` is set once every tag has its FETCH (then the
    controller may issue START_DEV) -> STOP_DEV makes every command come back with -ENODEV,
    :meth:`serve` returns and closes everything. :meth:`serve` is the kernel plumbing around
    :meth:`run`, which serves on any ring and descriptor memory it is given.

    :attr:`counters` (:class:`QueueCounters`) are written by the queue thread only; readers
    elsewhere see plain ints, possibly a batch behind.
    """

    def __init__(self, dev_id: int, target, *, q_id: int = 0, depth: int = 64,
                 buf_bytes: int = 256 * 1024, backing_fd: int = -1, backing_inflight: int = 32):
        """``backing_fd``: the target's backing device/file (O_DIRECT, >= 4 KiB), read to
        prewarm io_uring's caches; ``backing_inflight`` (<= depth): backing ops in flight."""
        self.dev_id = dev_id
        self.backing_fd = backing_fd
        self.backing_inflight = max(1, min(backing_inflight, depth))
        self._waiting: collections.deque = collections.deque()   # backing ops beyond the bound
        self._inflight = 0                                       # backing ops in flight
        self.q_id = q_id
        self.depth = depth
        self.buf_bytes = buf_bytes
        self.target = target
        self.counters = QueueCounters()
        self._boundary = Boundary(self.counters, f"queue {q_id} of device {dev_id}")
        self.armed = threading.Event()
        self.error: BaseException | None = None
        self._bufmap = mmap.mmap(-1, depth * buf_bytes,
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        self._bufview = memoryview(self._bufmap)
        self.bufs = [self._bufview[t * buf_bytes:(t + 1) * buf_bytes] for t in range(depth)]
        base = np.frombuffer(self._bufmap, dtype=np.uint8).ctypes.data
        populate(base, depth * buf_bytes)   # MAP_POPULATE is a no-op under MCL_ONFAULT
        self.buf_addrs = base + np.arange(depth, dtype=np.uint64) * np.uint64(buf_bytes)

    def _open_cdev(self) -> int:
        path = f"/dev/ublkc{self.dev_id}"
        for _ in range(100):
            try:
                return os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOENT):
                    raise
                time.sleep(0.05)
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def _fill(self, ring: Ring, cmd_op: int, cdev: int, tags: np.ndarray, results) -> None:
        idx = ring.claim(len(tags))
        s = ring.sqes
        s["opcode"][idx] = uapi.IORING_OP_URING_CMD
        s["fd"][idx] = cdev
        s["cmd_op"][idx] = cmd_op
        s["user_data"][idx] = tags
        s["io_q_id"][idx] = self.q_id
        s["io_tag"][idx] = tags
        s["io_result"][idx] = results
        s["io_addr"][idx] = self.buf_addrs[tags]

    def serve(self) -> None:
        """The queue thread's body: open ``/dev/ublkcN``, map the descriptor array, create the
        ring and :meth:`run` on them. Returns when the device is stopped (or on a fatal error,
        kept in :attr:`error`)."""
        cdev = -1
        ring = iod_map = None
        try:
            set_thread_name(f"ublkq{self.dev_id}:{self.q_id}")
            set_io_flusher()
            lock_thread_stack()
            cdev = self._open_cdev()
            iod_map = mmap.mmap(cdev, uapi.ublk_desc_len(self.depth),
                                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                                offset=uapi.ublk_desc_offset(self.q_id))
            iod = np.frombuffer(iod_map, dtype=uapi.IO_DESC_DTYPE, count=self.depth)
            ring = Ring(2 * self.depth, cq_entries=8 * self.depth)
            self.run(ring, iod, cdev)
        except BaseException as e:  # reported to the controller, never silently lost
            self.error = e
            if self.armed.is_set():   # serving had begun: nobody is waiting to hear of it
                sys.stderr.write(f"ublkzswapd: queue {self.q_id} of device {self.dev_id} failed "
                                 f"({describe(e)}); its I/O now fails\n"
                                 + "".join(traceback.format_exception(e)))
                sys.stderr.flush()
            self.armed.set()
        finally:
            if ring is not None:
                ring.close()
            if iod_map is not None:
                try:
                    iod_map.close()
                except BufferError:
                    pass
            if cdev >= 0:
                os.close(cdev)

    def run(self, ring: Ring, iod: np.ndarray, cdev: int) -> None:
        """Serve on ``ring``: FETCH every tag, prewarm (with a backing fd), set :attr:`armed`,
        then loop until every tag's command has come back with an error (-ENODEV on STOP_DEV).

        ``ring`` is a :class:`~ublkzswap.uring.Ring` (of at least ``2 * depth`` SQEs) or one
        built the same way over memory a test owns; ``iod`` the queue's descriptor array
        (``depth`` entries of ``uapi.IO_DESC_DTYPE``, or anything with that memory layout);
        ``cdev`` the fd the io commands name. Raises what the ring raises; a target's
        exceptions end at the request handler's boundary."""
        handle = request_handler(self.target, self.buf_bytes, self.counters, self._boundary)
        all_tags = np.arange(self.depth, dtype=np.uint16)
        self._fill(ring, uapi.UBLK_U_IO_FETCH_REQ, cdev, all_tags, 0)
        # one ready COMMIT_AND_FETCH SQE per tag: committing is then a row copy + result
        self._commit_rows = np.zeros((self.depth, ring.sqe_size), dtype=np.uint8)
        c = self._commit_rows.view(ring.sqes.dtype).reshape(self.depth)
        c["opcode"] = uapi.IORING_OP_URING_CMD
        c["fd"] = cdev
        c["cmd_op"] = uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ
        c["user_data"] = all_tags
        c["io_q_id"] = self.q_id
        c["io_tag"] = all_tags
        c["io_addr"] = self.buf_addrs
        ring.submit()
        if self.backing_fd >= 0:
            # with every FETCH live, so that the requests prewarmed are spare ones
            self._prewarm(ring, self.backing_fd, min(self.depth, self.backing_inflight + PREWARM_SPARE))
        self.armed.set()
        self._loop(ring, iod, handle, self._commit_rows)

    def _loop(self, ring: Ring, iod: np.ndarray, handle, commit_rows: np.ndarray) -> None:
        """Serve until every tag's command has come back with an error.

        Per wake-up: every ready CQE as Python ints (:meth:`Ring.reap_pairs`), each request's
        descriptor read through word views of the descriptor array, ``handle``, then row ``tag``
        of ``commit_rows`` (a ready-made COMMIT_AND_FETCH SQE) copied in per completed tag with
        its result (:meth:`Ring.put_rows`). Plain ints and memoryviews rather than numpy: a swap
        device wakes for one or two CQEs at a time. A completion carrying BACKING_IO is one op
        of a request's BackingIO; the last one finishes that request."""
        live = self.depth
        bufs = self.bufs
        counters = self.counters
        boundary = self._boundary
        desc = memoryview(iod).cast("B")
        d32, d64 = desc.cast("I"), desc.cast("Q")
        rows = memoryview(commit_rows).cast("B")
        result_at = ring.sqes.dtype.fields["io_result"][1]
        OK, ABORT = uapi.UBLK_IO_RES_OK, uapi.UBLK_IO_RES_ABORT
        pending: dict[int, list] = {}   # tag -> [BackingIO, results, ops left, length]
        while live > 0:
            ring.submit_and_wait(1)
            cqes = ring.reap_pairs()
            if not cqes:
                continue
            done = []
            requests = 0
            for ud, res in cqes:
                if ud & BACKING_IO:
                    self._inflight -= 1
                    tag = (ud >> 16) & 0xFFFF
                    p = pending[tag]
                    p[1][ud & 0xFFFF] = res
                    p[2] -= 1
                    if p[2] == 0:
                        del pending[tag]
                        r = finish_backing(p[0], p[1], p[3], boundary)
                        if r < 0:
                            counters.errors += 1
                        done.append((tag, r))
                    continue
                tag = ud & 0xFFFF
                if res != OK:
                    live -= 1   # -ENODEV: queue going away; other <0: rejected
                    if res != ABORT:
                        counters.errors += 1
                    continue
                requests += 1
                opf, nr = d32[tag * 6], d32[tag * 6 + 1]
                r = handle(opf, nr, d64[tag * 3 + 1], bufs[tag])
                op = opf & 0xFF
                if op == 0:
                    counters.reads += 1
                elif op == 1:
                    counters.writes += 1
                elif op == 2:
                    counters.flushes += 1
                else:
                    counters.discards += 1
                if type(r) is not int:
                    pending[tag] = [r, [0] * len(r.ops), len(r.ops), nr << SECTOR_SHIFT]
                    self._submit_backing(ring, tag, r.ops)
                    continue
                if r < 0:
                    counters.errors += 1
                done.append((tag, r))
            if requests:
                counters.batches += 1
                counters.requests += requests
            if self._waiting:
                self._submit_waiting(ring)
            if done:
                self._claim_room(ring, len(done))
                ring.put_rows(rows, done, result_at)

    @staticmethod
    def _claim_room(ring: Ring, n: int) -> None:
        if ring.sq_space() < n:
            ring.submit()

    def _submit_backing(self, ring: Ring, tag: int, ops) -> None:
        """Queue a request's backing-swap reads/writes on this queue's ring (their CQEs carry
        BACKING_IO | tag << 16 | op index), at most ``backing_inflight`` in flight: the rest
        wait, in order, for earlier ones to complete."""
        base = int(self.buf_addrs[tag])
        self._waiting.extend((BACKING_IO | (tag << 16) | i, op, fd, base + boff, length, foff)
                             for i, (op, fd, boff, length, foff) in enumerate(ops))
        self._submit_waiting(ring)

    def _submit_waiting(self, ring: Ring) -> None:
        n = min(len(self._waiting), self.backing_inflight - self._inflight)
        if n <= 0:
            return
        self._claim_room(ring, n)
        idx = ring.claim(n)
        s = ring.sqes
        for j in idx.tolist():
            ud, op, fd, addr, length, foff = self._waiting.popleft()
            s["opcode"][j] = uapi.IORING_OP_READ if op == 0 else uapi.IORING_OP_WRITE
            s["fd"][j] = fd
            s["addr"][j] = addr
            s["len"][j] = length
            s["cmd_op"][j] = foff & 0xFFFFFFFF
            s["pad1"][j] = foff >> 32
            s["user_data"][j] = ud
        self._inflight += n

    def _prewarm(self, ring: Ring, fd: int, n: int) -> None:
        """``n`` concurrent 4 KiB reads of ``fd`` at offset 0 (into the first ``n`` tag
        buffers: FETCH is armed but the device not started, so no request uses them): io_uring
        allocates a request and async rw state for each and keeps them in its per-ring caches,
        so that later backing I/O (fewer than ``n`` in flight) takes them from there instead of
        allocating under memory pressure. The requests must be allocated while every FETCH is
        live: allocated before them, they are what the FETCHes take from the cache."""
        idx = ring.claim(n)
        s = ring.sqes
        s["opcode"][idx] = uapi.IORING_OP_READ
        s["fd"][idx] = fd
        s["addr"][idx] = self.buf_addrs[:n]
        s["len"][idx] = 4096
        s["user_data"][idx] = PREWARM_IO | np.arange(n, dtype=np.uint64)
        got = 0
        while got < n:
            ring.submit_and_wait(1)
            for ud, res in ring.reap_pairs():
                if not ud & PREWARM_IO:
                    raise OSError(-res if res < 0 else errno.EPROTO,
                                  f"queue {self.q_id}: command for tag {ud & 0xFFFF} completed "
                                  f"before the device started ({res})")
                if res < 0:
                    raise OSError(-res, f"backing swap: prewarm read failed: {os.strerror(-res)}")
                got += 1

    def close(self) -> None:
        self.bufs = []
        self._bufview.release()
        self._bufmap.close()
