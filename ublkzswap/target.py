"""The target contract, and the simple targets that prove the data path.

Owns: what a queue may ask of whatever stores the device's bytes.

A *target* is any object with

- ``size``: device size in bytes (a multiple of 4096);
- ``read(offset, buf)``: fill the writable memoryview ``buf`` with ``len(buf)`` bytes
  starting at byte ``offset``;
- ``write(offset, buf)``: store the bytes of ``buf`` at ``offset``;

and optionally

- ``discard(offset, length)``: the range no longer holds data (reads give zeros);
- ``write_zeroes(offset, length)``: the range reads as zeros from now on;
- ``flush()``: make earlier writes durable (a RAM target has nothing to do);
- ``write_swap(offset, buf)``: a swap-out (``UBLK_IO_F_SWAP``), called instead of
  ``write`` when present. The kernel keeps a swap page whose write failed and retries it,
  so this may fail fast (ENOSPC) where ``write`` must wait for memory: a failed ordinary
  write is data lost;
- ``catch_up()``: called by each queue once per wake-up, after its completions are reaped
  and before any of its requests is served (the store applies the swap slots the kernel
  freed meanwhile, :mod:`ublkzswap.slotfree`). It must not block on I/O.

``read`` and ``write`` normally return None (done). A target that needs I/O on another
file first (the store's backing swap) returns a :class:`BackingIO` instead: the queue runs
its operations through its own io_uring, so that other requests keep being served
meanwhile, and completes the request with what ``BackingIO.done`` says.

A missing optional method (:func:`optional_op`: absent, or not callable) means the feature
is not advertised to the kernel (:func:`features`) and the queue answers the op itself
(``-EOPNOTSUPP``; FLUSH: done). Offsets and lengths arrive in bytes, checked once by the
queue's request handler: page-aligned (4096), not empty, within ``size``, and for
``read``/``write`` no longer than the tag's buffer, so a target need not check them again. A
target reports failure by raising ``OSError(errno, ...)`` (``ENOSPC`` for "full, try later",
``EIO``, ...). Any other exception (``AttributeError`` included) is a bug: it becomes ``-EIO``
and a rate-limited log record at the one exception -> errno boundary in
:mod:`ublkzswap.queue`, which also guards ``BackingIO.done``. Targets never see descriptors,
tags or rings.

The compressed store (:class:`ublkzswap.store.Store`) implements the same
contract. ``RamTarget`` keeps plain bytes in one locked numpy array sized up
front; ``NullTarget`` answers without touching data and exists only to
measure the cost of the round trip itself.

Still naive: ``RamTarget`` reserves its whole size at start (that is the
point of it: no allocation on the I/O path, no compression).
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .memory import populate
from .uapi import PAGE_SIZE


OPTIONAL_OPS = ("discard", "write_zeroes", "flush")   # advertised as features


OP_READ, OP_WRITE = 0, 1


@dataclass
class BackingIO:
    """I/O a target needs done before its request completes.

    ``ops``: (OP_READ or OP_WRITE, fd, offset of the data in the request's buffer, length,
    file offset); each op lies within the request's data (checked by the queue). ``done(results)``
    gets each op's result (bytes or -errno) in order and returns None on success or raises
    OSError; the request then completes with its full length (or that errno). ``done`` runs
    inside the queue's exception boundary like the target's methods."""
    ops: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    done: Callable[[list[int]], None] = lambda results: None


def run_backing_io(pending: BackingIO, buf: memoryview) -> None:
    """Carry out ``pending`` synchronously against ``buf`` (the request's data): the path for
    targets used without a queue. Raises what ``pending.done`` raises."""
    results = []
    for op, fd, boff, length, foff in pending.ops:
        view = buf[boff:boff + length]
        try:
            if op == OP_READ:
                results.append(os.preadv(fd, [view], foff))
            else:
                results.append(os.pwritev(fd, [view], foff))
        except OSError as e:
            results.append(-(e.errno or errno.EIO))
    pending.done(results)


def optional_op(target, name: str) -> Callable | None:
    """``target``'s optional method ``name`` (one of OPTIONAL_OPS or ``write_swap``), or None
    when it has none: looked up once, never by catching AttributeError from a call."""
    fn = getattr(target, name, None)
    return fn if callable(fn) else None


def features(target) -> set[str]:
    """Names of the optional operations ``target`` implements."""
    return {name for name in OPTIONAL_OPS if optional_op(target, name) is not None}


class RamTarget:
    """Uncompressed RAM: one anonymous mapping of ``size`` bytes, zero-filled.

    The mapping is created once and viewed as a numpy array, so the I/O path
    only copies between views (one C call per request).
    """

    def __init__(self, size: int):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size must be a positive multiple of {PAGE_SIZE}, got {size}")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._mem = np.frombuffer(self._map, dtype=np.uint8)
        populate(self._mem.ctypes.data, size)   # resident now, never on the I/O path

    def read(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        np.frombuffer(buf, dtype=np.uint8)[:] = self._mem[offset:offset + n]

    def write(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        self._mem[offset:offset + n] = np.frombuffer(buf, dtype=np.uint8)

    def discard(self, offset: int, length: int) -> None:
        self._mem[offset:offset + length] = 0

    write_zeroes = discard

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self._mem = None
        self._map.close()


class NullTarget:
    """Answers every request at once and touches no data (reads return the
    buffer as it is). For measuring the queue round trip only."""

    def __init__(self, size: int):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"size must be a positive multiple of {PAGE_SIZE}, got {size}")
        self.size = size

    def read(self, offset: int, buf: memoryview) -> None:
        return None

    def write(self, offset: int, buf: memoryview) -> None:
        return None

    def discard(self, offset: int, length: int) -> None:
        return None

    def write_zeroes(self, offset: int, length: int) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
