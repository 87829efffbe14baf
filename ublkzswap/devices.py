"""compcache's policy: each device's state machine and the Manager the control socket drives.

Owns: what a device may do in which state, with compcache 0.6.2's errors
(../shared/docs/compcache-reference.md section 1.5) and sizing rules (section 1.3)::

    UNINITIALISED --init--> INITIALISED --swapon--> ACTIVE --swapoff--> INITIALISED
      (id reserved:          (store built, device started:                  --reset-->
       /dev/ublkcN only)      /dev/ublkbN exists, page 0 a swap header)     UNINITIALISED

- set_backing_swap / set_disksize_kb / init on an initialised device: EBUSY;
- stats before init: ENOTTY; reset of an uninitialised device: nothing to do;
- reset while the block device is in use (swap, a mount, a holder, any opener): EBUSY;
- memlimit may change in any state (beyond compcache: it applies to following writes);
- sizes: no disksize -> 25% of RAM; with a backing swap the disksize is the backing swap's,
  and the memlimit (0 or beyond the disksize) becomes 15% of RAM, at most the disksize.

A :class:`Device` holds a *ublk device* (:class:`ublkzswap.ublkdev.UblkDevice`: ``add,
start(target, backing_fd=), stop, delete, bdev, users(openers=), failure, counters,
nr_queues`` and optionally ``cancel_start()``), made by the factory the :class:`Manager` is
given: the real one in the daemon, a fake in the unit tests.

Locking: the Manager's one lock guards every device's fields and is never held across a wait
(on the kernel, a thread or memory). An op that waits -- ``init`` (builds the store, starts
the ublk device, waits up to the arm timeout for its queue), ``reset`` (STOP_DEV, joins the
queue thread, DEL_DEV, removes the store's shared state) and ``compact`` -- checks and marks
the device under the lock (:attr:`Device.busy_with`), does its work without it, and
records the outcome under it again. Meanwhile that device answers every op but ``info`` with
EBUSY ("device is being initialised" / "reset" / "compacted"; stats and set_memlimit_kb are
allowed during a compaction), its ``info`` shows the state "initialising" or "resetting", and
every other device, ``list`` and the daemon's stop path go on at once. A failed or timed-out
init undoes everything it made: the store destroyed (shared state removed), the backing swap
closed, the ublk device stopped and its id added afresh; the device is uninitialised again.
What stays under the lock is short: reading /proc and sysfs for the block device's holders,
a store's memlimit and stats (the store's own lock, which a write that is not a swap-out may
hold up to its ``alloc_wait``, 2 s, while it waits for memory), and teardown's own deletes (the
control server is closed by then).

Teardown (the daemon stopping) refuses new waiting ops (ESHUTDOWN), cancels an init's wait for
its queue to arm (``cancel_start``: the init rolls back at once) and waits for the ops under
way, at most TEARDOWN_WAIT s (the lock released meanwhile); a device whose op is still under
way then is left to that op, which tears the device down itself when it ends, and is named
in teardown's errors.

Still naive: "in use" can change right after it was checked; a compaction cannot be cancelled
(teardown waits for it); a kernel command under way (START_DEV, DEL_DEV) is not interrupted.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from . import compress, memory, stats as statsmod
from .backing import Backing, swap_header
from .handler import describe
from .target import NullTarget, RamTarget
from .uapi import PAGE_SIZE

ALREADY = "Device already initialized!"       # compcache's words
TABLE_BYTES_PER_PAGE = 17          # slot table (16) + arena and allocator state, per 4 KiB
TABLE_SHARE_OF_RAM = 8             # a device's tables may lock at most 1/8 of RAM
log = logging.getLogger("ublkzswap.devices")
DEFAULT_DISKSIZE_PERC_RAM = 25
DEFAULT_MEMLIMIT_PERC_RAM = 15
INITIALISING, RESETTING, COMPACTING = "initialising", "resetting", "compacting"
BEING = {INITIALISING: "initialised", RESETTING: "reset", COMPACTING: "compacted"}
TEARDOWN_WAIT = 10.0   # seconds teardown waits for ops under way (a cancelled init, a compaction)


def check_disksize(disksize: int, ram: int) -> None:
    """Refuse (ENOMEM) a disksize whose tables would lock more than 1/8 of RAM; warn above
    twice RAM, as compcache did ("usually a misconfiguration")."""
    need = disksize // PAGE_SIZE * TABLE_BYTES_PER_PAGE
    if need > ram // TABLE_SHARE_OF_RAM:
        raise OSError(errno.ENOMEM, f"disksize {disksize >> 10} kB is too large for this machine: "
                      f"its tables alone would lock {need >> 20} MiB (at most 1/"
                      f"{TABLE_SHARE_OF_RAM} of RAM, {ram // TABLE_SHARE_OF_RAM >> 20} MiB)")
    if disksize > 2 * ram:
        log.warning("disksize %d kB is more than twice RAM (%d kB): this is usually a "
                    "misconfiguration", disksize >> 10, ram >> 10)


def total_ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE


def sizes(disksize_kb: int, memlimit_kb: int, backing_size: int | None,
          ram: int) -> tuple[int, int]:
    """(disksize, memlimit) in bytes by compcache's rules (the module docstring)."""
    if backing_size is not None:
        memlimit = memlimit_kb * 1024
        if memlimit == 0 or memlimit > backing_size:
            memlimit = min(DEFAULT_MEMLIMIT_PERC_RAM * (ram // 100), backing_size)
        return backing_size, memlimit & ~(PAGE_SIZE - 1)
    disksize = disksize_kb * 1024 or DEFAULT_DISKSIZE_PERC_RAM * (ram // 100)
    return disksize & ~(PAGE_SIZE - 1), memlimit_kb * 1024


class Device:
    """One reserved id: its compcache state and, once initialised, its target."""

    def __init__(self, ublk, cfg: dict, *, store_factory, ram: int | None = None):
        self.ublk = ublk
        self.dev_id = ublk.dev_id
        self.cfg = cfg
        self.store_factory = store_factory
        self.ram = total_ram_bytes() if ram is None else ram
        self.disksize_kb = self.memlimit_kb = 0
        self.backing_swap = ""
        self.compressor = ""            # its own algorithm ("": the daemon's); kept by a reset
        self.target = None
        self.backing = None
        self.takeover_error: str | None = None    # why taking this started device over failed
        self.held_new_bytes = 0   # new memory the takeover took while the kernel held the I/O
        self.busy_with: str | None = None   # INITIALISING, RESETTING or COMPACTING: under way
                                            # without the Manager lock (module docstring)

    def check_idle(self, *allowed: str) -> None:
        """EBUSY if an op other than ``allowed`` is under way on this device."""
        if self.busy_with is not None and self.busy_with not in allowed:
            raise OSError(errno.EBUSY, f"device is being {BEING[self.busy_with]}")

    @property
    def initialised(self) -> bool:
        return self.target is not None

    @property
    def bdev(self) -> str:
        return self.ublk.bdev

    @property
    def state(self) -> str:
        if self.busy_with in (INITIALISING, RESETTING):
            return self.busy_with
        if self.takeover_error is not None:
            return "failed"
        if not self.initialised:
            return "uninitialised"
        if self.ublk.failure is not None:
            return "failed"
        return "active" if self.ublk.users() else "initialised"

    def adopt(self) -> None:
        """Take over this started device from a server that died: its store from the state it
        left, its backing swap reopened, the kernel's requests flowing to us again.

        OSError if its shared state cannot be attached (its pages are gone). If the kernel
        side fails once the state is attached, :attr:`takeover_error` says why and the device
        is left quiesced with its pages (see ``UblkDevice.recover``) for the next server; the
        target stays open, as a queue thread may have started on it."""
        before = memory.new_memory_bytes()
        target = self.store_factory(self.dev_id, 0, adopt=True,
                                    open_backing=lambda path: Backing(path, adopt=True))
        backing = target.backing
        try:
            self.ublk.recover(target, backing_fd=backing.fd if backing is not None else -1)
        except Exception as e:
            self.takeover_error = describe(e)
            return
        finally:
            self.held_new_bytes = memory.new_memory_bytes() - before
        resume = getattr(target, "resume", None)
        if resume is not None:
            resume()          # what needs new memory, now that the kernel's requests flow again
        self._watch(target)
        self.target, self.backing = target, backing
        self.backing_swap = backing.name if backing is not None else ""
        self.disksize_kb = target.size // 1024
        self.memlimit_kb = target.memlimit // 1024

    def _watch(self, target) -> None:
        """Have the target hear of the kernel's freed swap slots on the block device one by
        one (``slot_free=on``, the default), where the kernel offers that; logged once if
        not."""
        watch = getattr(target, "watch_freed_slots", None)
        if watch is None or self.cfg.get("slot_free", "on") != "on":
            return
        why = watch(self.bdev)
        if why:
            log.info("%s: freed swap slots are heard of only by whole discarded clusters: %s",
                     self.bdev, why)

    def plan_init(self) -> tuple:
        """Check that init may begin (the Manager lock held); what :meth:`build` takes."""
        if self.initialised:
            raise OSError(errno.EBUSY, ALREADY)
        self.check_idle()
        kind = self.cfg["target"]
        if self.backing_swap and kind != "compressed":
            raise OSError(errno.EINVAL, "a backing swap needs target=compressed")
        return (kind, self.backing_swap, self.disksize_kb, self.memlimit_kb,
                self.compressor or self.cfg["compressor"])

    def build(self, plan: tuple) -> tuple:
        """Open the backing swap, build the target, write its swap header and start the ublk
        device: the waiting part of init, run without the Manager lock (it changes no field
        of this Device). On failure everything made here is undone (the store destroyed, the
        backing swap closed, the ublk device stopped and its id added afresh) and the error
        raised. Returns what :meth:`commit` takes."""
        kind, backing_swap, disksize_kb, memlimit_kb, compressor = plan
        backing = Backing(backing_swap) if backing_swap else None
        target = None
        try:
            disksize, memlimit = sizes(disksize_kb, memlimit_kb,
                                       backing.size if backing is not None else None, self.ram)
            if disksize < PAGE_SIZE * 2:
                raise OSError(errno.EINVAL, "disksize too small")
            check_disksize(disksize, self.ram)
            if kind == "ram":
                target = RamTarget(disksize)
            elif kind == "null":
                target = NullTarget(disksize)
            else:
                target = self.store_factory(self.dev_id, disksize, memlimit=memlimit,
                                            backing=backing, compressor=compressor)
            if kind != "null":
                header = backing.header() if backing is not None else swap_header(disksize)
                preformat = getattr(target, "preformat", None)
                if preformat is not None:
                    preformat(header)           # compcache: page 0 counted nowhere
                else:
                    target.write(0, memoryview(bytearray(header)))
            try:
                self.ublk.start(target, backing_fd=backing.fd if backing is not None else -1)
            except BaseException:
                self.ublk.delete()           # a fresh id for the next try
                self.ublk.add()
                raise
            self._watch(target)
        except BaseException:
            _discard(target, backing)
            raise
        return target, backing, disksize, memlimit

    def commit(self, built: tuple) -> None:
        """The device is initialised with what :meth:`build` made (the Manager lock held)."""
        self.target, self.backing, disksize, memlimit = built
        self.disksize_kb, self.memlimit_kb = disksize // 1024, memlimit // 1024

    def detach(self) -> tuple | None:
        """Begin a reset (the Manager lock held): EBUSY while anything holds or has the block
        device open; None if uninitialised (nothing to do); else the device is uninitialised
        from here on and what it had is returned (for :meth:`Manager.reset`)."""
        if not self.initialised:
            return None
        busy = self.ublk.users(openers=True)
        if busy:
            raise OSError(errno.EBUSY, f"{self.bdev} is in use ({', '.join(busy)}): swapoff first")
        had = self.target, self.backing, self.disksize_kb, self.memlimit_kb, self.backing_swap
        self.target = self.backing = None
        self.disksize_kb = self.memlimit_kb = 0
        self.backing_swap = ""
        return had

    def restore(self, had: tuple) -> None:
        """Undo :meth:`detach` (the Manager lock held): the ublk device could not be deleted."""
        self.target, self.backing, self.disksize_kb, self.memlimit_kb, self.backing_swap = had

    def teardown(self) -> None:
        self.ublk.delete()
        self._drop()

    def _drop(self) -> None:
        _discard(self.target, self.backing)
        self.target = self.backing = None

    def set_memlimit_kb(self, kb: int) -> None:
        if self.initialised:
            setter = getattr(self.target, "set_memlimit", None)
            if setter is None:
                raise OSError(errno.EOPNOTSUPP, "this target has no memory limit")
            setter(kb * 1024)
        self.memlimit_kb = kb

    def compactor(self):
        """The target's compact(), to call without the Manager lock: ENOTTY if not
        initialised, EOPNOTSUPP if the target cannot move its pages."""
        if not self.initialised:
            raise OSError(errno.ENOTTY, "device not initialised")
        compact = getattr(self.target, "compact", None)
        if compact is None:
            raise OSError(errno.EOPNOTSUPP, "this target does not compact")
        return compact

    def stats(self) -> dict:
        if not self.initialised:
            raise OSError(errno.ENOTTY, "device not initialised")
        own = getattr(self.target, "stats", None)
        st = statsmod.empty()
        st.update(disksize=self.target.size, mem_limit=self.memlimit_kb * 1024,
                  backing_swap=self.backing_swap)
        if own is not None:
            st.update(own())
        else:                         # a plain target: what the queue saw
            c = self.ublk.counters
            st.update(num_reads=c.reads, num_writes=c.writes)
        c = self.ublk.counters
        st["invalid_io"] = getattr(c, "invalid_io", 0) if c is not None else 0
        return st

    def algorithm(self) -> str:
        """The compression algorithm its pages are (or will be) stored with; the target's name
        for a target that does not compress."""
        if self.cfg["target"] != "compressed":
            return self.cfg["target"]
        if self.initialised:
            return self.target.algorithm       # as stored: a device taken over keeps its own
        return self.compressor or self.cfg["compressor"]

    def info(self) -> dict:
        """What ``rzscontrol --list`` shows: state, sizes and algorithm in any state; the
        memory counters (zram's mm_stat names) once initialised."""
        d = {"dev": self.dev_id, "state": self.state, "queues": self.ublk.nr_queues,
             "disksize": self.target.size if self.initialised else self.disksize_kb * 1024,
             "mem_limit": self.memlimit_kb * 1024, "backing_swap": self.backing_swap,
             "algorithm": self.algorithm()}
        if self.initialised:
            st = self.stats()
            d.update({k: st.get(k, 0) for k in ("orig_data_size", "compr_data_size",
                                                "mem_used_total", "mem_used_max", "same_pages",
                                                "pages_compacted")})
            if self.ublk.failure is not None:
                d["failure"] = self.ublk.failure
        return d


def _close(target, backing=None) -> None:
    """Close a target (if it has anything to close) and a backing swap (if any)."""
    close = getattr(target, "close", None)
    if close is not None:
        close()
    if backing is not None:
        backing.close()


def _discard(target, backing=None) -> None:
    """Destroy a target this server made (a store's shared state is removed: it outlives
    processes, not a reset, a teardown or a failed init), close it and the backing swap."""
    destroy = getattr(target, "destroy", None)
    if destroy is not None:
        destroy()
    _close(target, backing)


class Manager:
    """The devices of this daemon, as the control socket sees them (docs/CONTRACTS.md).
    One lock guards the devices' fields and is never held across a wait: init, reset and
    compact mark their device busy under it and wait without it (the module docstring).
    Refusals are OSError(errno); unknown id: ENODEV; a waiting op once teardown has begun:
    ESHUTDOWN.

    ``make_ublk(dev_id)`` gives a ublk device; ``store_factory(disksize, memlimit=, backing=,
    compressor=)`` a store; ``teardown_wait``: seconds :meth:`teardown` waits for ops under
    way (TEARDOWN_WAIT)."""

    def __init__(self, cfg: dict, make_ublk, store_factory, *, ram: int | None = None,
                 teardown_wait: float | None = None):
        self.cfg = cfg
        self.make_ublk = make_ublk
        self.store_factory = store_factory
        self.ram = ram
        self.teardown_wait = TEARDOWN_WAIT if teardown_wait is None else teardown_wait
        self.devs: dict[int, Device] = {}
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)   # notified when an op under way ends
        self._closing = False                 # teardown has begun: no new waiting op
        self._left: set[int] = set()          # devices teardown left to the op under way

    def reserve_all(self, adopt: bool = False) -> list[str]:
        """ADD_DEV ids 0..num_devices-1. With ``adopt``, ids our own or a dead ublkzswapd left
        are taken over instead: reserved ones as reserved, started ones with their stored
        pages. Returns one line per device that could not be taken over (it is deleted and
        added afresh: its pages are lost)."""
        problems = []
        for i in range(self.cfg["num_devices"]):
            ublk = self.make_ublk(i)
            state = ublk.acquire() if adopt else (ublk.add() or "new")
            dev = Device(ublk, self.cfg, store_factory=self.store_factory, ram=self.ram)
            if state == "started":
                try:
                    dev.adopt()
                except OSError as e:
                    problems.append(f"device {i}: cannot take it over ({e.strerror or e}): "
                                    "its pages are lost")
                    ublk.delete()
                    ublk.add()
                if dev.takeover_error is not None:
                    problems.append(f"device {i}: cannot take it over ({dev.takeover_error}): "
                                    "left quiesced with its pages for the next server")
            self.devs[i] = dev
        return problems

    def held_new_bytes(self) -> int:
        """New memory the takeovers of :meth:`reserve_all` took while the kernel held the
        devices' I/O (see ``Device.adopt``): what the deadlock the standby exists to avoid
        would need."""
        with self._lock:
            return sum(d.held_new_bytes for d in self.devs.values())

    def _dev(self, dev_id) -> Device:
        try:
            return self.devs[int(dev_id)]
        except (KeyError, ValueError, TypeError):
            raise OSError(errno.ENODEV, f"no device {dev_id}") from None

    def devices(self) -> list[int]:
        return sorted(self.devs)

    def _begin(self, dev_id, what: str, check) -> tuple[Device, object]:
        """Under the lock: the device and what ``check(device)`` returns (it raises to refuse);
        unless that is None (nothing to do), the device is marked busy with ``what`` until
        :meth:`_end`."""
        with self._lock:
            d = self._dev(dev_id)
            if self._closing:
                raise OSError(errno.ESHUTDOWN, "the daemon is stopping")
            got = check(d)
            if got is not None:
                d.busy_with = what
            return d, got

    def _end(self, d: Device) -> bool:
        """The op under way on ``d`` has ended. If teardown left ``d`` to it, ``d`` is torn
        down now (errors logged) and True returned."""
        with self._lock:
            d.busy_with = None
            self._idle.notify_all()
            if d.dev_id not in self._left:
                return False
            self._left.discard(d.dev_id)
            self.devs.pop(d.dev_id, None)
            try:
                d.teardown()
            except OSError as e:
                log.error("teardown of device %d (left to an op under way): %s", d.dev_id, e)
            return True

    def _uninitialised(self, dev_id) -> Device:
        """The device, for a setting only an uninitialised one takes (the lock held): EBUSY
        once initialised or while an op is under way on it."""
        d = self._dev(dev_id)
        if d.initialised:
            raise OSError(errno.EBUSY, ALREADY)
        d.check_idle()
        return d

    def set_backing_swap(self, dev_id: int, path: str) -> None:
        with self._lock:
            self._uninitialised(dev_id).backing_swap = str(path)

    def set_memlimit_kb(self, dev_id: int, kb: int) -> None:
        with self._lock:
            d = self._dev(dev_id)
            d.check_idle(COMPACTING)
            d.set_memlimit_kb(int(kb))

    def set_disksize_kb(self, dev_id: int, kb: int) -> None:
        with self._lock:
            self._uninitialised(dev_id).disksize_kb = int(kb)

    def set_compressor(self, dev_id: int, name: str) -> None:
        """The device's own compression algorithm ("": the daemon's), used from its next init.
        EINVAL for a name compress.names() does not have."""
        with self._lock:
            d = self._uninitialised(dev_id)
            if name and name not in compress.names():
                raise OSError(errno.EINVAL, f"unknown compression algorithm {name!r}")
            d.compressor = str(name)

    def init(self, dev_id: int) -> None:
        """Build the store and start the ublk device, waiting for its queue to arm (up to the
        ublk device's arm timeout) without the lock; rolled back on failure."""
        d, plan = self._begin(dev_id, INITIALISING, Device.plan_init)
        try:
            built = d.build(plan)
        except BaseException:
            self._end(d)
            raise
        with self._lock:
            d.commit(built)
            if self._end(d):
                raise OSError(errno.ESHUTDOWN, "the daemon stopped meanwhile: device torn down")

    def reset(self, dev_id: int) -> None:
        """STOP_DEV and DEL_DEV, the store destroyed, the id added afresh (without the lock).
        If the ublk device cannot be deleted, the device keeps its store (a reset may be
        tried again) and the error is raised."""
        def check(d):
            d.check_idle()
            return d.detach()
        d, had = self._begin(dev_id, RESETTING, check)
        if had is None:
            return
        try:
            d.ublk.delete()
        except BaseException:
            with self._lock:
                d.restore(had)
                self._end(d)
            raise
        try:
            _discard(had[0], had[1])
            d.ublk.add()
        finally:
            self._end(d)

    def compact(self, dev_id: int) -> int:
        def check(d):
            d.check_idle()
            return d.compactor()
        d, compact = self._begin(dev_id, COMPACTING, check)
        try:
            return compact()
        finally:
            self._end(d)

    def stats(self, dev_id: int) -> dict:
        with self._lock:
            d = self._dev(dev_id)
            d.check_idle(COMPACTING)
            return d.stats()

    def info(self, dev_id: int) -> dict:
        with self._lock:
            return self._dev(dev_id).info()

    def busy(self) -> list[str]:
        """Block devices that must not disappear now (swap, mounts, holders)."""
        with self._lock:
            return [d.bdev for d in self.devs.values() if d.initialised and d.ublk.users()]

    def failures(self) -> list[str]:
        """One line per started device whose queue thread has ended or that could not be taken
        over (it serves no more)."""
        with self._lock:
            return [f"{d.bdev}: {d.ublk.failure}" for d in self.devs.values()
                    if d.initialised and d.ublk.failure is not None] + \
                [f"{d.bdev}: takeover failed: {d.takeover_error}" for d in self.devs.values()
                 if d.takeover_error is not None]

    def teardown(self) -> list[str]:
        """Stop and delete every device; returns the errors met (one line each).

        From now on a waiting op is refused (ESHUTDOWN). An init waiting for its queue to arm
        is cancelled (it rolls back); ops under way are waited for, the lock released, at
        most ``teardown_wait`` s in all. A device whose op is still under way then is left to
        that op, which tears it down when it ends (if the process has not ended first), and
        named in the errors: never torn down under an op, never waited for without bound."""
        errors = []
        with self._lock:
            self._closing = True
            for d in self.devs.values():
                cancel = getattr(d.ublk, "cancel_start", None)
                if d.busy_with == INITIALISING and cancel is not None:
                    cancel()
            deadline = time.monotonic() + self.teardown_wait
            while any(d.busy_with is not None for d in self.devs.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            for dev in list(self.devs.values()):
                if dev.busy_with is not None:
                    self._left.add(dev.dev_id)
                    errors.append(f"teardown of device {dev.dev_id}: still being "
                                  f"{BEING[dev.busy_with]} after {self.teardown_wait:g} s; "
                                  "left to that op, which tears it down when it ends")
                    continue
                del self.devs[dev.dev_id]
                try:
                    dev.teardown()
                except OSError as e:
                    errors.append(f"teardown of device {dev.dev_id}: {e}")
        return errors
