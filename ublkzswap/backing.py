"""Backing swap: a block device or a regular file that takes the pages RAM should not keep.

Owns: opening and vetting the backing swap as compcache 0.6.2 did, its header, and the
mapping slot N <-> backing page N (for a file: the file's page N, found through its extents),
and the swap header format (:func:`swap_header`). The I/O itself goes through the queue's
io_uring (the store hands the queue a :class:`ublkzswap.target.BackingIO`), or
:func:`ublkzswap.target.run_backing_io` where there is no queue.

Vetting (compcache's rules and messages):
- a block device is opened exclusively (``O_EXCL``): in use (swapon, mounted) -> EBUSY;
- a regular file must not be an active swap file (``/proc/swaps``) -> EBUSY ("You must swapoff
  backing swap device before init"), must have no holes -> EINVAL ("Backing swapfile has
  holes") and must hold at least two pages;
- its page 0 must not list bad pages -> EINVAL ("Cannot use backing swap with bad pages");
- anything else -> EINVAL.
The device's size becomes the ublk device's disksize; page 0 (the backing swap's header) is
copied with ``last_page`` fixed, so that ``swapon /dev/ublkbN`` sees the backing swap's
identity (and fails, as in compcache, if the backing device is no swap area at all).

A regular file on ext2/3/4 is remapped, as compcache mapped a swap file with ``bmap`` and as the
kernel does for swap files: its extents are read once with FIEMAP (``FIEMAP_FLAG_SYNC``), and
page I/O goes straight to the underlying block device (O_DIRECT) at those offsets. That keeps
the filesystem -- whose direct I/O path allocates with GFP_KERNEL (``iomap_dio_rw``) -- out of
the swap path, the same as for a backing block device. While it is in use the file is made
immutable (``FS_IMMUTABLE_FL``, what ``chattr +i`` sets): nobody can truncate, rewrite or
defragment it, so its extents stay put (the kernel's S_SWAPFILE does this for swapon'd files).
The flag is cleared at close; after a crash ``chattr -i FILE`` clears it.
Files on other filesystems (or with extents FIEMAP cannot vouch for: unknown, delayed, encoded,
inline, shared) are used through the filesystem, O_DIRECT where it allows it.

Still naive: the remap is for ext2/3/4 only (xfs and others use the filesystem path); a file's
holes are checked once at init.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import mmap
import os
import stat
import struct

import numpy as np

from . import uapi
from .libc import libc as _libc
from .uapi import PAGE_SIZE

SECTOR = 512
SWAP_MAGIC = b"SWAPSPACE2"
_INFO = 1024   # offset of swap_header.info: version u32, last_page u32, nr_badpages u32


def swap_header(disksize: int) -> bytes:
    """Page 0 of a fresh swap area of ``disksize`` bytes, as compcache's setup_swap_header
    built it (and mkswap does): version 1, last_page, no bad pages, SWAPSPACE2 at the end."""
    page = bytearray(PAGE_SIZE)
    struct.pack_into("<III", page, _INFO, 1, disksize // PAGE_SIZE - 1, 0)
    page[PAGE_SIZE - len(SWAP_MAGIC):] = SWAP_MAGIC
    return bytes(page)


def _active_swaps() -> set[str]:
    try:
        with open("/proc/swaps") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    out = set()
    for line in lines:
        name = line.split()[0].replace("\\040", " ")
        out.add(os.path.realpath(name))
    return out


def _fail(err: int, msg: str) -> OSError:
    return OSError(err, msg)


class _statfs(C.Structure):
    _fields_ = [("f_type", C.c_long), ("_rest", C.c_long * 15)]


def fs_magic(fd: int) -> int:
    """``statfs().f_type`` of the filesystem holding ``fd``."""
    buf = _statfs()
    if _libc.fstatfs(fd, C.byref(buf)) != 0:
        e = C.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.f_type & 0xFFFFFFFF


BAD_EXTENT = (uapi.FIEMAP_EXTENT_UNKNOWN | uapi.FIEMAP_EXTENT_DELALLOC | uapi.FIEMAP_EXTENT_ENCODED
              | uapi.FIEMAP_EXTENT_DATA_ENCRYPTED | uapi.FIEMAP_EXTENT_NOT_ALIGNED
              | uapi.FIEMAP_EXTENT_DATA_INLINE | uapi.FIEMAP_EXTENT_DATA_TAIL
              | uapi.FIEMAP_EXTENT_SHARED)


def extents(fd: int, batch: int = 256) -> list[tuple[int, int, int, int]]:
    """Every extent of the file ``fd`` as (logical, physical, length, flags), after syncing
    it (FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC). Raises OSError (EOPNOTSUPP: no FIEMAP)."""
    out: list[tuple[int, int, int, int]] = []
    start = 0
    hdr = C.sizeof(uapi.fiemap)
    esz = C.sizeof(uapi.fiemap_extent)
    while True:
        buf = bytearray(hdr + batch * esz)
        fm = uapi.fiemap.from_buffer(buf)
        fm.fm_start = start
        fm.fm_length = uapi.FIEMAP_MAX_OFFSET - start
        fm.fm_flags = uapi.FIEMAP_FLAG_SYNC
        fm.fm_extent_count = batch
        fcntl.ioctl(fd, uapi.FS_IOC_FIEMAP, buf)
        n = fm.fm_mapped_extents
        del fm
        if n == 0:
            return out
        last = False
        for i in range(n):
            e = uapi.fiemap_extent.from_buffer(buf, hdr + i * esz)
            out.append((e.fe_logical, e.fe_physical, e.fe_length, e.fe_flags))
            last = bool(e.fe_flags & uapi.FIEMAP_EXTENT_LAST)
        if last:
            return out
        start = out[-1][0] + out[-1][2]


def page_map(exts, npages: int) -> np.ndarray:
    """Byte offset on the block device of each of the file's first ``npages`` pages. Raises
    ValueError naming the first problem (an unusable or unaligned extent, a hole)."""
    phys = np.full(npages, -1, dtype=np.int64)
    for logical, physical, length, flags in exts:
        if logical >= npages * PAGE_SIZE:
            break
        if flags & BAD_EXTENT:
            raise ValueError(f"extent at {logical} has flags {flags:#x}")
        # pages must not straddle extents; on the device, sector alignment is what O_DIRECT
        # needs (an ext4 with 1 KiB blocks places page-sized runs at 1 KiB offsets)
        if (logical | length) % PAGE_SIZE or physical % SECTOR:
            raise ValueError(f"extent at {logical} is not page-aligned")
        first = logical // PAGE_SIZE
        n = min(length // PAGE_SIZE, npages - first)
        phys[first:first + n] = physical + np.arange(n, dtype=np.int64) * PAGE_SIZE
    if (phys < 0).any():
        raise ValueError(f"page {int(np.argmax(phys < 0))} is a hole")
    return phys


def _set_immutable(fd: int, on: bool) -> bool:
    """Set or clear FS_IMMUTABLE_FL (``chattr +i``/``-i``) on ``fd``; True if that changed it.
    Raises OSError."""
    flags = C.c_long()
    fcntl.ioctl(fd, uapi.FS_IOC_GETFLAGS, flags)
    new = flags.value | uapi.FS_IMMUTABLE_FL if on else flags.value & ~uapi.FS_IMMUTABLE_FL
    if new == flags.value:
        return False
    fcntl.ioctl(fd, uapi.FS_IOC_SETFLAGS, C.c_long(new))
    return True


def _open_blockdev(dev: int) -> int:
    """Open the block device ``dev`` (a st_dev) for O_DIRECT I/O without an exclusive claim
    (its filesystem holds that)."""
    major, minor = os.major(dev), os.minor(dev)
    paths = [f"/dev/block/{major}:{minor}"]
    try:
        for line in open(f"/sys/dev/block/{major}:{minor}/uevent"):
            if line.startswith("DEVNAME="):
                paths.append("/dev/" + line.split("=", 1)[1].strip())
    except OSError:
        pass
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            continue
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
            return fd
        os.close(fd)
    raise OSError(errno.ENODEV, f"no usable device node for block device {major}:{minor}")


class Backing:
    """An opened, vetted backing swap. ``fd`` is what the queue's io_uring reads and writes;
    backing page N lives at byte ``N * 4096``."""

    def __init__(self, path: str, remap: bool = True, adopt: bool = False):
        """``remap=False`` keeps a file's I/O on the filesystem (tests on the host's disk);
        ``adopt``: a daemon that died left the file immutable -- take it over as it is."""
        self.name = str(path)
        self.remapped = False
        self._phys: np.ndarray | None = None
        self._file_fd = -1
        self._immutable_set = False
        real = os.path.realpath(self.name)
        try:
            st = os.stat(real)
        except OSError as e:
            raise _fail(e.errno, f"backing swap {self.name}: {e.strerror}") from None
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if adopt and stat.S_ISREG(st.st_mode):
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _set_immutable(fd, False)      # ours; set again below once it is mapped
            finally:
                os.close(fd)
        if not self.is_blockdev and not stat.S_ISREG(st.st_mode):
            raise _fail(errno.EINVAL, f"backing swap {self.name}: not a block device or regular file")
        if real in _active_swaps():
            raise _fail(errno.EBUSY, f"backing swap {self.name} is an active swap area: "
                        "You must swapoff backing swap device before init")
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if self.is_blockdev else 0)
        try:
            self.fd = os.open(real, flags | os.O_DIRECT)
            self.direct = True
        except OSError as e:
            if e.errno != errno.EINVAL:       # EBUSY for a block device in use, EACCES, ...
                raise _fail(e.errno, f"backing swap {self.name}: {e.strerror}") from None
            self.fd = os.open(real, flags)     # a filesystem without O_DIRECT (tmpfs)
            self.direct = False
        self._bounce = mmap.mmap(-1, PAGE_SIZE)   # page-aligned, for O_DIRECT
        try:
            self._vet(st)
            if remap and not self.is_blockdev:
                self._remap(st)
        except BaseException:
            self.close()
            raise

    def _remap(self, st: os.stat_result) -> None:
        """Point ``fd`` at the file's block device, its pages at their extents (see the module
        docstring); leave everything as it is where that cannot be done safely."""
        if fs_magic(self.fd) != uapi.EXT4_SUPER_MAGIC:
            return
        try:
            phys = page_map(extents(self.fd), self.npages)
        except ValueError as e:
            raise _fail(errno.EINVAL, f"backing swap {self.name}: cannot map its extents: {e}") from None
        except OSError:
            return                                    # no FIEMAP here: the filesystem path
        bdev = _open_blockdev(st.st_dev)
        try:
            self._immutable_set = _set_immutable(self.fd, True)
        except OSError as e:
            os.close(bdev)
            raise _fail(e.errno, f"backing swap {self.name}: cannot make it immutable: {e.strerror}") from None
        # the extents may only be read once nothing can move them
        try:
            again = page_map(extents(self.fd), self.npages)
        except (ValueError, OSError) as e:
            os.close(bdev)
            raise _fail(errno.EINVAL, f"backing swap {self.name}: cannot map its extents: {e}") from None
        if not np.array_equal(phys, again):
            os.close(bdev)
            raise _fail(errno.EBUSY, f"backing swap {self.name}: its extents moved while mapping")
        self._file_fd, self.fd = self.fd, bdev
        self._phys = again
        self.remapped = True

    def _vet(self, st: os.stat_result) -> None:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if not self.is_blockdev:
            try:
                first_hole = os.lseek(self.fd, 0, os.SEEK_HOLE)
            except OSError:
                first_hole = size
            if first_hole < size or st.st_blocks * 512 < size - PAGE_SIZE:
                raise _fail(errno.EINVAL, f"backing swap {self.name}: Backing swapfile has holes")
        self.npages = size // PAGE_SIZE
        if self.npages < 2:
            raise _fail(errno.EINVAL, f"backing swap {self.name}: too small ({size} bytes)")
        self.size = self.npages * PAGE_SIZE
        if os.preadv(self.fd, [self._bounce], 0) != PAGE_SIZE:
            raise _fail(errno.EINVAL, f"backing swap {self.name}: cannot read its header")
        hdr = bytes(self._bounce)
        nr_badpages = struct.unpack_from("<I", hdr, _INFO + 8)[0]
        if hdr[-10:] == SWAP_MAGIC and nr_badpages:
            raise _fail(errno.EINVAL, f"backing swap {self.name}: "
                        "Cannot use backing swap with bad pages")
        self._header = hdr

    def header(self) -> bytes:
        """Page 0 for the ublk device: the backing swap's header with last_page fixed."""
        page = bytearray(self._header)
        if page[-10:] == SWAP_MAGIC:
            struct.pack_into("<I", page, _INFO + 4, self.npages - 1)
        return bytes(page)

    def offset(self, index: int) -> int:
        """Byte offset of backing page ``index`` on ``fd``."""
        if self._phys is not None:
            return int(self._phys[index])
        return index * PAGE_SIZE

    def runs(self, pages) -> tuple[list[tuple], list[list[int]]]:
        """The ops that move ``pages`` -- (op, slot index, page number in the request buffer)
        -- between a request's buffer and this backing swap, contiguous runs merged: (ops as
        :class:`ublkzswap.target.BackingIO` takes them, the slot indexes of each op)."""
        fd, where = self.fd, self.offset
        ops, idxs = [], []
        for op, idx, k in pages:
            foff = where(idx)
            last = ops[-1] if ops else None
            if last and last[0] == op and last[2] + last[3] == k * PAGE_SIZE and last[4] + last[3] == foff:
                ops[-1] = (op, fd, last[2], last[3] + PAGE_SIZE, last[4])
                idxs[-1].append(idx)
            else:
                ops.append((op, fd, k * PAGE_SIZE, PAGE_SIZE, foff))
                idxs.append([idx])
        return ops, idxs

    def close(self) -> None:
        if self._immutable_set and self._file_fd >= 0:
            try:
                _set_immutable(self._file_fd, False)
            except OSError:
                pass
            self._immutable_set = False
        for attr in ("fd", "_file_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
