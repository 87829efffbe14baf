"""compcache's policy on the real Device and Manager, over a fake ublk device and real stores:
the state machine (EBUSY, ENOTTY, ENODEV), the sizing rules and the memory limit; the Manager's
lock never held across a wait (a stuck init, reset or compaction blocks only its own device,
rolls back on failure, and never holds up teardown beyond its bound)."""
import errno
import os
import struct
import threading
import time

import pytest

from ublkzswap import devices
from ublkzswap.backing import SWAP_MAGIC

from fakeublk import (RAM, RecordingManager, backing_through_the_filesystem, make_swapfile,
                      medium_page, same_page, write_pages)

PAGE = 4096


def _errno(fn, *a):
    with pytest.raises(OSError) as e:
        fn(*a)
    return e.value.errno


@pytest.fixture
def m():
    mgr = RecordingManager(3)
    yield mgr
    mgr.teardown()


def page0(m, dev):
    out = bytearray(PAGE)
    m.store(dev).read(0, memoryview(out))
    return bytes(out)


def test_reserve_adds_every_id(m):
    assert m.devices() == [0, 1, 2]
    assert m.log == [("add", 0), ("add", 1), ("add", 2)]
    assert _errno(m.info, 7) == errno.ENODEV and _errno(m.init, "x") == errno.ENODEV


def test_state_machine_as_compcache(m):
    assert _errno(m.stats, 0) == errno.ENOTTY
    m.reset(0)                                   # uninitialised: nothing to do
    assert m.info(0)["state"] == "uninitialised"
    m.set_disksize_kb(0, 10240)
    m.init(0)
    assert m.info(0)["state"] == "initialised" and m.stats(0)["disksize"] == 10240 << 10
    assert _errno(m.init, 0) == errno.EBUSY
    assert _errno(m.set_disksize_kb, 0, 1) == errno.EBUSY
    assert _errno(m.set_backing_swap, 0, "/dev/sda2") == errno.EBUSY
    m.set_memlimit_kb(0, 100)                    # any state
    assert m.stats(0)["mem_limit"] == 100 << 10
    m.swapon(0)
    assert m.info(0)["state"] == "active"
    assert _errno(m.reset, 0) == errno.EBUSY     # refused while swapped on, data intact
    assert m.info(0)["state"] == "active" and page0(m, 0)[-10:] == SWAP_MAGIC
    m.swapoff(0)
    m.reset(0)
    assert m.info(0)["state"] == "uninitialised" and m.info(0)["disksize"] == 0
    assert m.log[-2:] == [("delete", 0), ("add", 0)]   # a fresh id for the next init


def test_reset_is_refused_for_any_opener_but_state_shows_only_holders(m):
    m.set_disksize_kb(1, 4096)
    m.init(1)
    m.ublks[1].openers = ["open by pid 4242"]
    assert m.info(1)["state"] == "initialised"
    with pytest.raises(OSError) as e:
        m.reset(1)
    assert e.value.errno == errno.EBUSY and "pid 4242" in e.value.strerror
    m.ublks[1].openers = []
    m.reset(1)


def test_init_writes_a_swap_header_sized_to_the_device_and_counts_it_nowhere(m):
    m.set_disksize_kb(0, 8192)
    m.init(0)
    st = m.stats(0)
    assert all(st[k] == 0 for k in ("num_writes", "pages_stored", "huge_pages", "good_compress",
                                    "compr_data_size", "mem_used_total")), st   # compcache 1.6
    h = page0(m, 0)
    assert h[-10:] == SWAP_MAGIC
    assert struct.unpack_from("<III", h, 1024) == (1, 8192 // 4 - 1, 0)
    assert m.log[-1] == ("start", 0, 8192 << 10)


def test_default_disksize_is_a_quarter_of_ram(m):
    m.init(2)
    assert m.stats(2)["disksize"] == (25 * (RAM // 100)) & ~4095


Q, P15 = (25 * (RAM // 100)) & ~4095, (15 * (RAM // 100)) & ~4095   # compcache: perc * (ram/100)


@pytest.mark.parametrize("disk_kb,mem_kb,backing,want", [
    (0, 0, None, (Q, 0)),                                 # no size given: 25% of RAM
    (10241, 7, None, (10240 << 10, 7 << 10)),            # page-aligned down
    (0, 0, 64 << 20, (64 << 20, P15)),                    # backing: its size, 15% of RAM
    (0, 0, 4 << 20, (4 << 20, 4 << 20)),                  # ... at most the disksize
    (0, 128 << 10, 64 << 20, (64 << 20, P15)),            # beyond the disksize: default
    (0, 1234, 64 << 20, (64 << 20, (1234 << 10) & ~4095)),   # a sane memlimit is kept
])
def test_sizing_rules(disk_kb, mem_kb, backing, want):
    assert devices.sizes(disk_kb, mem_kb, backing, RAM) == want


def test_init_with_a_backing_swap_takes_its_size_and_header(m, tmp_path, monkeypatch):
    backing_through_the_filesystem(monkeypatch)
    path = make_swapfile(tmp_path / "swap", 1024)                # 4 MiB
    m.set_backing_swap(1, path)
    m.set_disksize_kb(1, 10240)                                  # ignored with a backing swap
    m.init(1)
    s = m.stats(1)
    assert s["backing_swap"] == path and s["disksize"] == 4 << 20
    assert s["mem_limit"] == min(P15, 4 << 20) and 0 < s["mem_limit"] <= s["disksize"]
    assert m.info(1)["backing_swap"] == path
    h = page0(m, 1)
    assert h[-10:] == SWAP_MAGIC and struct.unpack_from("<I", h, 1028)[0] == 1024 - 1
    assert m.log[-1] == ("start", 1, 4 << 20)
    m.reset(1)
    assert m.info(1)["backing_swap"] == "" and m.devs[1].backing is None


def test_set_memlimit_on_a_target_without_one_changes_nothing():
    m = RecordingManager(1, target="ram")
    try:
        m.set_disksize_kb(0, 4096)
        m.set_memlimit_kb(0, 64)
        m.init(0)
        before = m.info(0)["mem_limit"]
        assert _errno(m.set_memlimit_kb, 0, 999) == errno.EOPNOTSUPP
        assert m.info(0)["mem_limit"] == before == 64 << 10
    finally:
        m.teardown()


def test_a_failed_start_leaves_the_device_uninitialised_and_reusable(m):
    m.ublks[0].fail_start = OSError(errno.EIO, "START_DEV of ublk device 0: I/O error")
    m.set_disksize_kb(0, 4096)
    assert _errno(m.init, 0) == errno.EIO
    assert m.info(0)["state"] == "uninitialised"
    m.init(0)
    assert m.info(0)["state"] == "initialised"


def test_a_failed_queue_shows_in_info_and_state(m):
    m.set_disksize_kb(0, 4096)
    m.init(0)
    m.ublks[0].failure = "queue thread ended: ValueError: boom"
    info = m.info(0)
    assert info["state"] == "failed" and "boom" in info["failure"]
    assert m.failures() == ["/dev/ublkb0: queue thread ended: ValueError: boom"]


def test_no_failures_while_queues_serve(m):
    m.set_disksize_kb(0, 4096)
    m.init(0)
    assert m.failures() == []


def test_stats_and_info_carry_the_store_counters(m):
    m.set_disksize_kb(0, 4096)
    m.init(0)
    s = m.store(0)
    s.write(PAGE, memoryview(os.urandom(PAGE)))
    st = m.stats(0)
    assert st["num_writes"] == 1 and st["huge_pages"] == 1 and st["invalid_io"] == 0
    m.ublks[0].counters.invalid_io = 3
    assert m.stats(0)["invalid_io"] == 3
    info = m.info(0)
    assert info["compr_data_size"] == PAGE and info["algorithm"] == "lzo"


def test_info_carries_what_the_list_columns_need(m):
    assert m.info(1)["queues"] == 1 and "mem_used_max" not in m.info(1)   # uninitialised
    m.set_disksize_kb(0, 4096)
    m.init(0)
    s = m.store(0)
    write_pages(s, 1, [medium_page() for _ in range(600)] + [same_page(0), same_page(7)])
    for i in range(1, 601, 2):                      # half of every segment freed...
        s.discard(i * PAGE, PAGE)
    assert m.compact(0) > 0                         # ...so compaction gives pages back
    info, st = m.info(0), m.stats(0)
    assert info["same_pages"] == st["same_pages"] == 2
    assert info["pages_compacted"] == st["pages_compacted"] > 0
    assert info["mem_used_max"] == st["mem_used_max"] > info["mem_used_total"]   # a peak
    m.ublks[0].nr_queues = 3
    assert m.info(0)["queues"] == 3


def test_busy_lists_held_devices_and_teardown_deletes_all(m):
    m.set_disksize_kb(0, 4096)
    m.init(0)
    assert m.busy() == []
    m.swapon(0)
    assert m.busy() == ["/dev/ublkb0"]
    m.swapoff(0)
    assert m.teardown() == []
    assert [e for e in m.log if e[0] == "delete"] == [("delete", 0), ("delete", 1), ("delete", 2)]


@pytest.mark.parametrize("kb", [(RAM // 8 // 17 * 4096 >> 10) + 64, 18446744073709551615 >> 10, 9999999999])
def test_a_disksize_whose_tables_the_machine_cannot_hold_is_refused(m, kb):
    m.set_disksize_kb(0, kb)
    with pytest.raises(OSError) as e:
        m.init(0)
    assert e.value.errno == errno.ENOMEM and "too large for this machine" in e.value.strerror
    assert m.info(0)["state"] == "uninitialised" and m.log == [("add", 0), ("add", 1), ("add", 2)]


def test_more_than_twice_ram_is_a_warning(m, caplog):
    import logging
    m.set_disksize_kb(0, 3 * RAM >> 10)
    with caplog.at_level(logging.WARNING, logger="ublkzswap.devices"):
        m.init(0)
    assert "more than twice RAM" in caplog.text


# ---------------------------------------------------------------- ops that wait, without the lock

class InThread:
    """``fn(*a)`` run in a thread: ``result`` or ``error`` once :meth:`join` returns."""

    def __init__(self, fn, *a):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, a), daemon=True)
        self.thread.start()

    def _run(self, fn, a):
        try:
            self.result = fn(*a)
        except BaseException as e:
            self.error = e

    def join(self, timeout=3.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the op did not end"
        return self


def quick(fn, *a):
    """``fn(*a)``, asserted to return within half a second (no wait behind the Manager lock)."""
    t0 = time.monotonic()
    out = fn(*a)
    assert time.monotonic() - t0 < 0.5, f"{fn.__name__} waited {time.monotonic() - t0:.2f} s"
    return out


def stuck_init(m, dev, *, arm_timeout=5.0):
    """Begin m.init(dev) in a thread whose queue does not arm until ``m.ublks[dev].arm`` is set."""
    m.ublks[dev].arm, m.ublks[dev].arm_timeout = threading.Event(), arm_timeout
    op = InThread(m.init, dev)
    assert m.ublks[dev].arming.wait(2)
    return op


def spy_stores(m, dev):
    """The stores (and their backing swaps) device ``dev``'s inits build, as they are built; a
    store's ``destroyed`` says whether destroy() (shared state removed) was called."""
    made = []
    real = m.devs[dev].store_factory

    def factory(*a, **kw):
        store = real(*a, **kw)
        store.destroyed = False
        real_destroy = store.destroy

        def destroy():
            store.destroyed = True
            real_destroy()
        store.destroy = destroy
        made.extend([store, kw.get("backing")])
        return store
    m.devs[dev].store_factory = factory
    return made


def test_a_stuck_init_holds_up_only_its_own_device(m):
    m.set_disksize_kb(0, 4096)
    m.set_disksize_kb(1, 4096)
    op = stuck_init(m, 0)
    assert quick(m.info, 0)["state"] == "initialising"
    assert [d["state"] for d in quick(lambda: [m.info(i) for i in m.devices()])] == \
        ["initialising", "uninitialised", "uninitialised"]
    quick(m.init, 1)
    assert quick(m.stats, 1)["disksize"] == 4096 << 10 and quick(m.info, 1)["state"] == "initialised"
    assert quick(m.busy) == [] and quick(m.failures) == []
    for call in [(m.init, 0), (m.stats, 0), (m.reset, 0), (m.compact, 0), (m.set_disksize_kb, 0, 8),
                 (m.set_memlimit_kb, 0, 8), (m.set_backing_swap, 0, "/x"),
                 (m.set_compressor, 0, "lz4")]:
        with pytest.raises(OSError) as e:
            quick(*call)
        assert e.value.errno == errno.EBUSY, call
        assert e.value.strerror == "device is being initialised", call
    m.ublks[0].arm.set()
    assert op.join().error is None
    assert m.info(0)["state"] == "initialised" and m.stats(0)["disksize"] == 4096 << 10


def test_an_init_whose_queue_never_arms_rolls_back_and_can_be_tried_again(m, tmp_path, monkeypatch):
    backing_through_the_filesystem(monkeypatch)
    m.set_backing_swap(0, make_swapfile(tmp_path / "swap", 1024))
    made = spy_stores(m, 0)
    op = stuck_init(m, 0, arm_timeout=0.3)
    err = op.join().error
    assert isinstance(err, OSError) and err.errno == errno.ETIMEDOUT
    assert m.info(0)["state"] == "uninitialised" and m.devs[0].target is None
    assert m.log[-4:] == [("start", 0, 4 << 20), ("stop", 0), ("delete", 0), ("add", 0)]
    store, backing = made
    assert store.destroyed and store.pool is None and backing.fd == -1   # store and swap gone
    assert m.info(0)["backing_swap"] == m.devs[0].backing_swap != ""   # the settings are kept
    m.ublks[0].arm = None
    m.init(0)
    assert m.info(0)["state"] == "initialised" and len(made) == 4 and made[2].pool is not None


def test_teardown_cancels_a_stuck_init_and_returns_at_once(m):
    m.set_disksize_kb(0, 4096)
    made = spy_stores(m, 0)
    op = stuck_init(m, 0, arm_timeout=30)
    assert quick(m.teardown) == []
    err = op.join().error
    assert isinstance(err, OSError) and err.errno == errno.ECANCELED
    assert m.devs == {} and not any(u.added for u in m.ublks.values())
    assert made[0].destroyed and made[0].pool is None
    assert [e for e in m.log if e[0] in ("stop", "delete")] == \
        [("stop", 0), ("delete", 0), ("delete", 0), ("delete", 1), ("delete", 2)]


def test_a_stuck_reset_holds_up_only_its_device_and_teardown_leaves_it_to_the_reset():
    m = RecordingManager(2, teardown_wait=0.3)
    m.set_disksize_kb(0, 4096)
    m.init(0)
    store = m.store(0)
    m.ublks[0].hold_delete = threading.Event()              # STOP_DEV / DEL_DEV slow to answer
    op = InThread(m.reset, 0)
    deadline = time.monotonic() + 2
    while m.log[-1] != ("delete", 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert quick(m.info, 0)["state"] == "resetting" and quick(m.info, 1)["state"] == "uninitialised"
    with pytest.raises(OSError) as e:
        quick(m.stats, 0)
    assert e.value.errno == errno.EBUSY and e.value.strerror == "device is being reset"
    t0 = time.monotonic()
    errors = m.teardown()
    assert time.monotonic() - t0 < 1
    assert len(errors) == 1 and "device 0: still being reset" in errors[0]
    assert list(m.devs) == [0] and not m.ublks[1].added     # the others are gone
    with pytest.raises(OSError) as e:
        m.compact(0)
    assert e.value.errno == errno.ESHUTDOWN
    m.ublks[0].hold_delete.set()
    assert op.join().error is None
    assert m.devs == {} and not m.ublks[0].added and store.pool is None   # torn down by the reset


def test_a_compaction_runs_without_the_lock_and_refuses_only_a_reset():
    m = RecordingManager(1)
    try:
        m.set_disksize_kb(0, 4096)
        m.init(0)
        gate = threading.Event()
        m.store(0).compact = lambda: gate.wait(3) and 7
        op = InThread(m.compact, 0)
        deadline = time.monotonic() + 2
        while m.devs[0].busy_with is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert quick(m.info, 0)["state"] == "initialised"
        assert quick(m.stats, 0)["disksize"] == 4096 << 10
        quick(m.set_memlimit_kb, 0, 100)
        for call in [(m.reset, 0), (m.compact, 0)]:
            with pytest.raises(OSError) as e:
                quick(*call)
            assert e.value.errno == errno.EBUSY and e.value.strerror == "device is being compacted"
        gate.set()
        assert op.join().result == 7 and m.stats(0)["mem_limit"] == 100 << 10
        m.reset(0)
        assert m.info(0)["state"] == "uninitialised"
    finally:
        m.teardown()
