"""The arena: ready-page pool between watermarks, the keeper bringing pages in
and giving them back to the kernel (checked with mincore), locking."""

import ctypes
import errno
import time

import numpy as np
import pytest

from ublkzswap import arena as ar
from ublkzswap.arena import Arena

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def resident(a: Arena) -> np.ndarray:
    """Per-page residency of the whole arena, from mincore(2)."""
    vec = np.zeros(a.npages, dtype=np.uint8)
    assert libc.mincore(a.base, a.size, vec.ctypes.data) == 0
    return (vec & 1).astype(bool)


def arena_vmas(a: Arena) -> list[dict]:
    """The /proc/self/smaps entries overlapping the arena (fields in kB, plus VmFlags)."""
    out, cur = [], None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            cur = {} if lo < a.base + a.size and hi > a.base else None
            if cur is not None:
                out.append(cur)
        elif cur is not None:
            key = head[0].rstrip(":")
            cur[key] = head[1:] if key == "VmFlags" else int(head[1])
    return out


def locked_kb(a: Arena) -> int:
    """Resident and locked memory of the arena (smaps Locked:)."""
    return sum(v["Locked"] for v in arena_vmas(a))


def test_reservation_uses_no_memory_until_populated():
    a = Arena(1024, low=8, high=32, prefill=False)
    assert a.ready == 0 and a.resident == 0
    assert not resident(a).any()
    populated, released = a.step()
    assert (populated, released) == (32, 0)
    assert a.ready == 32 and a.resident == 32
    res = resident(a)
    assert res.sum() == 32
    assert (a.state == ar.READY).sum() == 32
    assert np.array_equal(np.flatnonzero(res), np.flatnonzero(a.state == ar.READY))
    a.close()


def test_take_give_and_watermarks():
    a = Arena(256, low=4, high=16)
    assert a.ready == 16
    pages = [a.take(ar.OBJECTS) for _ in range(13)]
    assert len(set(pages)) == 13 and all(a.state[p] == ar.OBJECTS for p in pages)
    assert a.ready == 3
    assert a.step() == (13, 0)  # below low: refill to high
    assert a.ready == 16
    assert a.step() == (0, 0)   # inside the band: nothing to do
    for p in pages:
        a.give(p)
    assert a.ready == 29
    populated, released = a.step()  # above high: back to the midpoint
    assert populated == 0 and released == 29 - 10
    assert a.ready == 10 and a.released == 19
    assert resident(a).sum() == a.resident == 10
    a.close()


def test_released_pages_go_back_to_the_kernel_and_come_back_zeroed():
    a = Arena(8, low=0, high=1)
    p = a.take(ar.WHOLE)
    assert a.step() == (1, 0)  # pool empty: refill
    a.mem[p * PAGE:(p + 1) * PAGE] = 0xAB
    a.give(p)
    assert a.ready == 2
    assert a.step() == (0, 2)  # over high: trim to the midpoint (0)
    assert not resident(a)[p] and a.state[p] == ar.UNBACKED
    a.step()
    q = a.take(ar.OBJECTS)
    assert q == p  # lowest unbacked page comes back first
    assert not a.mem[p * PAGE:(p + 1) * PAGE].any()


def test_empty_pool_take_returns_minus_one_unless_inline_refill():
    a = Arena(4, low=0, high=2)
    assert a.take(ar.OBJECTS) >= 0 and a.take(ar.OBJECTS) >= 0
    assert a.take(ar.OBJECTS) == -1
    b = Arena(4, low=0, high=2, inline_refill=True)
    got = [b.take(ar.OBJECTS) for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3]
    assert b.take(ar.OBJECTS) == -1  # the reservation itself is exhausted


def test_watermarks_clamped_and_validated():
    a = Arena(3, low=10, high=20)
    assert a.high == 3 and a.low == 3
    with pytest.raises(ValueError):
        Arena(10, low=5, high=2)
    with pytest.raises(ValueError):
        Arena(0)


def test_keeper_thread_refills_and_trims():
    a = Arena(512, low=8, high=32)
    a.start(interval=0.01)
    try:
        taken = [a.take(ar.OBJECTS) for _ in range(30)]
        deadline = time.time() + 5
        while a.ready < 8 and time.time() < deadline:
            time.sleep(0.01)
        assert a.ready >= 8
        for p in taken:
            a.give(p)
        deadline = time.time() + 5
        while a.ready > 32 and time.time() < deadline:
            time.sleep(0.01)
        assert a.ready <= 32
        assert a.released > 0
        assert resident(a).sum() == a.resident
    finally:
        a.stop()
    assert not a.running
    a.stop()  # idempotent


def test_keeper_thread_init_hook_runs_in_thread():
    seen = []
    a = Arena(16, low=1, high=4)
    a.start(interval=0.01, thread_init=lambda: seen.append(True))
    time.sleep(0.05)
    a.stop()
    assert seen == [True]


def test_locked_arena_releases_by_munlock_and_relock():
    try:
        a = Arena(256, low=4, high=16, lock=True, prefill=False)
    except OSError as e:
        pytest.skip(f"mlock2 refused here: {e}")
    assert locked_kb(a) == 0
    assert all("lf" in v["VmFlags"] for v in arena_vmas(a))  # VM_LOCKONFAULT
    a.step()
    assert locked_kb(a) == 16 * 4  # populated pages are locked on fault
    pages = [a.take(ar.OBJECTS) for _ in range(14)]
    assert a.step() == (14, 0)
    for p in pages:
        a.give(p)
    locked = locked_kb(a)
    a.step()  # release: munlock, DONTNEED, mlock2(ONFAULT)
    assert a.released > 0
    assert locked_kb(a) == locked - a.released * 4
    assert resident(a).sum() == a.resident
    # the relocked range merged back: one VMA, still lock-on-fault
    vmas = arena_vmas(a)
    assert len(vmas) == 1 and "lf" in vmas[0]["VmFlags"]
    # new pages are locked again when populated
    before = locked_kb(a)
    for _ in range(a.ready):
        a.take(ar.OBJECTS)
    a.step()
    assert locked_kb(a) > before
    a.close()


def test_notices_mlockall_style_lock_on_dontneed():
    """A range locked behind the arena's back (as mlockall(MCL_FUTURE|MCL_ONFAULT)
    does) refuses DONTNEED; the arena switches to munlock+DONTNEED+relock."""
    a = Arena(64, low=2, high=4)
    if ar._mlock2 is None or ar._mlock2(a.base, a.size, ar.MLOCK_ONFAULT) != 0:
        pytest.skip("mlock2 refused here")
    assert not a.locked
    pages = [a.take(ar.OBJECTS) for _ in range(4)]
    a.step()
    for p in pages:
        a.give(p)
    a.step()
    assert a.locked and a.released > 0
    assert resident(a).sum() == a.resident


def test_populate_failure_is_recorded_not_raised(monkeypatch):
    a = Arena(16, low=2, high=4, prefill=False)

    def fail(page, count):
        raise OSError(errno.ENOMEM, "no memory")

    monkeypatch.setattr(a, "_populate", fail)
    assert a.step() == (0, 0)
    assert a.keeper_errors >= 1 and a.last_keeper_error.errno == errno.ENOMEM
    assert a.ready == 0 and a.resident == 0 and (a.state == ar.UNBACKED).all()


def test_words_view_is_the_same_memory():
    a = Arena(2, low=0, high=2)
    a.words[1] = 0x04030201
    assert bytes(a.mem[4:8]) == b"\x01\x02\x03\x04"
    assert a.view[5] == 2


def test_growth_waits_while_the_guard_says_no():
    """The keeper asks before each batch; a refusal leaves the pages unbacked (not lost) and
    a later pass brings them in once growth is allowed again."""
    allow = {"ok": False, "asked": []}

    def may_grow(nbytes):
        allow["asked"].append(nbytes)
        return allow["ok"]

    a = ar.Arena(2048, low=64, high=512, prefill=False, may_grow=may_grow)
    try:
        assert a.step() == (0, 0)
        assert a.ready == 0 and a.resident == 0 and a.growth_deferred == 1
        assert allow["asked"] and allow["asked"][0] <= ar.POPULATE_BATCH * 4096
        assert allow["asked"][-1] == 4096          # it tried down to a single page
        assert a.take(ar.OBJECTS) == -1 and a.misses == 1
        allow["ok"] = True
        populated, _ = a.step()
        # a miss while short is a swap-out failed on purpose: the target stays at its setting
        assert populated == 512 and a.ready == 512 and not a.short
    finally:
        a.close()


def test_the_ready_pool_deepens_after_misses_and_shrinks_when_quiet(monkeypatch):
    """A take that finds nothing ready doubles the watermarks at the next pass, up to ``grow``
    times their setting; SHRINK_AFTER seconds without a miss halve them again, and the
    keeper gives the surplus back. With grow=1 they never move."""
    now = [1000.0]
    monkeypatch.setattr(ar.time, "monotonic", lambda: now[0])
    a = ar.Arena(4096, low=16, high=64)
    try:
        assert (a.low, a.high, a.ready, a.high_max) == (16, 64, 64, 256)
        while a.take(ar.OBJECTS) >= 0:
            pass
        assert a.misses == 1
        assert a.step()[0] == 128 and (a.low, a.high) == (32, 128)
        for _ in range(3):                  # misses keep coming: up to 4x, no further
            while a.take(ar.OBJECTS) >= 0:
                pass
            a.step()
        assert (a.low, a.high) == (64, 256) and a.ready == 256 and a.misses == 4
        now[0] += ar.SHRINK_AFTER - 0.1      # not quiet long enough
        assert a.step() == (0, 0) and a.high == 256
        now[0] += 0.2
        populated, released = a.step()       # halved; the surplus goes back, to the midpoint
        assert (a.low, a.high) == (32, 128) and populated == 0 and released == 256 - 80
        now[0] += ar.SHRINK_AFTER
        a.step()
        now[0] += ar.SHRINK_AFTER
        a.step()
        assert (a.low, a.high) == (16, 64) and a.ready <= 64
        resident = a.resident
        now[0] += 10 * ar.SHRINK_AFTER
        a.step()
        assert (a.low, a.high) == (16, 64) and a.resident == resident   # never below the setting
    finally:
        a.close()
    b = ar.Arena(1024, low=16, high=64, grow=1)
    try:
        while b.take(ar.OBJECTS) >= 0:
            pass
        assert b.step()[0] == 64 and (b.low, b.high) == (16, 64) and b.misses == 1
    finally:
        b.close()
    with pytest.raises(ValueError):
        ar.Arena(16, grow=0)


def test_growth_guard_counts_available_memory_against_the_min_watermark(tmp_path, monkeypatch):
    from ublkzswap import memory
    zi = tmp_path / "zoneinfo"
    zi.write_text("Node 0, zone   Normal\n  pages free 1\n        min      100\n        low 125\n"
                  "Node 0, zone    DMA32\n        min      20\n")
    mi = tmp_path / "meminfo"
    mi.write_text("MemTotal:        8000 kB\nMemFree:          900 kB\nMemAvailable:    2000 kB\n")
    g = memory.GrowthGuard(margin=4096, zoneinfo=str(zi), meminfo=str(mi))
    assert g.floor == 120 * 4096
    monkeypatch.setattr(memory, "free_bytes", lambda: 900 * 1024)
    assert g.available() == 2000 * 1024              # MemAvailable: page cache counted
    assert g(2000 * 1024 - 4096) is True and g(2000 * 1024 - 4095) is False and g.refused == 1
    monkeypatch.setattr(memory, "free_bytes", lambda: 8000 * 1024)
    assert g.available() == 8000 * 1024 - 120 * 4096   # free pages above the min watermark
    monkeypatch.undo()
    real = memory.GrowthGuard()
    assert 0 < real.available() <= memory.os.sysconf("SC_PHYS_PAGES") * 4096


def test_the_arena_closes_its_growth_guard():
    # the guard keeps /proc/meminfo open; an arena (a device's store) closed must not leave
    # that descriptor behind, one per init
    import os
    from ublkzswap import memory

    def fds():
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    g = memory.GrowthGuard()
    assert fds() == before + 1
    a = ar.Arena(256, low=16, high=64, prefill=False, may_grow=g)
    a.close()
    assert fds() == before
    assert g.available() > 0                    # still answers, from free pages alone
    memory.GrowthGuard()                        # collected at once: closed too
    assert fds() == before


def test_short_of_memory_the_keeper_takes_what_it_can_get():
    room = {"bytes": 40 * 4096}
    a = ar.Arena(2048, low=64, high=512, prefill=False,
                 may_grow=lambda n: n <= room["bytes"])
    try:
        populated, _ = a.step()
        assert populated == 32 and a.ready == 32 and a.growth_deferred == 1   # 32 <= 40 < 64
        room["bytes"] = 1 << 30
        a.step()
        assert a.ready == 512
    finally:
        a.close()


def test_keeper_failures_are_logged_not_only_counted(caplog):
    import logging
    a = ar.Arena(256, low=16, high=64, prefill=False)

    def refuse(first, count):
        raise OSError(errno.ENOMEM, "madvise(MADV_POPULATE_WRITE): Cannot allocate memory")

    a._populate = refuse
    try:
        with caplog.at_level(logging.WARNING, logger="ublkzswap.arena"):
            a.step()
            a.step()
        assert a.keeper_errors == 2
        assert len(caplog.records) == 1 and "Cannot allocate memory" in caplog.records[0].getMessage()
    finally:
        a.close()


def test_out_of_memory_the_pool_gives_back_what_the_store_frees():
    """While the keeper is short (held back by the guard, or its populate failed) the
    watermarks fall back to their setting and everything above ``low`` goes back to the
    kernel: memory freed by discards after an OOM kill is the kernel's at once."""
    room = {"ok": True}
    a = ar.Arena(4096, low=16, high=64, prefill=False, may_grow=lambda n: room["ok"])
    try:
        a.step()
        taken = []
        while (p := a.take(ar.OBJECTS)) >= 0:       # a miss: the next pass deepens the pool
            taken.append(p)
        a.step()
        assert (a.low, a.high) == (32, 128) and a.ready == 128 and not a.short
        while (p := a.take(ar.OBJECTS)) >= 0:
            taken.append(p)
        room["ok"] = False                           # now the machine is out of memory
        assert a.step() == (0, 0) and a.short
        assert (a.low, a.high) == (64, 256)          # that pass still grew it for the miss
        for p in taken[:100]:                        # discards free 100 units
            a.give(p)
        populated, released = a.step()
        assert (a.low, a.high) == (16, 64)           # back to the setting, no growth
        assert populated == 0 and released == 100 - 16 and a.ready == 16
        room["ok"] = True                            # memory is back: a normal pool again
        for _ in range(20):
            a.take(ar.OBJECTS)
        a.step()
        assert not a.short and a.ready == 64
    finally:
        a.close()


def test_a_failed_populate_makes_the_keeper_short(monkeypatch):
    a = ar.Arena(256, low=16, high=64, prefill=False)
    try:
        real = a._populate

        def fail(page, count):
            raise OSError(errno.ENOMEM, "no memory")

        monkeypatch.setattr(a, "_populate", fail)
        a.step()
        assert a.short and a.ready == 0
        monkeypatch.setattr(a, "_populate", real)
        a.step()
        assert not a.short and a.ready == 64
    finally:
        a.close()


def test_swap_activity_is_the_kernel_swapping_out_since_the_last_look(tmp_path):
    from ublkzswap import memory
    vm = tmp_path / "vmstat"
    vm.write_text("pgpgout 7\npswpin 3\npswpout 40\npgalloc_dma 1\n")
    a = memory.SwapActivity(str(vm))
    assert a.pswpout() == 40 and a() is False          # nothing since it started looking
    vm.write_text("pgpgout 9\npswpin 3\npswpout 41\npgalloc_dma 1\n")
    assert a() is True and a() is False                # once per advance
    vm.write_text("pswpin 3\n")                        # no such line: it says no
    assert a.pswpout() == -1 and a() is False
    a.close()
    assert a.pswpout() == -1 and a() is False
    assert memory.SwapActivity(str(tmp_path / "missing"))() is False
    real = memory.SwapActivity()
    assert real.pswpout() >= 0
    real.close()
