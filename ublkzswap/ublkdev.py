"""One ublk device: its control commands in order, and the threads that serve its queues.

Owns: the life of ``/dev/ublkcN`` and ``/dev/ublkbN`` for one device id, as libublk-rs splits
it (ctrl.rs / io.rs): ADD_DEV reserves the id with ``nr_queues`` hardware queues
(``/dev/ublkcN`` appears); :meth:`start` takes a target, sends SET_PARAMS from what the target
offers, starts one thread per queue (each maps its own descriptor array, creates its own ring
and FETCHes every tag of its queue: the kernel takes a queue's commands only from the thread
that FETCHed them) and, once every queue is armed, START_DEV -- served meanwhile by those
threads, since START_DEV waits for the partition scan's reads
(../shared/docs/ublk-protocol.md sections 1-3); :meth:`stop` STOP_DEVs and joins every
thread; :meth:`delete` DEL_DEVs. All queues live in this process: ublk lets one process
only map a device's descriptor arrays (a child forked after they are mapped could serve a
queue: tools/probe_procqueues.py; the store is not yet shared across processes). It knows
nothing of compcache: the policy
(:mod:`ublkzswap.devices`) drives it, and calls :meth:`start` without its lock held: waiting
for the queues to arm (at most ``arm_timeout`` s) can be given up early with
:meth:`cancel_start`, from another thread (a daemon that is stopping).

The kernel clamps ``nr_hw_queues`` to its CPUs: ADD_DEV's answer is what is served. A device
acquired from a dead server keeps the geometry its kernel device has (queues, depth, buffer
size, from GET_DEV_INFO), whatever this server was configured with: recovery ends only once
every tag of every queue has its FETCH again.

A queue thread that ends while the device is started is a failure: :attr:`failure` says which
and why. What holds the block device (:func:`block_users`) is read from /proc and sysfs:
probing with an exclusive open would make a concurrent swapon or mount fail with EBUSY.

Memory per queue (locked, all made before the device serves): its tag buffers (``depth`` x
``buf_bytes``: 2 MiB by default), its thread's stack (memory.THREAD_STACK, 256 KiB, locked
whole), its ring (~20 KiB) and descriptor page, and QUEUE_HEAP of heap headroom for a
compressor's scratch while the other queues compress too.

Still naive: queue threads are not pinned to the CPUs their queue serves (GET_QUEUE_AFFINITY);
every queue has the same depth, however many there are.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from . import shmstate, uapi, ublkctrl
from .handler import QueueCounters
from .memory import HEAP_HEADROOM, ensure_heap_headroom
from .queue import Queue, open_cdev
from .target import features

log = logging.getLogger("ublkzswap.ublkdev")

QUEUE_DEPTH = 64
IO_BUF_BYTES = 32 * 1024     # per tag, populated and locked: 2 MiB for depth 64; swap-in
                             # reads up to 8 pages (vm.page-cluster 3), longer writes split
QUEUE_HEAP = 512 << 10      # heap headroom per queue thread beyond the first: a compression's
                             # scratch (lzo 132 KiB, deflate 294 KiB) beside the others'
ARM_TIMEOUT = 30.0
ARM_POLL = 0.05              # seconds between looks at a cancel while a new queue arms
IO_TIMEOUT_MS = 500          # a request's timeout: how soon a dead server's held requests go back
RECOVERY_WAIT = 30.0         # seconds between log lines while a dead server's device is quiesced
RECOVERY_FLAGS = uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
STATES = {uapi.UBLK_S_DEV_DEAD: "dead", uapi.UBLK_S_DEV_LIVE: "live",
          uapi.UBLK_S_DEV_QUIESCED: "quiesced"}


def block_users(bdev: str, *, openers: bool = False) -> list[str]:
    """What holds block device ``bdev`` now: active swap, a mount, a holder (dm, md, ...) and,
    with ``openers``, any process that has it open. Read from /proc and sysfs: probing with an
    exclusive open would make a concurrent swapon or mount fail with EBUSY."""
    try:
        rdev = os.stat(bdev).st_rdev
    except OSError:
        return []
    out = []
    try:
        for line in open("/proc/swaps").read().splitlines()[1:]:
            name = line.split()[0].replace("\\040", " ")
            if name.startswith("/") and _rdev(name) == rdev:
                out.append("swap")
        for line in open("/proc/self/mountinfo"):
            major, minor = line.split()[2].split(":")
            if os.makedev(int(major), int(minor)) == rdev:
                out.append("mounted")
                break
    except OSError:
        pass
    holders = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders"
    if os.path.isdir(holders) and os.listdir(holders):
        out.append("held by " + ",".join(sorted(os.listdir(holders))))
    if openers:
        out += [f"open by pid {pid}" for pid in _openers(rdev)]
    return out


def _rdev(path: str) -> int | None:
    try:
        return os.stat(path).st_rdev
    except OSError:
        return None


def _openers(rdev: int) -> list[int]:
    me, pids = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                path = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if path.startswith("/dev/") and int(pid) != me and _rdev(path) == rdev:
                pids.append(int(pid))
                break
    return pids


def _heap_for_queues() -> None:
    """Heap headroom for the I/O path: HEAP_HEADROOM, plus QUEUE_HEAP for every queue thread
    of this process beyond the first (their compressions take scratch from the heap at the
    same time)."""
    threads = sum(1 for t in threading.enumerate() if t.name.startswith("ublkq"))
    ensure_heap_headroom(HEAP_HEADROOM + QUEUE_HEAP * max(0, threads - 1))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: a dead server waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class UblkDevice:
    """Device ``dev_id`` on the ublk control device ``ctrl`` (a :class:`ublkctrl.Control`)."""

    def __init__(self, ctrl: ublkctrl.Control, dev_id: int, *, nr_queues: int = 1,
                 depth: int = QUEUE_DEPTH, buf_bytes: int = IO_BUF_BYTES,
                 owner: int | None = None, arm_timeout: float | None = None):
        """``nr_queues``: ADD_DEV's nr_hw_queues, one serving thread each (the kernel may
        clamp it; a device taken over keeps its own); ``owner``: the pid that claims the id
        (default: this process, the server); ``arm_timeout``: seconds :meth:`start` waits for
        new queues to arm (ARM_TIMEOUT)."""
        if nr_queues < 1:
            raise ValueError(f"a ublk device needs at least one queue, got {nr_queues}")
        self.ctrl = ctrl
        self.dev_id = dev_id
        self.nr_queues = nr_queues
        self.owner = os.getpid() if owner is None else owner
        self.depth = depth
        self.buf_bytes = buf_bytes
        self.arm_timeout = ARM_TIMEOUT if arm_timeout is None else arm_timeout
        self._wanted = (nr_queues, depth, buf_bytes)   # for ADD_DEV (an acquired device's own
                                                       # geometry replaces them until then)
        self.added = False
        self.queues: list[Queue] = []
        self._threads: list[threading.Thread] = []
        self._cancel = threading.Event()
        self._cdev = -1                  # /dev/ublkcN, opened once for all queues while serving

    @property
    def bdev(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def add(self) -> None:
        """ADD_DEV: reserve the id, recoverable (a device whose server dies is quiesced and its
        in-flight requests re-issued to the next one), with ``nr_queues`` queues or as many as
        the kernel grants. OSError(EEXIST) if the id is taken."""
        self.nr_queues, self.depth, self.buf_bytes = self._wanted
        try:
            info = self.ctrl.add_dev(self.dev_id, self.nr_queues, self.depth, self.buf_bytes,
                                     RECOVERY_FLAGS)
        except ublkctrl.UblkCtrlError as e:
            if e.errno == errno.EEXIST:
                raise OSError(errno.EEXIST, f"ublk device id {self.dev_id} is taken "
                              f"(another ublk server owns /dev/ublkc{self.dev_id})") from None
            raise
        if 0 < info.nr_hw_queues < self.nr_queues:       # the kernel clamps to its CPUs
            log.info("%s: %d queues (the kernel's most), not %d", self.bdev, info.nr_hw_queues,
                     self.nr_queues)
            self.nr_queues = info.nr_hw_queues
        self.added = True
        self._cancel.clear()
        shmstate.claim(self.dev_id, self.owner)

    def cancel_start(self) -> None:
        """Make a :meth:`start` under way in another thread (or the next one, until
        :meth:`add`) stop waiting for its queues to arm: it stops what it started and raises
        OSError(ECANCELED). A kernel command under way (SET_PARAMS, START_DEV) is not
        interrupted; a takeover (:meth:`recover`) is never cancelled."""
        self._cancel.set()

    def acquire(self) -> str:
        """Reserve the id, or take over one our own or a dead ublkzswapd left: "new" (ADD_DEV
        done), "reserved" (added, never started) or "started" (it has a store to take over:
        :meth:`recover`). OSError(EEXIST) if a live server or a stranger owns it."""
        info = self._info()
        if info is None:
            self.add()
            return "new"
        state = STATES.get(info.state, str(info.state))
        self.added = False
        who = shmstate.claimant(self.dev_id)
        if who is None or (who != self.owner and _alive(who)):
            raise OSError(errno.EEXIST, f"ublk device id {self.dev_id} is taken "
                          f"(another ublk server owns /dev/ublkc{self.dev_id})")
        self._keep_geometry(info)
        self.added = True
        shmstate.claim(self.dev_id, self.owner)
        return "reserved" if state == "dead" else "started"

    def _keep_geometry(self, info) -> None:
        """Serve an existing kernel device as it was added (by a dead server, perhaps with
        other settings): its queues, depth and buffer size."""
        geometry = (info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes)
        if 0 in geometry:
            return
        if geometry != (self.nr_queues, self.depth, self.buf_bytes):
            log.info("%s: served as its kernel device was added: %d queues of depth %d, "
                     "%d-byte buffers", self.bdev, *geometry)
        self.nr_queues, self.depth, self.buf_bytes = geometry

    def _info(self):
        """GET_DEV_INFO of this id, or None if there is no such device."""
        try:
            return self.ctrl.get_dev_info(self.dev_id)
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise

    def probe(self) -> str | None:
        """The kernel's state of this id: None (no such device), "dead" (added, not started:
        reserved), "live" or "quiesced" (started; its server died)."""
        info = self._info()
        return None if info is None else STATES.get(info.state, str(info.state))

    def recover(self, target, *, backing_fd: int = -1) -> None:
        """Take over a started device whose server died: START_USER_RECOVERY, a new thread per
        queue FETCHing every tag of its queue, then END_USER_RECOVERY: held and re-issued
        requests flow to ``target``.

        START_USER_RECOVERY says EBUSY until the kernel has quiesced the device and the dead
        server's last reference to ``/dev/ublkcN`` is gone (its every thread has exited). That
        is waited for without a deadline, with a log line every RECOVERY_WAIT seconds: giving
        up would mean STOP_DEV, which fails every stored page (and STOP_DEV on a device not yet
        quiesced itself waits for the same requests). Once recovery has started, a failure
        leaves the device quiesced, its requests held and its pages in the shared state, for
        the next server to try again; only :meth:`delete` (never called on a failed takeover)
        drops them."""
        waited = 0.0
        t0 = time.monotonic()
        while True:
            try:
                self.ctrl.start_user_recovery(self.dev_id)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
            if time.monotonic() - t0 >= waited + RECOVERY_WAIT:
                waited = time.monotonic() - t0
                log.warning("%s: still waiting to take it over after %.0f s (%s)", self.bdev,
                            waited, self._holder())
            time.sleep(0.05)
        self._serve(target, backing_fd, recovering=True)
        self.ctrl.end_user_recovery(self.dev_id)
        self._tune_queue()
        _heap_for_queues()

    def _holder(self) -> str:
        """Who keeps a device from being taken over: the kernel's state of it and what is left
        of its last server (for the log)."""
        try:
            info = self.ctrl.get_dev_info(self.dev_id)
        except OSError as e:
            return f"GET_DEV_INFO: {e.strerror}"
        state = STATES.get(info.state, str(info.state))
        pid = info.ublksrv_pid
        try:
            with open(f"/proc/{pid}/status") as f:
                st = next((l.split(None, 1)[1].strip() for l in f if l.startswith("State:")), "?")
            return f"kernel state {state}; its server {pid} is still there ({st})"
        except OSError:
            return f"kernel state {state}; its server {pid} is gone"

    def _serve(self, target, backing_fd: int, *, recovering: bool = False) -> None:
        """Start a thread per queue and wait until every tag of every queue has its FETCH. On
        failure a new device is stopped again; a recovering one is left as it is (see
        :meth:`recover`), and its queues are waited for without a deadline: under memory
        pressure arming may be slow, and giving up helps nothing. A new device's wait ends
        after ``arm_timeout`` s (ETIMEDOUT) or at :meth:`cancel_start` (ECANCELED)."""
        self.queues, self._threads = [], []
        try:
            # one open for every queue: the kernel lets /dev/ublkcN be opened once
            self._cdev = open_cdev(self.dev_id)
            for k in range(self.nr_queues):     # (made one by one: a failure closes the rest)
                self.queues.append(Queue(self.dev_id, target, q_id=k, depth=self.depth,
                                         buf_bytes=self.buf_bytes, backing_fd=backing_fd,
                                         cdev=self._cdev))
            self._threads = [threading.Thread(target=q.serve, name=f"ublkq{self.dev_id}:{k}",
                                              daemon=True) for k, q in enumerate(self.queues)]
            for t in self._threads:
                t.start()
            deadline = time.monotonic() + self.arm_timeout
            for k, (q, t) in enumerate(zip(self.queues, self._threads)):
                while not q.armed.wait(ARM_POLL):
                    if recovering:
                        if not t.is_alive():
                            break
                    elif self._cancel.is_set():
                        raise OSError(errno.ECANCELED, f"start of {self.bdev} cancelled while "
                                      "its queues armed")
                    elif time.monotonic() >= deadline:
                        raise OSError(errno.ETIMEDOUT, f"queue {k} of {self.bdev} not "
                                      f"armed in {self.arm_timeout:g} s")
                if q.error is not None:
                    raise q.error
                if not q.armed.is_set():
                    raise OSError(errno.EIO, f"queue {k} of {self.bdev} ended before it "
                                  "was armed")
        except BaseException:
            if not recovering:
                self.stop()
            raise

    def start(self, target, *, backing_fd: int = -1) -> None:
        """SET_PARAMS for ``target``, serve its queues, START_DEV: ``/dev/ublkbN`` exists after.
        On failure everything started is stopped again (the id stays added) and OSError raised:
        ETIMEDOUT if a queue did not arm in ``arm_timeout`` s, ECANCELED after
        :meth:`cancel_start`."""
        if self._cancel.is_set():
            raise OSError(errno.ECANCELED, f"start of {self.bdev} cancelled")
        params = ublkctrl.basic_params(target.size >> 9, self.buf_bytes,
                                       discard="discard" in features(target))
        self.ctrl.set_params(self.dev_id, params)
        self._serve(target, backing_fd)
        try:
            self.ctrl.start_dev(self.dev_id)
        except BaseException:
            self.stop()
            raise
        self._tune_queue()
        _heap_for_queues()         # whatever setting up took from it, the I/O path has it back

    def _tune_queue(self) -> None:
        """No I/O scheduler (requests go straight to the queue), and a short request timeout.
        ublk's timeout handler does nothing while the server lives; once it is dying, the
        timeout is what releases requests the server held when every tag's command was with
        it (no command left for io_uring to cancel): the device is quiesced, and can be
        taken over, a timeout after the death instead of the default 30 s."""
        for name, value in (("scheduler", "none"), ("io_timeout", str(IO_TIMEOUT_MS))):
            try:
                with open(f"/sys/block/ublkb{self.dev_id}/queue/{name}", "w") as f:
                    f.write(value)
            except OSError:
                pass

    def users(self, *, openers: bool = False) -> list[str]:
        """What holds ``/dev/ublkbN`` now (see :func:`block_users`); [] if it does not exist."""
        return block_users(self.bdev, openers=openers) if self.started else []

    @property
    def failure(self) -> str | None:
        """Why a queue thread of the started device ended (the first one found), or None while
        they all serve."""
        for k, (q, t) in enumerate(zip(self.queues, self._threads)):
            if not t.is_alive():
                which = f"queue {k} thread" if len(self.queues) > 1 else "queue thread"
                return f"{which} ended: {q.error}" if q.error is not None else f"{which} ended"
        return None

    @property
    def counters(self) -> QueueCounters | None:
        """The queues' request counters summed (a QueueCounters), or None before
        :meth:`start`. Each queue's are written by its thread only: a batch behind, maybe."""
        if not self.queues:
            return None
        total = QueueCounters()
        for q in self.queues:
            for name in QueueCounters.__slots__:
                setattr(total, name, getattr(total, name) + getattr(q.counters, name))
        return total

    def stop(self, join_timeout: float = 30.0) -> None:
        """STOP_DEV (if started): every tag of every queue comes back, the queue threads end
        and are joined (all within ``join_timeout`` s)."""
        if self._threads:
            try:
                self.ctrl.stop_dev(self.dev_id)
            except OSError:
                pass
            deadline = time.monotonic() + join_timeout
            for t in self._threads:
                if t.ident is not None:              # (a thread that never started)
                    t.join(max(0.0, deadline - time.monotonic()))
            self._threads = [t for t in self._threads if t.is_alive()]
        if any(t.is_alive() for t in self._threads):
            return                   # a queue still uses the cdev's fd and its buffers
        for q in self.queues:
            q.close()
        self.queues = []
        if self._cdev >= 0:
            os.close(self._cdev)
            self._cdev = -1

    def delete(self) -> None:
        """Stop if needed, then DEL_DEV: the id is free again."""
        self.stop()
        if self.added:
            self.ctrl.del_dev(self.dev_id)
            self.added = False
            shmstate.unclaim(self.dev_id)
