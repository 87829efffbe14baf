"""A fake ublk device (the interface of ublkzswap.ublkdev.UblkDevice) and the real Manager
built on it, with real stores: the compcache policy tested without a kernel."""
from __future__ import annotations

import errno
import functools
import mmap
import os
import threading
import time

from ublkzswap import devices
from ublkzswap.backing import Backing, swap_header
from ublkzswap.devices import Manager
from ublkzswap.handler import QueueCounters
from ublkzswap.store import Store
from ublkzswap.target import run_backing_io

PAGE = 4096

RAM = 64 << 20        # what the policy believes the machine has: 25% is a 16 MiB device


class FakeUblk:
    """Records the control commands; ``holders`` is what holds the block device (as
    ``users()`` reports it: "swap", "mounted", "open by pid N"); ``fail_start`` makes the next
    start raise it; ``failure`` can be set to simulate a queue thread that ended.

    A queue that is slow to arm: with ``arm`` an Event, start waits for it as the real device
    waits for its queue -- until it is set, ``arm_timeout`` s pass (ETIMEDOUT) or
    :meth:`cancel_start` is called (ECANCELED); either failure stops what was started, as the
    real one does. ``arming`` is set once start waits; ``hold_delete`` (an Event) makes delete
    wait for it, as a STOP_DEV / DEL_DEV that the kernel is slow to answer."""

    nr_queues = 1

    def __init__(self, dev_id: int, log: list):
        self.dev_id = dev_id
        self.log = log
        self.added = self.started = False
        self.target = None
        self.holders: list[str] = []
        self.openers: list[str] = []
        self.fail_start: BaseException | None = None
        self.failure = None
        self.counters = None
        self.arm: threading.Event | None = None
        self.arm_timeout = 5.0
        self.arming = threading.Event()
        self.cancelled = threading.Event()
        self.hold_delete: threading.Event | None = None

    @property
    def bdev(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    def add(self):
        assert not self.added, "ADD_DEV twice"
        self.log.append(("add", self.dev_id))
        self.added = True
        self.cancelled.clear()

    def acquire(self):
        self.add()
        return "new"

    def start(self, target, *, backing_fd=-1):
        assert self.added and not self.started
        self.log.append(("start", self.dev_id, target.size))
        if self.fail_start is not None:
            e, self.fail_start = self.fail_start, None
            raise e
        if self.arm is not None:
            self.arming.set()
            deadline = time.monotonic() + self.arm_timeout
            while not self.arm.wait(0.01):
                if self.cancelled.is_set() or time.monotonic() >= deadline:
                    self.log.append(("stop", self.dev_id))
                    if self.cancelled.is_set():
                        raise OSError(errno.ECANCELED, f"start of {self.bdev} cancelled")
                    raise OSError(errno.ETIMEDOUT, f"queue of {self.bdev} not armed in "
                                  f"{self.arm_timeout:g} s")
        self.target, self.started = target, True
        self.counters = QueueCounters()

    def cancel_start(self):
        self.cancelled.set()

    def stop(self):
        self.started = False

    def delete(self):
        self.log.append(("delete", self.dev_id))
        if self.hold_delete is not None:
            self.hold_delete.wait(10)
        self.stop()
        self.added = False
        self.target = None
        self.holders, self.openers = [], []

    def users(self, *, openers=False):
        if not self.started:
            return []
        return list(self.holders) + (list(self.openers) if openers else [])


def small_store(dev_id, disksize, **kw):
    return Store(disksize, keeper=False, inline_refill=True, low=4, high=16, **kw)


class RecordingManager(Manager):
    """The real Manager, recording the calls the control socket makes."""

    CALLS = ("devices", "set_backing_swap", "set_memlimit_kb", "set_disksize_kb", "init",
             "reset", "compact", "stats", "info")

    def __init__(self, num_devices=2, *, ram=RAM, target="compressed", teardown_wait=None):
        self.log: list = []
        self.ublks: dict[int, FakeUblk] = {}
        self.calls: list = []

        def make(i):
            self.ublks[i] = FakeUblk(i, self.log)
            return self.ublks[i]

        super().__init__({"num_devices": num_devices, "target": target, "compressor": "lzo"},
                         make, small_store, ram=ram, teardown_wait=teardown_wait)
        self.reserve_all()

    def __getattribute__(self, name):
        if name in RecordingManager.CALLS:
            real = super().__getattribute__(name)

            def call(*a):
                self.calls.append((name, *a))
                return real(*a)
            return call
        return super().__getattribute__(name)

    # test helpers
    def swapon(self, dev):
        if not self.devs[dev].initialised:
            raise OSError(errno.EINVAL, "not initialised")
        self.ublks[dev].holders = ["swap"]

    def swapoff(self, dev):
        self.ublks[dev].holders = []

    def store(self, dev):
        return self.devs[dev].target


# pages of known kinds, for tests that check counters they caused

def text_page(i: int) -> bytes:
    """Compresses well (lzo: about 100 bytes): good_compress."""
    return (f"page {i}: the quick brown fox jumps over the lazy dog. " * 100).encode()[:PAGE]


def medium_page() -> bytes:
    """Compresses, but to more than half a page (lzo: about 2660 bytes): stored, not good."""
    return os.urandom(2500) + bytes(PAGE - 2500)


def random_page() -> bytes:
    """Incompressible: kept raw (huge_pages), or forwarded to a backing swap."""
    return os.urandom(PAGE)


def same_page(word: int) -> bytes:
    """Every 8-byte word equal: no memory (zero_pages if 0, else same_pages)."""
    return word.to_bytes(8, "little") * (PAGE // 8)


def write_pages(store, first: int, pages) -> None:
    """Write ``pages`` to slots ``first``.. through the target API, one request each, doing the
    backing I/O a write asks for as the queue would."""
    buf = memoryview(mmap.mmap(-1, PAGE))             # page-aligned, as O_DIRECT wants
    for i, page in enumerate(pages):
        buf[:] = page
        pending = store.write((first + i) * PAGE, buf)
        if pending is not None:
            run_backing_io(pending, buf)


def read_page(store, index: int) -> bytes:
    buf = memoryview(mmap.mmap(-1, PAGE))
    pending = store.read(index * PAGE, buf)
    if pending is not None:
        run_backing_io(pending, buf)
    return bytes(buf)


def make_swapfile(path, pages: int) -> str:
    """A regular file of ``pages`` pages, no holes, mkswap'd (a swap header in page 0)."""
    with open(path, "wb") as f:
        f.write(swap_header(pages * PAGE) + bytes((pages - 1) * PAGE))
    return str(path)


def backing_through_the_filesystem(monkeypatch) -> None:
    """Make the Manager open backing swaps as test_backing.py does (``remap=False``): on ext4
    the real Backing would write to the block device under the test's temp file."""
    monkeypatch.setattr(devices, "Backing", functools.partial(Backing, remap=False))
