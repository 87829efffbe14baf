"""What holds a block device, read without touching it (an O_EXCL probe would make a concurrent
swapon or mount fail with EBUSY); a start whose queue does not arm ends at its arm timeout or
when cancelled, with what it started stopped."""
import errno
import os
import subprocess
import threading
import time

import pytest

from ublkzswap import ublkdev
from ublkzswap.target import NullTarget


def _null_cdev(dev_id: int) -> int:
    """Stands in for /dev/ublkcN, opened once per device for all its queues."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    p = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop devices here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev])


def test_users_never_open_the_device(loop_device, monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, flags, *a, **kw):
        opened.append((str(path), flags))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    assert ublkdev.block_users(loop_device, openers=True) == []
    assert not [p for p, f in opened if p == loop_device]


def test_a_mount_and_an_opener_are_seen(loop_device, tmp_path):
    if subprocess.run(["mkfs.ext4", "-q", "-F", loop_device], capture_output=True).returncode:
        pytest.skip("mkfs.ext4 unavailable")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", loop_device, str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount here")
    try:
        assert ublkdev.block_users(loop_device) == ["mounted"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{loop_device}; echo open; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert ublkdev.block_users(loop_device) == []            # an opener holds nothing
        assert ublkdev.block_users(loop_device, openers=True) == [f"open by pid {holder.pid}"]
    finally:
        holder.kill()
        holder.wait()


class StartCtrl:
    """The control commands of a start, recorded; STOP_DEV ends the stub queue's thread."""

    def __init__(self):
        self.log: list[str] = []
        self.stopped = threading.Event()

    def set_params(self, dev_id, params):
        self.log.append("SET_PARAMS")

    def start_dev(self, dev_id):
        self.log.append("START_DEV")

    def stop_dev(self, dev_id):
        self.log.append("STOP_DEV")
        self.stopped.set()


def never_arming(ctrl):
    class NeverArms:
        """A queue whose thread never gets every FETCH in: it only ends at STOP_DEV."""

        def __init__(self, *a, **kw):
            self.armed = threading.Event()
            self.error = None

        def serve(self):
            ctrl.stopped.wait(10)

        def close(self):
            pass
    return NeverArms


def started_device(monkeypatch, **kw):
    ctrl = StartCtrl()
    monkeypatch.setattr(ublkdev, "Queue", never_arming(ctrl))
    monkeypatch.setattr(ublkdev, "open_cdev", _null_cdev)
    d = ublkdev.UblkDevice(ctrl, 5, **kw)
    d.added = True
    return ctrl, d


def test_a_queue_that_never_arms_times_out_and_is_stopped(monkeypatch):
    ctrl, d = started_device(monkeypatch, arm_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        d.start(NullTarget(1 << 20))
    took = time.monotonic() - t0
    assert e.value.errno == errno.ETIMEDOUT and "not armed in 0.3 s" in e.value.strerror
    assert 0.3 <= took < 2
    assert ctrl.log == ["SET_PARAMS", "STOP_DEV"]          # never START_DEV; stopped again
    assert not d.started and d.queues == []


def test_cancel_ends_the_wait_for_the_queue_at_once_and_refuses_a_later_start(monkeypatch):
    ctrl, d = started_device(monkeypatch)                  # the default 30 s arm timeout
    threading.Timer(0.2, d.cancel_start).start()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        d.start(NullTarget(1 << 20))
    assert e.value.errno == errno.ECANCELED and time.monotonic() - t0 < 2
    assert ctrl.log == ["SET_PARAMS", "STOP_DEV"] and not d.started
    with pytest.raises(OSError) as e:                      # a cancel before start: nothing sent
        d.start(NullTarget(1 << 20))
    assert e.value.errno == errno.ECANCELED and ctrl.log == ["SET_PARAMS", "STOP_DEV"]


# ----------------------------------------------------------------------------- several queues
class MultiCtrl:
    """A kernel's control side for one device of several queues: ADD_DEV clamps nr_hw_queues
    to ``cpus`` (as ublk clamps to nr_cpu_ids); START_DEV and END_USER_RECOVERY check what
    the kernel waits for -- every queue armed -- and STOP_DEV makes every queue's commands
    come back (the stub queues' threads end)."""

    def __init__(self, cpus: int = 64, info=None):
        self.cpus = cpus
        self.info = info
        self.log: list = []
        self.stopped = threading.Event()
        self.started = threading.Event()
        self.queues = None          # the device's queues, set by the test

    def add_dev(self, dev_id, nr_hw_queues, depth, buf_bytes, flags):
        from ublkzswap import uapi
        self.log.append(("ADD_DEV", nr_hw_queues, depth, buf_bytes))
        info = uapi.ublksrv_ctrl_dev_info()
        info.nr_hw_queues, info.queue_depth = min(nr_hw_queues, self.cpus), depth
        info.max_io_buf_bytes, info.dev_id = buf_bytes, dev_id
        return info

    def get_dev_info(self, dev_id):
        if self.info is None:
            raise OSError(errno.ENODEV, "no such device")
        return self.info

    def set_params(self, dev_id, params):
        self.log.append("SET_PARAMS")

    def _all_armed(self, what):
        armed = [q.armed.is_set() for q in self.queues()]
        assert all(armed), f"{what} before every queue was armed: {armed}"
        self.log.append(what)

    def start_dev(self, dev_id):
        self._all_armed("START_DEV")
        self.started.set()

    def start_user_recovery(self, dev_id):
        self.log.append("START_USER_RECOVERY")

    def end_user_recovery(self, dev_id):
        self._all_armed("END_USER_RECOVERY")

    def stop_dev(self, dev_id):
        self.log.append("STOP_DEV")
        self.stopped.set()


def stub_queues(ctrl, made: list, arm_after=(), fail=None):
    class StubQueue:
        """Arms (every tag FETCHed) after ``arm_after[q_id]`` s; ``fail`` = (q_id, exception):
        that queue's thread ends with it once the device started. Serves until STOP_DEV."""

        def __init__(self, dev_id, target, *, q_id, depth, buf_bytes, backing_fd, cdev):
            self.q_id, self.depth, self.buf_bytes, self.backing_fd = q_id, depth, buf_bytes, backing_fd
            self.cdev = cdev
            self.armed = threading.Event()
            self.error = None
            self.closed = False
            self.thread = None
            from ublkzswap.handler import QueueCounters
            self.counters = QueueCounters()
            self.counters.reads, self.counters.writes = 10 * (q_id + 1), q_id
            made.append(self)

        def serve(self):
            self.thread = threading.current_thread()
            time.sleep(arm_after[self.q_id] if self.q_id < len(arm_after) else 0)
            self.armed.set()
            if fail is not None and fail[0] == self.q_id:
                ctrl.started.wait(10)
                self.error = fail[1]
                return
            ctrl.stopped.wait(10)

        def close(self):
            self.closed = True
    return StubQueue


def multi_device(monkeypatch, nr_queues, ctrl=None, **stub):
    ctrl = ctrl or MultiCtrl()
    made: list = []
    monkeypatch.setattr(ublkdev, "Queue", stub_queues(ctrl, made, **stub))
    monkeypatch.setattr(ublkdev, "open_cdev", _null_cdev)
    monkeypatch.setattr(ublkdev, "_heap_for_queues", lambda: None)
    d = ublkdev.UblkDevice(ctrl, 5, nr_queues=nr_queues)
    ctrl.queues = lambda: made
    return ctrl, d, made


def test_add_dev_asks_for_the_queues_and_keeps_what_the_kernel_grants(monkeypatch):
    monkeypatch.setattr(ublkdev.shmstate, "claim", lambda *a: None)
    ctrl, d, _ = multi_device(monkeypatch, 4, MultiCtrl(cpus=2))
    d.add()
    assert ctrl.log == [("ADD_DEV", 4, ublkdev.QUEUE_DEPTH, ublkdev.IO_BUF_BYTES)]
    assert d.nr_queues == 2                         # clamped by the kernel: 2 threads, not 4


def test_start_serves_every_queue_in_a_thread_of_its_own_and_waits_for_all(monkeypatch):
    # queue 2 arms last, 0.3 s in: START_DEV must wait for it (MultiCtrl asserts it)
    ctrl, d, made = multi_device(monkeypatch, 3, arm_after=(0.0, 0.1, 0.3))
    d.added = True
    d.start(NullTarget(1 << 20), backing_fd=9)
    try:
        assert ctrl.log == ["SET_PARAMS", "START_DEV"]
        assert [q.q_id for q in made] == [0, 1, 2] and d.queues == made
        assert all(q.backing_fd == 9 for q in made)        # each queue prewarms its own ring
        # one open of /dev/ublkcN for all of them (a second open is EBUSY in the kernel)
        assert len({q.cdev for q in made}) == 1 and made[0].cdev >= 0
        cdev = made[0].cdev
        assert os.readlink(f"/proc/self/fd/{cdev}") == os.devnull
        threads = [q.thread for q in made]
        assert len({t.ident for t in threads}) == 3
        assert [t.name for t in threads] == ["ublkq5:0", "ublkq5:1", "ublkq5:2"]
        assert d.failure is None
        c = d.counters                                     # summed over the queues
        assert (c.reads, c.writes) == (10 + 20 + 30, 0 + 1 + 2)
    finally:
        d.stop()
    assert ctrl.log.count("STOP_DEV") == 1
    assert not any(t.is_alive() for t in threads) and all(q.closed for q in made)
    assert not d.started and d.queues == [] and d.counters is None
    assert not os.path.exists(f"/proc/self/fd/{cdev}") or \
        os.readlink(f"/proc/self/fd/{cdev}") != os.devnull     # closed once they all ended


def test_a_queue_that_ends_is_the_devices_failure_and_named(monkeypatch):
    ctrl, d, made = multi_device(monkeypatch, 2, fail=(1, ValueError("boom")))
    d.added = True
    d.start(NullTarget(1 << 20))
    try:
        made[1].thread.join(2)
        assert d.failure == "queue 1 thread ended: boom"
        assert made[0].thread.is_alive()                 # the others go on serving
    finally:
        d.stop()


def test_a_start_fails_if_any_queue_fails_to_arm_and_stops_them_all(monkeypatch):
    ctrl, d, made = multi_device(monkeypatch, 3, arm_after=(0, 0, 5.0))
    d.arm_timeout = 0.3
    d.added = True
    with pytest.raises(OSError) as e:
        d.start(NullTarget(1 << 20))
    assert e.value.errno == errno.ETIMEDOUT and "queue 2 of /dev/ublkb5 not armed" in str(e.value)
    assert ctrl.log == ["SET_PARAMS", "STOP_DEV"] and not d.started
    assert all(q.closed for q in made) and not any(q.thread.is_alive() for q in made[:2])


def test_a_takeover_keeps_the_kernels_geometry_and_refetches_every_queue(monkeypatch):
    from ublkzswap import uapi
    info = uapi.ublksrv_ctrl_dev_info()
    info.state, info.nr_hw_queues = uapi.UBLK_S_DEV_QUIESCED, 3
    info.queue_depth, info.max_io_buf_bytes = 32, 64 << 10
    monkeypatch.setattr(ublkdev.shmstate, "claimant", lambda dev_id: 2 ** 22 + 7)  # dead
    monkeypatch.setattr(ublkdev.shmstate, "claim", lambda *a: None)
    # this server would make 1 queue; the dead one's device has 3, each must FETCH again
    ctrl, d, made = multi_device(monkeypatch, 1, MultiCtrl(info=info), arm_after=(0.2, 0, 0.1))
    assert d.acquire() == "started"
    assert (d.nr_queues, d.depth, d.buf_bytes) == (3, 32, 64 << 10)
    d.recover(NullTarget(1 << 20))
    try:
        assert ctrl.log == ["START_USER_RECOVERY", "END_USER_RECOVERY"]
        assert [(q.q_id, q.depth, q.buf_bytes) for q in made] == [(k, 32, 64 << 10) for k in range(3)]
    finally:
        d.stop()
    # a later ADD_DEV of the id (after a reset) is this server's own geometry again
    d.add()
    assert ctrl.log[-1] == ("ADD_DEV", 1, ublkdev.QUEUE_DEPTH, ublkdev.IO_BUF_BYTES)
    assert d.nr_queues == 1


def test_the_heap_headroom_grows_with_the_queue_threads(monkeypatch):
    asked = []
    monkeypatch.setattr(ublkdev, "ensure_heap_headroom", asked.append)
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, name=f"ublkq9:{k}") for k in range(3)]
    for t in threads:
        t.start()
    try:
        ublkdev._heap_for_queues()
    finally:
        stop.set()
    assert asked == [ublkdev.HEAP_HEADROOM + 2 * ublkdev.QUEUE_HEAP]


def test_a_queue_that_cannot_be_made_closes_the_ones_made_before(monkeypatch):
    ctrl, d, made = multi_device(monkeypatch, 3)
    Stub = ublkdev.Queue

    def make(*a, q_id, **kw):
        if q_id == 1:
            raise MemoryError("no buffers")
        return Stub(*a, q_id=q_id, **kw)
    monkeypatch.setattr(ublkdev, "Queue", make)
    monkeypatch.setattr(ublkdev, "open_cdev", _null_cdev)
    d.added = True
    with pytest.raises(MemoryError):
        d.start(NullTarget(1 << 20))
    assert [q.q_id for q in made] == [0] and made[0].closed
    assert ctrl.log == ["SET_PARAMS"] and not d.started and d.queues == []
