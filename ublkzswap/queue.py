"""One ublk queue: the generic loop between the kernel and a target.

Owns: opening ``/dev/ublkcN`` (:func:`open_cdev`; a device of several queues opens it once
for all of them, since the kernel refuses a second open with EBUSY), mapping the queue's descriptor array (queue ``q_id``'s, at
``uapi.ublk_desc_offset(q_id)``: the kernel places queue q at q x round_up(4096 x 24, 4096)
whatever the depth), the per-tag I/O buffers, FETCH_REQ for every tag, and the serving loop

    submit_and_wait -> reap all ready CQEs -> read their descriptors ->
    handle(request) per tag, or the whole-page READs/WRITEs all at once through the
    target's page_server (its fast path, if it has one) ->
    copy in a ready-made COMMIT_AND_FETCH SQE per tag -> repeat

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

A device has one Queue per hardware queue (:mod:`ublkzswap.ublkdev`), each with its own
thread, cdev fd, descriptor mapping, ring, tag buffers and counters; they share only the
target, which must take calls from several queue threads at once (the store does: see
:mod:`ublkzswap.store`, "Threading"). A queue's commands must all come from its own thread:
the kernel takes them from the thread that FETCHed, and delivers the queue's requests to it.

Memory discipline (../shared/DESIGN.md "Memory and deadlock", :mod:`ublkzswap.memory`):
everything the loop touches is made resident before the device starts (buffers populated
explicitly, the thread's stack locked); the loop itself allocates only small, bounded objects
from the pre-grown heap. Every queue thread marks itself PR_SET_IO_FLUSHER.

Backing I/O (a target's :class:`~ublkzswap.target.BackingIO`) runs as READ/WRITE SQEs on the
same ring, at most ``backing_inflight`` at a time (more wait in a FIFO). io_uring allocates a
request and an ``io_async_rw`` per READ/WRITE with GFP_KERNEL unless its per-ring caches hold
one; the first backing I/O happens when memory is short (memlimit reached), when such an
allocation can enter direct reclaim that only our own swap-out could satisfy, and the machine
freezes. So :meth:`Queue.run`, with every FETCH live, prewarms those caches with
``backing_inflight`` + PREWARM_SPARE concurrent reads of the backing device before arming, and
the bound keeps the loop inside what was prewarmed.

Still naive: no USER_COPY or zero-copy; requests of a batch are handled one after another
in this thread; a queue thread is not pinned to the CPUs its queue serves.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import threading
import sys
import time
import traceback

import numpy as np

from . import uapi
from .handler import Boundary, QueueCounters, describe, finish_backing, request_handler
from .target import optional_op
from .memory import lock_thread_stack, populate, set_io_flusher, set_thread_name
from .uring import Ring

SECTOR_SHIFT = 9
PAGE_SIZE = 4096
PAGE_MASK = 4095       # requests start and end on a 4 KiB boundary (logical block size 4096)
BACKING_IO = 1 << 40   # user_data bit of a backing-swap read/write (FETCH/COMMIT carry the tag only)
PREWARM_IO = 1 << 41   # user_data bit of the start-up reads that fill io_uring's caches
PREWARM_SPARE = 8      # prewarmed beyond the backing bound: io_uring refills requests 8 at a time
#: how a queue's ring is set up: the task work that hands each request over (ublk completes
#: the FETCH command in the queue thread's context) runs when the thread next waits for
#: completions, all of a wake-up's at once, instead of interrupting the thread while it serves
#: (COOP_TASKRUN; DEFER_TASKRUN, which needs SINGLE_ISSUER: the ring is made and used by its
#: queue thread alone). The kernel's own ublk test server (kublk) sets up its rings so.
RING_FLAGS = (uapi.IORING_SETUP_COOP_TASKRUN | uapi.IORING_SETUP_SINGLE_ISSUER
              | uapi.IORING_SETUP_DEFER_TASKRUN)


def make_ring(entries: int, cq_entries: int) -> Ring:
    """A queue's ring, with :data:`RING_FLAGS` (a plain one where the kernel refuses them:
    DEFER_TASKRUN is 6.1's), made in -- and then used only by -- the calling thread."""
    try:
        return Ring(entries, flags=RING_FLAGS, cq_entries=cq_entries)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return Ring(entries, cq_entries=cq_entries)


_spare: list[mmap.mmap] = []


def _buffers(nbytes: int) -> mmap.mmap:
    """A queue's tag buffers: anonymous, resident (and, in a locked process, locked) now."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    populate(np.frombuffer(m, dtype=np.uint8).ctypes.data, nbytes)   # MAP_POPULATE is a no-op
    return m                                                         # under MCL_ONFAULT


def prepare_buffers(count: int, nbytes: int) -> None:
    """Make ``count`` queues' tag buffers of ``nbytes`` now, for queues made later to take: a
    standby takes devices over while the kernel holds their I/O, when taking new memory could
    wait on that very I/O."""
    _spare.extend(_buffers(nbytes) for _ in range(count))


def _take_spare(nbytes: int) -> mmap.mmap | None:
    for i, m in enumerate(_spare):
        if len(m) == nbytes:
            return _spare.pop(i)
    return None


def open_cdev(dev_id: int) -> int:
    """Open ``/dev/ublkcN``, waiting up to 5 s while it is busy (a dead server's file not
    released yet) or not there yet (udev)."""
    path = f"/dev/ublkc{dev_id}"
    for _ in range(100):
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOENT):
                raise
            time.sleep(0.05)
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


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
                 buf_bytes: int = 256 * 1024, backing_fd: int = -1, backing_inflight: int = 32,
                 cdev: int = -1):
        """``backing_fd``: the target's backing device/file (O_DIRECT, >= 4 KiB), read to
        prewarm io_uring's caches; ``backing_inflight`` (<= depth): backing ops in flight.
        ``cdev``: ``/dev/ublkcN`` opened by the device for all its queues (the kernel lets
        the char device be opened once: a second open is EBUSY), which this queue maps and
        names but does not close; -1: the queue opens (and closes) it itself."""
        self.dev_id = dev_id
        self._shared_cdev = cdev
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
        self._bufmap = _take_spare(depth * buf_bytes) or _buffers(depth * buf_bytes)
        self._bufview = memoryview(self._bufmap)
        self.bufs = [self._bufview[t * buf_bytes:(t + 1) * buf_bytes] for t in range(depth)]
        base = np.frombuffer(self._bufmap, dtype=np.uint8).ctypes.data
        self.buf_addrs = base + np.arange(depth, dtype=np.uint64) * np.uint64(buf_bytes)

    def _open_cdev(self) -> int:
        return open_cdev(self.dev_id)

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
            cdev = self._shared_cdev if self._shared_cdev >= 0 else self._open_cdev()
            iod_map = mmap.mmap(cdev, uapi.ublk_desc_len(self.depth),
                                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ,
                                offset=uapi.ublk_desc_offset(self.q_id))
            iod = np.frombuffer(iod_map, dtype=uapi.IO_DESC_DTYPE, count=self.depth)
            ring = make_ring(2 * self.depth, 8 * self.depth)
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
            if cdev >= 0 and cdev != self._shared_cdev:
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
        make = optional_op(self.target, "page_server") if self.buf_bytes >= PAGE_SIZE else None
        fast = make(self.bufs, self._boundary) if make is not None else None
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
        self._loop(ring, iod, handle, self._commit_rows, fast)

    def _loop(self, ring: Ring, iod: np.ndarray, handle, commit_rows: np.ndarray,
              fast=None) -> None:
        """Serve until every tag's command has come back with an error.

        Per wake-up: every ready CQE as Python ints (:meth:`Ring.reap_pairs`), each request's
        descriptor read through word views of the descriptor array, ``handle``, then row ``tag``
        of ``commit_rows`` (a ready-made COMMIT_AND_FETCH SQE) copied in per completed tag with
        its result (:meth:`Ring.put_rows`). Plain ints and memoryviews rather than numpy: a swap
        device wakes for one or two CQEs at a time. A completion carrying BACKING_IO is one op
        of a request's BackingIO; the last one finishes that request.

        ``fast`` (a target's ``page_server``, see :meth:`ublkzswap.store.Store.page_server`):
        the READs and WRITEs of whole pages of a wake-up, well-formed and in range, are
        gathered and handed to it in one call after the others; everything else goes to
        ``handle``."""
        live = self.depth
        end = self.target.size >> SECTOR_SHIFT if fast is not None else -1
        most = self.buf_bytes >> SECTOR_SHIFT
        bufs = self.bufs
        counters = self.counters
        boundary = self._boundary
        desc = memoryview(iod).cast("B")
        d32, d64 = desc.cast("I"), desc.cast("Q")
        rows = memoryview(commit_rows).cast("B")
        result_at = ring.sqes.dtype.fields["io_result"][1]
        OK, ABORT = uapi.UBLK_IO_RES_OK, uapi.UBLK_IO_RES_ABORT
        pending: dict[int, list] = {}   # tag -> [BackingIO, results, ops left, length]
        catch_up = optional_op(self.target, "catch_up")
        while live > 0:
            ring.submit_and_wait(1)
            cqes = ring.reap_pairs()
            if not cqes:
                continue
            if catch_up is not None:
                try:
                    catch_up()
                except Exception as e:
                    boundary(e)
            done = []
            simple = []
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
                opf, nr, start = d32[tag * 6], d32[tag * 6 + 1], d64[tag * 3 + 1]
                op = opf & 0xFF
                if op <= 1 and not (nr | start) & 7 and 0 < nr <= most and start + nr <= end:
                    simple.append((tag, opf, start >> 3, nr >> 3))
                    if op:
                        counters.writes += 1
                    else:
                        counters.reads += 1
                    continue
                r = handle(opf, nr, start, bufs[tag])
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
            if simple:
                n = len(done)
                fast(simple, done)
                for k in range(n, len(done)):
                    if done[k][1] < 0:
                        counters.errors += 1
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
