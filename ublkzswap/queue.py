"""One ublk queue: the generic loop between the kernel and a target.

Owns: opening ``/dev/ublkcN``, mapping the queue's descriptor array, the per-tag I/O
buffers, FETCH_REQ for every tag, and the serving loop

    submit_and_wait -> reap all ready CQEs -> read their descriptors (numpy) ->
    handle_request() per tag -> fill all COMMIT_AND_FETCH SQEs (numpy) -> repeat

with one ``io_uring_enter`` per batch. :func:`handle_request` is the request handler: a plain
function of (descriptor fields, buffer, target) returning bytes done or ``-errno``, and the
single place where exceptions become errno values.

Memory discipline (DESIGN.md "Memory and deadlock", :mod:`ublkzswap.memory`): everything the
loop touches is made resident before the device starts (buffers populated explicitly, the
thread's stack locked); the loop itself allocates only small, bounded objects
from the pre-grown heap. The queue thread marks itself PR_SET_IO_FLUSHER.

Still naive: one queue per device; no USER_COPY or zero-copy; requests of a batch are
handled one after another in this thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time

import numpy as np

from . import uapi
from .memory import lock_thread_stack, populate, set_io_flusher
from .target import features
from .uring import Ring

SECTOR_SHIFT = 9
BACKING_IO = 1 << 40   # user_data bit of a backing-swap read/write (FETCH/COMMIT carry the tag only)
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
                 buf_bytes: int = 256 * 1024):
        self.dev_id = dev_id
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
            self.armed.set()
            self._loop(ring, iod, cdev)
        except BaseException as e:  # reported to the controller, never silently lost
            self.error = e
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
        live = self.depth
        target = self.target
        bufs = self.bufs
        counters = self.counters
        results = np.zeros(self.depth, dtype=np.int32)
        ctags = np.zeros(self.depth, dtype=np.uint16)
        pending: dict[int, list] = {}
        while live > 0:
            ring.submit_and_wait(1)
            cqes = ring.reap()
            if not len(cqes):
                continue
            ud = cqes["user_data"]
            res = cqes["res"]
            nc = 0
            if pending:
                back = (ud & BACKING_IO) != 0
                if back.any():
                    for u, r in zip(ud[back].tolist(), res[back].tolist()):
                        tag = (u >> 16) & 0xFFFF
                        p = pending[tag]
                        p[1][u & 0xFFFF] = r
                        p[2] -= 1
                        if p[2] == 0:
                            del pending[tag]
                            try:
                                p[0].done(p[1])
                                rr = p[3]
                            except OSError as e:
                                rr = -(e.errno or errno.EIO)
                                counters.errors += 1
                            ctags[nc] = tag
                            results[nc] = rr
                            nc += 1
                    ud = ud[~back]
                    res = res[~back]
            tags = (ud & 0xFFFF).astype(np.uint16)
            ok = res == uapi.UBLK_IO_RES_OK
            if not ok.all():
                live -= int((~ok).sum())   # -ENODEV: queue going away; other <0: rejected
                counters.errors += int((~ok & (res != uapi.UBLK_IO_RES_ABORT)).sum())
                tags = tags[ok]
            if len(tags):
                counters.batches += 1
                counters.requests += len(tags)
                for tag, (opf, nr, start, _addr) in zip(tags.tolist(), iod[tags].tolist()):
                    r = handle_request(opf, nr, start, bufs[tag], target)
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
                    ctags[nc] = tag
                    results[nc] = r
                    nc += 1
            if nc:
                self._claim_room(ring, nc)
                idx = ring.claim(nc, zero=False)
                ring.sqe_rows[idx] = self._commit_rows[ctags[:nc]]
                ring.sqes["io_result"][idx] = results[:nc]

    @staticmethod
    def _claim_room(ring: Ring, n: int) -> None:
        if ring.sq_space() < n:
            ring.submit()

    def _submit_backing(self, ring: Ring, tag: int, ops) -> None:
        """Queue a request's backing-swap reads/writes on this queue's ring; their CQEs carry
        BACKING_IO | tag << 16 | op index."""
        self._claim_room(ring, len(ops))
        idx = ring.claim(len(ops))
        s = ring.sqes
        base = int(self.buf_addrs[tag])
        for i, (j, (op, fd, boff, length, foff)) in enumerate(zip(idx.tolist(), ops)):
            s["opcode"][j] = uapi.IORING_OP_READ if op == 0 else uapi.IORING_OP_WRITE
            s["fd"][j] = fd
            s["addr"][j] = base + boff
            s["len"][j] = length
            s["cmd_op"][j] = foff & 0xFFFFFFFF
            s["pad1"][j] = foff >> 32
            s["user_data"][j] = BACKING_IO | (tag << 16) | i

    def close(self) -> None:
        self.bufs = []
        self._bufview.release()
        self._bufmap.close()
