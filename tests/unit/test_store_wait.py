"""An empty ready pool: ordinary writes wait for the keeper (a failed one would be data lost),
swap writes fail at once with ENOSPC (the kernel keeps the page and retries)."""
import errno
import os

import pytest

from ublkzswap import arena as arena_mod
from ublkzswap.store import Store

PAGE = 4096


def incompressible(n):
    return os.urandom(n * PAGE)


def test_take_with_timeout_waits_for_the_keeper():
    a = arena_mod.Arena(4096, low=1, high=8, prefill=False)
    try:
        assert a.take(arena_mod.OBJECTS) == -1            # nothing ready, no keeper: at once
        a.start(interval=5.0)                        # slow poll: only the wake-up helps
        p = a.take(arena_mod.OBJECTS, timeout=5.0)
        assert p >= 0 and a.state[p] == arena_mod.OBJECTS
    finally:
        a.close()


def test_ordinary_writes_wait_swap_writes_fail_fast():
    s = Store(64 << 20, low=1, high=16, keeper_interval=5.0)
    try:
        data = incompressible(512)       # 2 MiB of raw pages: 32x the pool's high watermark
        s.write(0, memoryview(data))     # waits for the keeper batch by batch, never fails
        assert s.stats()["failed_writes"] == 0 and s.stats()["huge_pages"] == 512
        out = bytearray(len(data))
        s.read(0, memoryview(out))
        assert out == data
        # drain the pool, stop the keeper: a swap write cannot wait and says ENOSPC
        s.pool.stop()
        while s.pool.take(arena_mod.WHOLE) >= 0:
            pass
        with pytest.raises(OSError) as e:
            s.write_swap(4 << 20, memoryview(incompressible(1)))
        assert e.value.errno == errno.ENOSPC
        assert s.stats()["failed_writes"] == 1
        out1 = bytearray(PAGE)
        s.read(4 << 20, memoryview(out1))
        assert out1 == bytes(PAGE)               # nothing half-stored
    finally:
        s.close()


def test_a_full_device_of_raw_pages_can_still_be_overwritten():
    """Every slot stored raw fills disksize worth of arena pages; overwriting one allocates
    its new page before freeing the old, so the arena needs headroom beyond disksize."""
    n = 256
    s = Store(n * PAGE, low=4, high=32, keeper_interval=0.01)
    try:
        first = incompressible(n)
        s.write(0, memoryview(first))
        assert s.stats()["huge_pages"] == n
        second = incompressible(n)
        for off in range(0, n * PAGE, 64 * PAGE):          # 256 KiB requests, like the kernel's
            s.write(off, memoryview(second)[off:off + 64 * PAGE])
        assert s.stats()["failed_writes"] == 0
        out = bytearray(n * PAGE)
        s.read(0, memoryview(out))
        assert out == second
    finally:
        s.close()


def test_ordinary_compressible_writes_wait_too():
    """The write's wait reaches the object allocator: with the ready pool empty, a page that
    compresses (an allocator object, not a whole page) waits for the keeper like a raw one,
    where a swap write of it fails at once."""
    s = Store(64 << 20, low=1, high=4, keeper_interval=5.0)
    try:
        text = (b"compcache ramzswap xvmalloc " * 200)[:PAGE]
        s.pool.stop()
        while s.pool.take(arena_mod.WHOLE) >= 0:
            pass
        with pytest.raises(OSError) as e:
            s.write_swap(0, memoryview(text))
        assert e.value.errno == errno.ENOSPC
        s.pool.start(interval=5.0)       # slow poll: only the write's wake-up brings pages in
        s.write(0, memoryview(text))
        assert s.slot(0)[0] == "compressed"
        out = bytearray(PAGE)
        s.read(0, memoryview(out))
        assert out == text
    finally:
        s.close()
