"""Backing swap: vetting as compcache did, the header copy, and the store forwarding to it
(synchronously, and as BackingIO that a queue runs)."""
import errno
import mmap
import os
import struct
import subprocess

import pytest

from ublkzswap.backing import Backing
from ublkzswap.store import Store
from ublkzswap.target import BackingIO, run_backing_io

PAGE = 4096


def make_swapfile(path, pages, bad=0):
    with open(path, "wb") as f:
        f.write(b"\0" * pages * PAGE)
    hdr = bytearray(PAGE)
    struct.pack_into("<III", hdr, 1024, 1, pages - 1, bad)
    hdr[-10:] = b"SWAPSPACE2"
    with open(path, "r+b") as f:
        f.write(hdr)
    return str(path)


def test_regular_file_becomes_backing_with_fixed_header(tmp_path):
    b = Backing(make_swapfile(tmp_path / "swap", 256), remap=False)
    try:
        assert b.npages == 256 and b.size == 256 * PAGE
        h = b.header()
        assert h[-10:] == b"SWAPSPACE2"
        assert struct.unpack_from("<III", h, 1024) == (1, 255, 0)
    finally:
        b.close()


def test_bad_pages_holes_and_odd_files_are_einval(tmp_path):
    with pytest.raises(OSError) as e:
        Backing(make_swapfile(tmp_path / "bad", 64, bad=3))
    assert e.value.errno == errno.EINVAL and "bad pages" in str(e.value)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 * PAGE)
    with pytest.raises(OSError) as e:
        Backing(str(sparse))
    assert e.value.errno == errno.EINVAL and "holes" in str(e.value)
    with pytest.raises(OSError) as e:
        Backing(str(tmp_path))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        Backing(str(tmp_path / "missing"))
    assert e.value.errno == errno.ENOENT


def write_page(store, index, page):
    """Store one page, doing its backing I/O at once (page-aligned, as O_DIRECT wants)."""
    buf = memoryview(mmap.mmap(-1, PAGE))
    buf[:] = page
    pending = store.write(index * PAGE, buf)
    if pending is not None:
        run_backing_io(pending, buf)


def read_page(store, index, out):
    buf = memoryview(mmap.mmap(-1, PAGE))
    pending = store.read(index * PAGE, buf)
    if pending is not None:
        run_backing_io(pending, buf)
    out[:] = buf


def incompressible(n=1):
    return os.urandom(n * PAGE)


def test_store_page_api_runs_backing_io_itself(tmp_path):
    b = Backing(make_swapfile(tmp_path / "swap", 64), remap=False)
    s = Store(b.size, memlimit=32 * PAGE, backing=b)
    try:
        data = incompressible(4)
        for i in range(4):
            write_page(s, 4 + i, data[i * PAGE:(i + 1) * PAGE])
        st = s.stats()
        assert st["bd_writes"] == 4 and st["pages_stored"] == 0
        with open(b.name, "rb") as f:
            f.seek(4 * PAGE)
            assert f.read(4 * PAGE) == data
        out = bytearray(PAGE)
        read_page(s, 5, out)
        assert out == data[PAGE:2 * PAGE] and s.stats()["bd_reads"] == 1
    finally:
        s.close()
        b.close()


def test_store_returns_merged_backing_io(tmp_path):
    b = Backing(make_swapfile(tmp_path / "swap", 64), remap=False)
    s = Store(b.size, memlimit=32 * PAGE, backing=b)
    buf = mmap.mmap(-1, 8 * PAGE)               # page-aligned like a queue's tag buffer
    try:
        data = incompressible(3) + b"a" * PAGE + incompressible(4)
        buf[:] = data
        pending = s.write(8 * PAGE, memoryview(buf))
        assert isinstance(pending, BackingIO)
        # pages 0-2 and 4-7 of the request go out, merged into two runs
        assert [(op, boff, ln, foff) for op, _fd, boff, ln, foff in pending.ops] == [
            (1, 0, 3 * PAGE, 8 * PAGE), (1, 4 * PAGE, 4 * PAGE, 12 * PAGE)]
        run_backing_io(pending, memoryview(buf))
        back = mmap.mmap(-1, 8 * PAGE)
        pending = s.read(8 * PAGE, memoryview(back))
        assert [op for op, *_ in pending.ops] == [0, 0]
        run_backing_io(pending, memoryview(back))
        assert back[:] == data                  # page 3 from RAM, the rest from the backing file
        assert s.stats()["bd_reads"] == 7 and s.stats()["bd_writes"] == 7
    finally:
        s.close()
        b.close()


def test_backing_write_failure_is_eio_and_the_old_content_stays(tmp_path):
    """The RAM copy of a forwarded page is freed only once the backing write succeeded: after
    an EIO the slot still reads back its previous content, not the backing device's."""
    b = Backing(make_swapfile(tmp_path / "swap", 64), remap=False)
    s = Store(b.size, memlimit=32 * PAGE, backing=b)
    buf = mmap.mmap(-1, PAGE)
    old = (b"the old content of slot one, " * 200)[:PAGE]
    try:
        write_page(s, 1, old)                     # compresses well: kept in RAM
        assert s.slot(1)[0] == "compressed"
        buf[:] = incompressible()
        pending = s.write(PAGE, memoryview(buf))  # forwarded
        with pytest.raises(OSError) as e:
            pending.done([-errno.EIO])
        assert e.value.errno == errno.EIO
        assert s.stats()["failed_writes"] == 1 and s.stats()["bd_writes"] == 0
        out = bytearray(PAGE)
        read_page(s, 1, out)
        assert out == old and s.slot(1)[0] == "compressed"
        pending = s.write(PAGE, memoryview(buf))  # again, and this time it works
        run_backing_io(pending, memoryview(buf))
        assert s.slot(1)[0] == "empty" and s.stats()["bd_writes"] == 1
        read_page(s, 1, out)
        assert out == buf[:]
    finally:
        s.close()
        b.close()


def test_active_swapfile_is_ebusy(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("swapon needs root")
    path = make_swapfile(tmp_path / "swap", 64)
    os.chmod(path, 0o600)
    p = subprocess.run(["swapon", path], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"swapon of a file is not possible here: {p.stderr.strip()}")
    try:
        with pytest.raises(OSError) as e:
            Backing(path)
        assert e.value.errno == errno.EBUSY and "swapoff" in str(e.value)
    finally:
        subprocess.run(["swapoff", path])


def test_page_map_from_extents():
    from ublkzswap import uapi
    from ublkzswap.backing import page_map
    exts = [(0, 1 << 20, 2 * PAGE, 0), (2 * PAGE, 5 << 20, 2 * PAGE, uapi.FIEMAP_EXTENT_UNWRITTEN),
            (4 * PAGE, 9 << 20, 8 * PAGE, uapi.FIEMAP_EXTENT_LAST)]
    assert page_map(exts, 6).tolist() == [1 << 20, (1 << 20) + PAGE, 5 << 20, (5 << 20) + PAGE,
                                          9 << 20, (9 << 20) + PAGE]
    with pytest.raises(ValueError, match="page 2 is a hole"):
        page_map([exts[0], exts[2]], 6)
    assert page_map([(0, 1024, 2 * PAGE, 0)], 2).tolist() == [1024, 1024 + PAGE]   # 1 KiB blocks
    with pytest.raises(ValueError, match="not page-aligned"):
        page_map([(0, 0, PAGE + 1024, 0), (PAGE + 1024, 8192, 3072, 0)], 2)
    with pytest.raises(ValueError, match="not page-aligned"):
        page_map([(0, 100, 2 * PAGE, 0)], 2)
    with pytest.raises(ValueError, match="flags"):
        page_map([(0, 0, 2 * PAGE, uapi.FIEMAP_EXTENT_DELALLOC)], 2)
    with pytest.raises(ValueError, match="flags"):
        page_map([(0, 0, 2 * PAGE, uapi.FIEMAP_EXTENT_SHARED)], 2)


@pytest.fixture
def ext4_mount(tmp_path):
    """A fresh ext4 filesystem on a loop device, mounted at tmp_path/mnt."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    mnt.mkdir()
    p = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"mkfs.ext4 unavailable: {p.stderr.strip()}")
    p = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop mount here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_swap_file_on_ext4_is_remapped_to_its_block_device(ext4_mount):
    from ublkzswap import uapi
    import ctypes
    import fcntl
    path = make_swapfile(ext4_mount / "swapfile", 512)
    b = Backing(path)
    s = Store(b.size, memlimit=32 * PAGE, backing=b)
    try:
        assert b.remapped and os.path.realpath(os.readlink(f"/proc/self/fd/{b.fd}")).startswith("/dev/loop")
        assert b.offset(1) == b.offset(0) + PAGE and b.offset(1) != PAGE
        flags = ctypes.c_long()
        fcntl.ioctl(b._file_fd, uapi.FS_IOC_GETFLAGS, flags)
        assert flags.value & uapi.FS_IMMUTABLE_FL                 # nobody moves its blocks now
        with pytest.raises(PermissionError):
            open(path, "r+b")
        assert struct.unpack_from("<III", b.header(), 1024) == (1, 511, 0)
        data = {i: incompressible() for i in (3, 4, 200, 511)}
        for i, page in data.items():
            write_page(s, i, page)
        assert s.stats()["bd_writes"] == 4
        out = bytearray(PAGE)
        for i, page in data.items():
            read_page(s, i, out)
            assert out == page
    finally:
        s.close()
        b.close()
    flags = ctypes.c_long()
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), uapi.FS_IOC_GETFLAGS, flags)
    assert not flags.value & uapi.FS_IMMUTABLE_FL                 # handed back as it was
    # what went to the block device is the file's own content, seen through the filesystem
    subprocess.run(["umount", str(ext4_mount)], check=True)
    img = ext4_mount.parent / "fs.img"
    subprocess.run(["mount", "-o", "loop", str(img), str(ext4_mount)], check=True)
    with open(path, "rb") as f:
        for i, page in data.items():
            f.seek(i * PAGE)
            assert f.read(PAGE) == page


def test_an_immutable_swap_file_is_refused_and_left_alone(ext4_mount):
    path = make_swapfile(ext4_mount / "swapfile", 64)
    subprocess.run(["chattr", "+i", path], check=True)
    try:
        with pytest.raises(OSError) as e:
            Backing(path)
        assert e.value.errno == errno.EPERM and path in str(e.value)
        assert "i" in subprocess.run(["lsattr", path], capture_output=True, text=True).stdout.split()[0]
    finally:
        subprocess.run(["chattr", "-i", path], check=True)
