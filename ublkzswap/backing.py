"""Backing swap: a block device or a regular file that takes the pages RAM should not keep.

Owns: opening and vetting the backing swap as compcache 0.6.2 did, its header, and the 1:1
mapping (slot N <-> backing page N). The I/O itself normally goes through the queue's
io_uring (the store hands the queue a :class:`ublkzswap.target.BackingIO`); the synchronous
``read_page``/``write_page`` here serve the store when it is used without a queue (tests,
tools).

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

Still naive: no extent remapping (file I/O goes through the filesystem, O_DIRECT where the
filesystem allows it); a file's holes are checked once at init.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct

PAGE_SIZE = 4096
SWAP_MAGIC = b"SWAPSPACE2"
_INFO = 1024   # offset of swap_header.info: version u32, last_page u32, nr_badpages u32


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


class Backing:
    """An opened, vetted backing swap. ``fd`` is what the queue's io_uring reads and writes;
    backing page N lives at byte ``N * 4096``."""

    def __init__(self, path: str):
        self.name = str(path)
        real = os.path.realpath(self.name)
        try:
            st = os.stat(real)
        except OSError as e:
            raise _fail(e.errno, f"backing swap {self.name}: {e.strerror}") from None
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
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
        except BaseException:
            os.close(self.fd)
            raise

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
        return index * PAGE_SIZE

    # synchronous path (store without a queue)
    def read_page(self, index: int, out: memoryview) -> None:
        n = os.preadv(self.fd, [self._bounce], index * PAGE_SIZE)
        if n != PAGE_SIZE:
            raise OSError(errno.EIO, f"short read from backing page {index}")
        out[:PAGE_SIZE] = self._bounce

    def write_page(self, index: int, page) -> None:
        self._bounce[:] = page
        n = os.pwritev(self.fd, [self._bounce], index * PAGE_SIZE)
        if n != PAGE_SIZE:
            raise OSError(errno.EIO, f"short write to backing page {index}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
