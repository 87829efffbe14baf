"""State that outlives the daemon: a device's tables and arena in locked SysV shared memory.

Owns: the two shared memory segments of one device -- *tables* (a header naming the device's
geometry, the counters, the slot table, the preformatted page 0) and *arena* (the pages the
allocator carves objects from) -- found again by key (``KEY_BASE + 2 * dev_id`` and ``+ 1``),
so that a new daemon process can take the device over with every stored page in place.

Why SysV shared memory: it stays when the process that made it dies, and ``SHM_LOCK`` keeps its
pages resident and unevictable whoever maps it (an mlock belongs to a mapping, and would end
with the process: the kernel could then swap our arena out -- to ourselves). Pages come into
existence when first touched (``SHM_NORESERVE``: a device-sized arena costs nothing up front)
and go back with ``MADV_REMOVE`` (a hole punched in the segment). A memfd held by a supervisor
would do the first half, not the second. The segments are removed by ``--reset`` and by a clean
unload (``IPC_RMID``); after a crash they wait for the next daemon, or ``ipcrm``.

Still naive: one tables segment per device sized for its disksize; no checksum of the header
beyond magic, version and geometry.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import struct

import numpy as np

from .libc import libc, oserror
from .memory import populate
from .uapi import PAGE_SIZE

IPC_PRIVATE, IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_STAT = 0, 0o1000, 0o2000, 0, 2
SHM_LOCK, SHM_NORESERVE = 11, 0o10000
KEY_BASE = 0x75627A00          # "ubz" then 2 keys per device id
MAGIC = b"UBLKZSW1"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQQII64s64s")   # magic, version, unit, disksize, arena pages,
                                              # memlimit, reserved, allocator, compressor
                                              # length, compressor, backing path (truncated)
HEADER_BYTES = PAGE_SIZE

libc.shmget.restype, libc.shmget.argtypes = C.c_int, [C.c_int, C.c_size_t, C.c_int]
libc.shmat.restype, libc.shmat.argtypes = C.c_void_p, [C.c_int, C.c_void_p, C.c_int]
libc.shmdt.restype, libc.shmdt.argtypes = C.c_int, [C.c_void_p]
libc.shmctl.restype, libc.shmctl.argtypes = C.c_int, [C.c_int, C.c_int, C.c_void_p]


def keys(dev_id: int) -> tuple[int, int]:
    """(tables key, arena key) of device ``dev_id``."""
    return KEY_BASE + 2 * dev_id, KEY_BASE + 2 * dev_id + 1


class Segment:
    """One SysV shared memory segment of ``size`` bytes, attached and locked. ``create`` makes
    a new one (EEXIST if the key is taken); otherwise an existing one is attached (ENOENT if
    there is none)."""

    def __init__(self, key: int, size: int, *, create: bool):
        flags = 0o600 | (IPC_CREAT | IPC_EXCL | SHM_NORESERVE if create else 0)
        self.shmid = libc.shmget(key, size if create else 0, flags)
        if self.shmid < 0:
            raise oserror(f"shmget({key:#x})")
        self.key = key
        addr = libc.shmat(self.shmid, None, 0)
        if addr in (None, C.c_void_p(-1).value):
            raise oserror(f"shmat({key:#x})")
        self.addr = addr
        self.size = self._stat_size() if not create else size
        if libc.shmctl(self.shmid, SHM_LOCK, None) != 0:
            err = oserror(f"shmctl({key:#x}, SHM_LOCK)")
            self.detach()
            raise err
        self._buf = (C.c_uint8 * self.size).from_address(self.addr)

    def _stat_size(self) -> int:
        ds = (C.c_uint8 * 128)()                   # struct shmid64_ds; shm_segsz at offset 48
        if libc.shmctl(self.shmid, IPC_STAT, ds) != 0:
            raise oserror("shmctl(IPC_STAT)")
        return struct.unpack_from("<Q", bytes(ds), 48)[0]

    def array(self, offset: int, count: int, dtype) -> np.ndarray:
        """``count`` items of ``dtype`` at byte ``offset`` of the segment (a view)."""
        return np.frombuffer(self._buf, dtype=dtype, count=count, offset=offset)

    def view(self) -> memoryview:
        return memoryview(self._buf).cast("B")

    def remove(self) -> None:
        """Mark for destruction: it goes once the last process has detached."""
        libc.shmctl(self.shmid, IPC_RMID, None)

    def detach(self) -> None:
        if self.addr is not None:
            libc.shmdt(C.c_void_p(self.addr))
            self.addr = None
            self._buf = None


CLAIM_BASE = KEY_BASE + 0x10000


def claim(dev_id: int, pid: int) -> None:
    """Record that the ublkzswapd server ``pid`` owns ublk id ``dev_id``: a server that dies
    leaves its ids to whoever finds the claim's pid gone (its standby, or a ublkzswapd
    started by hand). The segment is locked like the state: a standby reads it while the
    kernel holds the device's I/O, and a claim swapped out to that device would never come
    back."""
    key = CLAIM_BASE + dev_id
    shmid = libc.shmget(key, PAGE_SIZE, IPC_CREAT | 0o600)
    if shmid < 0:
        raise oserror(f"shmget({key:#x})")
    if libc.shmctl(shmid, SHM_LOCK, None) != 0:
        raise oserror(f"shmctl({key:#x}, SHM_LOCK)")
    addr = libc.shmat(shmid, None, 0)
    if addr in (None, C.c_void_p(-1).value):
        raise oserror(f"shmat({key:#x})")
    C.c_int64.from_address(addr).value = pid
    libc.shmdt(C.c_void_p(addr))


def claimant(dev_id: int) -> int | None:
    """The server pid that claimed ``dev_id``, or None."""
    shmid = libc.shmget(CLAIM_BASE + dev_id, 0, 0)
    if shmid < 0:
        return None
    addr = libc.shmat(shmid, None, 0o10000)         # SHM_RDONLY
    if addr in (None, C.c_void_p(-1).value):
        return None
    try:
        return C.c_int64.from_address(addr).value
    finally:
        libc.shmdt(C.c_void_p(addr))


def unclaim(dev_id: int) -> None:
    shmid = libc.shmget(CLAIM_BASE + dev_id, 0, 0)
    if shmid >= 0:
        libc.shmctl(shmid, IPC_RMID, None)


def exists(dev_id: int) -> bool:
    """True if device ``dev_id`` left state behind."""
    return libc.shmget(keys(dev_id)[0], 0, 0) >= 0


def remove(dev_id: int) -> None:
    """Remove whatever state device ``dev_id`` left (no error if there is none)."""
    for key in keys(dev_id):
        shmid = libc.shmget(key, 0, 0)
        if shmid >= 0:
            libc.shmctl(shmid, IPC_RMID, None)


class DeviceState:
    """The shared state of one device. ``DeviceState.create(dev_id, ...)`` makes it (removing
    any stale one first); ``DeviceState.attach(dev_id)`` finds it again. The layout of the
    tables segment: header page, counters page, slot table (16 bytes a slot), page 0."""

    def __init__(self, dev_id: int, tables: Segment, arena: Segment, fields: dict):
        self.dev_id = dev_id
        self.tables, self.arena = tables, arena
        self.__dict__.update(fields)
        self.npages = self.disksize // PAGE_SIZE
        off = HEADER_BYTES
        self.counters = tables.array(off, PAGE_SIZE // 8, np.int64)
        off += PAGE_SIZE
        self.table = tables.array(off, 2 * self.npages, np.uint64)
        off += 16 * self.npages
        self.page0 = tables.array(off, PAGE_SIZE, np.uint8)

    @staticmethod
    def tables_size(disksize: int) -> int:
        return HEADER_BYTES + PAGE_SIZE + 16 * (disksize // PAGE_SIZE) + PAGE_SIZE

    @classmethod
    def create(cls, dev_id: int, *, disksize: int, arena_pages: int, unit: int, allocator: int,
               compressor: str, memlimit: int = 0, backing: str = "",
               private: bool = False) -> "DeviceState":
        """New state for ``dev_id``. Its tables segment is populated now (SHM_LOCK keeps pages
        but does not make them): a slot table page first touched by the queue thread would be
        a page allocation on the I/O path. ``private``: segments no other process can find
        (IPC_PRIVATE; the daemon's self-test runs the shared-state paths through one), removed
        once detached."""
        if private:
            tk = ak = IPC_PRIVATE
        else:
            remove(dev_id)
            tk, ak = keys(dev_id)
        tables = Segment(tk, cls.tables_size(disksize), create=True)
        if private:
            tables.remove()
        populate(tables.addr, tables.size)
        try:
            arena = Segment(ak, arena_pages * PAGE_SIZE, create=True)
            if private:
                arena.remove()
        except BaseException:
            tables.remove()
            tables.detach()
            raise
        fields = dict(disksize=disksize, arena_pages=arena_pages, unit=unit, allocator=allocator,
                      compressor=compressor, memlimit=memlimit, backing=backing)
        tables.view()[:HEADER.size] = HEADER.pack(
            MAGIC, VERSION, unit, disksize, arena_pages, memlimit, 0, allocator,
            len(compressor), compressor.encode(), os.fsencode(backing)[:64])
        return cls(dev_id, tables, arena, fields)

    @classmethod
    def attach(cls, dev_id: int) -> "DeviceState":
        """The state device ``dev_id`` left; OSError(ENOENT) if none, EINVAL if unreadable."""
        tk, ak = keys(dev_id)
        tables = Segment(tk, 0, create=False)
        try:
            (magic, version, unit, disksize, arena_pages, memlimit, _r, allocator, clen, comp,
             backing) = HEADER.unpack_from(bytes(tables.view()[:HEADER.size]))
            if magic != MAGIC or version != VERSION or disksize % PAGE_SIZE or \
                    tables.size < cls.tables_size(disksize):
                raise OSError(errno.EINVAL, f"ublk device {dev_id}: shared state is not ours")
            arena = Segment(ak, 0, create=False)
        except BaseException:
            tables.detach()
            raise
        fields = dict(disksize=disksize, arena_pages=arena_pages, unit=unit, allocator=allocator,
                      compressor=comp[:clen].decode(), memlimit=memlimit,
                      backing=os.fsdecode(backing.rstrip(b"\0")))
        return cls(dev_id, tables, arena, fields)

    def set_memlimit(self, memlimit: int) -> None:
        self.memlimit = memlimit
        struct.pack_into("<Q", self.tables.view(), 32, memlimit)

    def remove(self) -> None:
        """Destroy both segments (they go when the last process detaches)."""
        self.tables.remove()
        self.arena.remove()

    def detach(self) -> None:
        self.counters = self.table = self.page0 = None
        self.tables.detach()
        self.arena.detach()
