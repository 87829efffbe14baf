"""The request handler, and the one place where exceptions become errno values.

Owns: :func:`request_handler`, built once per queue: it checks each request's shape (alignment,
length, range; refusals counted as ``invalid_io``, as zram's ``valid_io_request`` does) so that
targets may trust their inputs, and calls the target's method for the op (optional ones looked
up once); :func:`finish_backing`, which completes a request whose backing I/O is done; and
:class:`Boundary`, the exception -> errno rule both go through: ``OSError`` keeps its errno,
anything else is a bug, answered ``-EIO``, counted and logged at a bounded rate. A target can
fail its requests but cannot stop the queue.

Still naive: the handler serves one request at a time; batching is the loop's business.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from . import uapi
from .target import OP_READ, OP_WRITE, BackingIO, optional_op

SECTOR_SHIFT = uapi.SECTOR_SHIFT
PAGE_MASK = 4095       # requests start and end on a 4 KiB boundary (logical block size 4096)
FAULT_LOG_INTERVAL = 10.0   # seconds between two log records of target faults
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
