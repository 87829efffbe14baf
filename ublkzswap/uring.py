"""io_uring over the system liburing (``liburing.so.2``) through ctypes.

Owns: ring setup (optionally SQE128), filling SQEs and reaping CQEs in batches through numpy
views of the ring memory, and submit/wait. Knows nothing of ublk.

How it stays cheap from Python: the SQE array and the CQ ring are mapped once as numpy
structured arrays, so a batch of SQEs is written with a few vectorised assignments and all
ready CQEs are copied out with one fancy-index; liburing is called only to submit and wait
(``io_uring_submit_and_wait``, which releases the GIL). SQEs are claimed exactly as liburing's
``io_uring_get_sqe`` does (advance ``sq.sqe_tail``), so ``io_uring_submit`` publishes them.

A ``Ring`` must be used by one thread at a time (the caller's job: a queue ring belongs to its
queue thread, the control ring is guarded by a lock in :mod:`ublkzswap.ublkctrl`).

Still naive: no SQPOLL, no registered files or buffers, no CQE32.
"""

from __future__ import annotations

import ctypes as C
import errno
import os

import numpy as np

from . import uapi

_liburing = None


def liburing() -> C.CDLL:
    """Load liburing.so.2 once (Debian package ``liburing2``)."""
    global _liburing
    if _liburing is None:
        try:
            lib = C.CDLL("liburing.so.2", use_errno=True)
        except OSError as e:
            raise OSError(errno.ENOENT,
                          f"cannot load liburing.so.2 (install Debian package liburing2): {e}") from None
        lib.io_uring_queue_init_params.argtypes = [C.c_uint, C.POINTER(uapi.io_uring),
                                                   C.POINTER(uapi.io_uring_params)]
        lib.io_uring_queue_init_params.restype = C.c_int
        lib.io_uring_queue_exit.argtypes = [C.POINTER(uapi.io_uring)]
        lib.io_uring_queue_exit.restype = None
        lib.io_uring_submit.argtypes = [C.POINTER(uapi.io_uring)]
        lib.io_uring_submit.restype = C.c_int
        lib.io_uring_submit_and_wait.argtypes = [C.POINTER(uapi.io_uring), C.c_uint]
        lib.io_uring_submit_and_wait.restype = C.c_int
        lib.io_uring_get_events.argtypes = [C.POINTER(uapi.io_uring)]
        lib.io_uring_get_events.restype = C.c_int
        _liburing = lib
    return _liburing


def _unchecked(fn):
    """``fn`` (a liburing function) called without its argtypes conversions: the serving
    loop's one call per wake-up, made with a pointer object and a small int that need none.
    A stand-in that is not a ctypes function (a test's) is returned as it is."""
    if not isinstance(fn, C._CFuncPtr):
        return fn
    return C.CFUNCTYPE(fn.restype)(C.cast(fn, C.c_void_p).value)


def _u8_view(addr: int, size: int) -> np.ndarray:
    return np.ctypeslib.as_array((C.c_uint8 * size).from_address(addr))


def _byte_view(addr: int, size: int) -> memoryview:
    """A writable memoryview of ``size`` bytes at ``addr`` (cast it to read words as ints)."""
    return memoryview((C.c_uint8 * size).from_address(addr)).cast("B")


def _u32_word(ptr) -> memoryview:
    """The kernel-shared uint32 behind ``ptr`` as a 1-element memoryview: ``w[0]`` reads it
    as a Python int, ``w[0] = v`` writes it."""
    return _byte_view(C.cast(ptr, C.c_void_p).value, 4).cast("I")


class Ring:
    """One io_uring instance.

    ``sqes`` is a numpy structured array (``uapi.sqe_dtype``) over the SQE slots; ``cqes`` one
    (``uapi.CQE_DTYPE``) over the CQ ring. Use :meth:`claim` to get the slot indices of ``n``
    fresh (zeroed) SQEs, fill them through ``sqes[idx]``, then :meth:`submit` or
    :meth:`submit_and_wait`; :meth:`reap` returns every ready completion at once.
    """

    def __init__(self, entries: int, flags: int = 0, cq_entries: int = 0):
        self._lib = liburing()
        self._ring = uapi.io_uring()
        params = uapi.io_uring_params()
        params.flags = flags
        if cq_entries:
            params.flags |= uapi.IORING_SETUP_CQSIZE
            params.cq_entries = cq_entries
        ret = self._lib.io_uring_queue_init_params(entries, C.byref(self._ring), C.byref(params))
        if ret < 0:
            raise OSError(-ret, f"io_uring_queue_init({entries}, flags={flags:#x}): {os.strerror(-ret)}")
        self._open = True
        self._map()

    def _map(self) -> None:
        """Views of the ring memory that ``self._ring`` (liburing's ``struct io_uring``)
        describes. Every method works through these and the liburing calls in ``self._lib``
        alone, so a ``struct io_uring`` over plain memory and stand-ins for those calls give a
        ring whose kernel side a test plays (tests/unit/fakering.py)."""
        self._pring = C.byref(self._ring)
        self._wait_fn = _unchecked(self._lib.io_uring_submit_and_wait)
        self.flags = self._ring.flags
        self.sqe_size = uapi.SQE128_SIZE if self.flags & uapi.IORING_SETUP_SQE128 else uapi.SQE_SIZE
        sq, cq = self._ring.sq, self._ring.cq
        self.sq_entries = sq.ring_entries
        self.sq_mask = sq.ring_mask
        self.cq_entries = cq.ring_entries
        self.cq_mask = cq.ring_mask
        self._sqe_bytes = _u8_view(sq.sqes, self.sq_entries * self.sqe_size)
        self.sqes = self._sqe_bytes.view(uapi.sqe_dtype(self.sqe_size))
        self.sqe_rows = self._sqe_bytes.reshape(self.sq_entries, self.sqe_size)
        self.cqes = _u8_view(cq.cqes, self.cq_entries * 16).view(uapi.CQE_DTYPE)
        # ring words and the rings themselves also as memoryviews: indexing one yields a
        # Python int, far cheaper than a numpy scalar for the one-or-two-CQE wake-ups of a
        # swap device (see reap_pairs)
        self._sq_khead = _u32_word(sq.khead)
        self._cq_khead = _u32_word(cq.khead)
        self._cq_ktail = _u32_word(cq.ktail)
        self._sq_kflags = _u32_word(sq.kflags)
        cqb = _byte_view(cq.cqes, self.cq_entries * 16)
        self._cq_u64, self._cq_i32 = cqb.cast("Q"), cqb.cast("i")
        self._sqb = memoryview(self._sqe_bytes)
        self._sq_i32 = self._sqb.cast("i")
        self._cq_steps = np.arange(self.cq_entries, dtype=np.uint32)
        self._sq_steps = np.arange(self.sq_entries, dtype=np.uint32)

    # ------------------------------------------------------------------ SQ side
    def sq_space(self) -> int:
        """Free SQE slots (as liburing's get_sqe sees them)."""
        return self.sq_entries - ((self._ring.sq.sqe_tail - self._sq_khead[0]) & 0xFFFFFFFF)

    def claim(self, n: int, zero: bool = True) -> np.ndarray:
        """Claim ``n`` SQE slots, zero them (unless the caller overwrites whole rows of
        ``sqe_rows`` itself) and return their indices into ``sqes``.

        Raises ``OSError(EBUSY)`` if the SQ has fewer than ``n`` free slots (submit first).
        """
        if n > self.sq_space():
            raise OSError(errno.EBUSY, f"submission queue full ({n} wanted, {self.sq_space()} free)")
        tail = self._ring.sq.sqe_tail
        if n == 1:
            idx = np.array([tail & self.sq_mask], dtype=np.uint32)
        else:
            idx = (self._sq_steps[:n] + np.uint32(tail)) & np.uint32(self.sq_mask)
        if zero:
            self.sqe_rows[idx] = 0
        self._ring.sq.sqe_tail = (tail + n) & 0xFFFFFFFF
        return idx

    def put_rows(self, rows: memoryview, items, field_offset: int) -> None:
        """For each ``(row, value)`` of ``items``: claim the next SQE, copy SQE-sized row
        ``row`` of ``rows`` (bytes, ``sqe_size`` per row) into it and store ``value`` as the
        int32 at byte ``field_offset`` of the SQE. The one-by-one form of claim + fancy-index
        copy, for a handful of ready-made SQEs (a ublk COMMIT_AND_FETCH per completed tag).
        Raises ``OSError(EBUSY)`` if the SQ lacks room (submit first)."""
        n = len(items)
        if n > self.sq_space():
            raise OSError(errno.EBUSY, f"submission queue full ({n} wanted, {self.sq_space()} free)")
        sq = self._ring.sq
        t = sq.sqe_tail
        size, mask, sqb, i32 = self.sqe_size, self.sq_mask, self._sqb, self._sq_i32
        for row, value in items:
            o = (t & mask) * size
            r = row * size
            sqb[o:o + size] = rows[r:r + size]
            i32[(o + field_offset) >> 2] = value
            t = (t + 1) & 0xFFFFFFFF
        sq.sqe_tail = t

    def sqe_address(self, index: int) -> int:
        """Address of SQE slot ``index`` (for writing a payload struct with ctypes)."""
        return self._sqe_bytes.ctypes.data + int(index) * self.sqe_size

    def submit(self) -> int:
        """Publish claimed SQEs to the kernel; returns how many were submitted."""
        return self._check(self._lib.io_uring_submit(self._pring), "io_uring_submit")

    def submit_and_wait(self, wait_nr: int = 1) -> int:
        """Publish claimed SQEs and wait until at least ``wait_nr`` CQEs are ready.

        Retries on EINTR. The GIL is released while waiting.
        """
        while True:
            ret = self._wait_fn(self._pring, wait_nr)
            if ret != -errno.EINTR:
                return self._check(ret, "io_uring_submit_and_wait")

    @staticmethod
    def _check(ret: int, what: str) -> int:
        if ret < 0:
            raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
        return ret

    # ------------------------------------------------------------------ CQ side
    def cq_ready(self) -> int:
        return (self._cq_ktail[0] - self._cq_khead[0]) & 0xFFFFFFFF

    def reap(self) -> np.ndarray:
        """Copy out every ready CQE (a ``CQE_DTYPE`` array, possibly empty) and mark them seen."""
        if self._sq_kflags[0] & uapi.IORING_SQ_CQ_OVERFLOW:
            self._lib.io_uring_get_events(self._pring)
        head = self._cq_khead[0]
        n = (self._cq_ktail[0] - head) & 0xFFFFFFFF
        if n == 0:
            return self.cqes[:0].copy()
        idx = (self._cq_steps[:n] + np.uint32(head & 0xFFFFFFFF)) & np.uint32(self.cq_mask)
        out = self.cqes[idx]
        self._cq_khead[0] = (head + n) & 0xFFFFFFFF
        return out

    def reap_pairs(self) -> list[tuple[int, int]]:
        """Every ready CQE as a ``(user_data, res)`` pair of Python ints, marked seen.

        The serving loop's form of :meth:`reap`: a swap device mostly wakes for one CQE (a
        swap-in waits for each fault), where numpy's fixed cost per call outweighs the rest of
        the loop (bench/bench_loop.py compares the two)."""
        if self._sq_kflags[0] & uapi.IORING_SQ_CQ_OVERFLOW:
            self._lib.io_uring_get_events(self._pring)
        head = self._cq_khead[0]
        tail = self._cq_ktail[0]
        if head == tail:
            return []
        mask, u64, i32 = self.cq_mask, self._cq_u64, self._cq_i32
        out = []
        while head != tail:
            i = head & mask
            out.append((u64[2 * i], i32[4 * i + 2]))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_khead[0] = head
        return out

    def wait(self, n: int = 1) -> np.ndarray:
        """Submit anything claimed, wait for at least ``n`` completions and reap them all."""
        if self.cq_ready() < n:
            self.submit_and_wait(n)
        return self.reap()

    # ------------------------------------------------------------------ helpers
    def prep_rw(self, opcode: int, fd: int, addr: int, length: int, offset: int, user_data: int) -> int:
        """Claim and fill one READ/WRITE-style SQE; returns its slot index."""
        i = int(self.claim(1)[0])
        s = self.sqes[i:i + 1]
        s["opcode"] = opcode
        s["fd"] = fd
        s["addr"] = addr
        s["len"] = length
        s["cmd_op"] = offset & 0xFFFFFFFF
        s["pad1"] = offset >> 32
        s["user_data"] = user_data
        return i

    def prep_nop(self, user_data: int) -> int:
        i = int(self.claim(1)[0])
        self.sqes[i:i + 1]["opcode"] = uapi.IORING_OP_NOP
        self.sqes[i:i + 1]["user_data"] = user_data
        return i

    def close(self) -> None:
        if self._open:
            self._open = False
            # drop every view of the ring memory first: a use after close then raises
            # instead of touching unmapped memory
            self.sqes = self.cqes = self._sqe_bytes = self.sqe_rows = None
            self._sqb = self._sq_i32 = self._cq_u64 = self._cq_i32 = None
            self._sq_khead = self._cq_khead = self._cq_ktail = self._sq_kflags = None
            self._lib.io_uring_queue_exit(self._pring)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
