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
    assert not d.started and d.queue is None


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
