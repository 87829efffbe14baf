"""One ublk queue: the generic loop between the kernel and a target.

Owns: opening ``/dev/ublkcN``, mapping the queue's descriptor array, the per-tag I/O
buffers, FETCH_REQ for every tag, and the serving loop

    submit_and_wait -> reap all ready CQEs -> read their descriptors ->
    handle_request() per tag -> copy in a ready-made COMMIT_AND_FETCH SQE per tag -> repeat

with one ``io_uring_enter`` per batch. Set-up (FETCH for every tag, the COMMIT templates) is
vectorised with numpy; the loop itself works on Python ints through memoryview word views,
because a swap device wakes up for one or two CQEs at a time and numpy's fixed cost per call
was ten times the rest of the loop there (bench/bench_loop.py). :func:`handle_request` is the request handler: a plain
function of (descriptor fields, buffer, target) returning bytes done or ``-errno``, and the
single place where exceptions become errno values.

Memory discipline (DESIGN.md "Memory and deadlock", :mod:`ublkzswap.memory`): everything the
loop touches is made resident before the device starts (buffers populated explicitly, the
thread's stack locked); the loop itself allocates only small, bounded objects
from the pre-grown heap. The queue thread marks itself PR_SET_IO_FLUSHER.

Backing I/O (a target's :class:`~ublkzswap.target.BackingIO`) runs as READ/WRITE SQEs on the
same ring, at most ``backing_inflight`` at a time (more wait in a FIFO). io_uring allocates a
request and an ``io_async_rw`` per READ/WRITE with GFP_KERNEL unless its per-ring caches hold
one; the first backing I/O happens when memory is short (memlimit reached), so an allocation
then enters direct reclaim that only our own swap-out could satisfy: the machine freezes
(seen in CI: ``io_prep_rw -> io_alloc_async_data -> kmalloc -> try_to_free_pages``). So
:meth:`serve`, with every FETCH live, prewarms those caches with ``backing_inflight`` +
PREWARM_SPARE concurrent reads of the backing device before arming, and the bound keeps the
loop inside what was prewarmed.

Still naive: one queue per device; no USER_COPY or zero-copy; requests of a batch are
handled one after another in this thread.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import threading
import sys
import time
import traceback

import numpy as np

from . import uapi
from .memory import lock_thread_stack, populate, set_io_flusher
from .target import features
from .uring import Ring

SECTOR_SHIFT = 9
BACKING_IO = 1 << 40   # user_data bit of a backing-swap read/write (FETCH/COMMIT carry the tag only)
PREWARM_IO = 1 << 41   # user_data bit of the start-up reads that fill io_uring's caches
PREWARM_SPARE = 8      # prewarmed beyond the backing bound: io_uring refills requests 8 at a time
PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def describe(e: BaseException) -> str:
    """``Type: message (file:line)`` of ``e``'s innermost frame: the one line of a failure
    that must survive the kernel log's rate limit (10 lines per 5 s from user space)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    at = f" ({os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{at}"


def set_thread_name(name: str) -> None:
    """The calling thread's kernel name (``comm``, 15 bytes): how ps, tracing and the
    blocked-task dump tell the queue thread apart."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def handle_request(op_flags: int, nr_sectors: int, start_sector: int, buf: memoryview,
                   target) -> int:
    """Serve one block request on ``target``; return bytes done (>= 0) or ``-errno``, or the
    target's :class:`~ublkzswap.target.BackingIO` when it needs I/O done first.

    ``buf`` is the tag's whole I/O buffer. This is the one exception -> errno boundary:
    ``OSError`` keeps its errno, anything else becomes ``-EIO``.
    """
    op = op_flags & 0xFF
    offset = start_sector << SECTOR_SHIFT
    length = nr_sectors << SECTOR_SHIFT
    try:
        if op == uapi.UBLK_IO_OP_FLUSH:
            flush = getattr(target, "flush", None)
            if flush is not None:
                flush()
            return 0
        if offset + length > target.size:
            return -errno.EIO
        if op == uapi.UBLK_IO_OP_READ:
            if length > len(buf):
                return -errno.EINVAL
            pending = target.read(offset, buf[:length])
            return length if pending is None else pending
        if op == uapi.UBLK_IO_OP_WRITE:
            if length > len(buf):
                return -errno.EINVAL
            if op_flags & uapi.UBLK_IO_F_SWAP:
                write_swap = getattr(target, "write_swap", None)
                if write_swap is not None:
                    pending = write_swap(offset, buf[:length])
                    return length if pending is None else pending
            pending = target.write(offset, buf[:length])
            return length if pending is None else pending
        if op == uapi.UBLK_IO_OP_DISCARD:
            target.discard(offset, length)
            return 0
        if op == uapi.UBLK_IO_OP_WRITE_ZEROES:
            target.write_zeroes(offset, length)
            return 0
        return -errno.EOPNOTSUPP
    except OSError as e:
        return -(e.errno or errno.EIO)
    except AttributeError:
        return -errno.EOPNOTSUPP
    except Exception:
        return -errno.EIO


class QueueCounters:
    """Plain request counters kept by the loop (for targets without their own stats)."""
    __slots__ = ("reads", "writes", "discards", "flushes", "errors", "batches", "requests")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class Queue:
    """Queue ``q_id`` of ublk device ``dev_id``, serving ``target``.

    Life: construct (allocates and populates buffers; no kernel contact) -> run :meth:`serve`
    in the queue thread -> :attr:`armed` is set once every tag has its FETCH (then the
    controller may issue START_DEV) -> STOP_DEV makes every command come back with -ENODEV,
    :meth:`serve` returns and closes everything.
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
        self.armed = threading.Event()
        self.error: BaseException | None = None
        self._bufmap = mmap.mmap(-1, depth * buf_bytes,
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        self._bufview = memoryview(self._bufmap)
        self.bufs = [self._bufview[t * buf_bytes:(t + 1) * buf_bytes] for t in range(depth)]
        base = np.frombuffer(self._bufmap, dtype=np.uint8).ctypes.data
        populate(base, depth * buf_bytes)   # MAP_POPULATE is a no-op under MCL_ONFAULT
        self.buf_addrs = base + np.arange(depth, dtype=np.uint64) * np.uint64(buf_bytes)

    @property
    def features(self) -> set[str]:
        return features(self.target)

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
        """The queue thread's body. Returns when the device is stopped (or on a fatal error,
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
            self._loop(ring, iod, cdev)
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

    def _loop(self, ring: Ring, iod: np.ndarray, cdev: int) -> None:
        """Serve until every tag's command has come back with an error (-ENODEV on STOP_DEV).

        Per wake-up: every ready CQE as Python ints (:meth:`Ring.reap_pairs`), each request's
        descriptor read through word views of the descriptor array, the handler, then one
        ready-made COMMIT_AND_FETCH row copied per completed tag (:meth:`Ring.put_rows`).
        Plain ints and memoryviews rather than numpy here: a swap device wakes for one or two
        CQEs at a time, where numpy's per-call overhead was 10x the rest of the loop."""
        live = self.depth
        target = self.target
        bufs = self.bufs
        counters = self.counters
        desc = memoryview(iod).cast("B")
        d32, d64 = desc.cast("I"), desc.cast("Q")
        rows = memoryview(self._commit_rows).cast("B")
        result_at = ring.sqes.dtype.fields["io_result"][1]
        OK, ABORT = uapi.UBLK_IO_RES_OK, uapi.UBLK_IO_RES_ABORT
        pending: dict[int, list] = {}
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
                        try:
                            p[0].done(p[1])
                            rr = p[3]
                        except OSError as e:
                            rr = -(e.errno or errno.EIO)
                            counters.errors += 1
                        done.append((tag, rr))
                    continue
                tag = ud & 0xFFFF
                if res != OK:
                    live -= 1   # -ENODEV: queue going away; other <0: rejected
                    if res != ABORT:
                        counters.errors += 1
                    continue
                requests += 1
                opf, nr = d32[tag * 6], d32[tag * 6 + 1]
                r = handle_request(opf, nr, d64[tag * 3 + 1], bufs[tag], target)
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
        live: prewarmed before the FETCHes, they were all taken by them (the allocation trace
        caught ``alloc_slab_obj_exts`` under io_uring's request refill)."""
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
