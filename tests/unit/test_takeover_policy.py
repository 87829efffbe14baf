"""A takeover never gives a started device up: the kernel's EBUSY (a dead server not yet gone)
is waited out, and a takeover that fails once recovery has begun leaves the device quiesced
with its pages (no STOP_DEV, no DEL_DEV) and makes the server end so that its standby tries
again. STOP_DEV would fail every stored page; in the VM it also waited forever for the very
requests the dead server held."""
import errno
import os
import threading

import pytest

from ublkzswap import ublkdev, uapi
from ublkzswap.devices import Manager

from fakeublk import small_store


class FakeCtrl:
    """START_USER_RECOVERY says EBUSY ``busy`` times; records every command."""

    def __init__(self, busy: int):
        self.busy = busy
        self.log: list[str] = []

    def start_user_recovery(self, dev_id):
        self.log.append("START_USER_RECOVERY")
        if self.busy:
            self.busy -= 1
            raise OSError(errno.EBUSY, "busy")

    def end_user_recovery(self, dev_id):
        self.log.append("END_USER_RECOVERY")

    def stop_dev(self, dev_id):
        self.log.append("STOP_DEV")

    def del_dev(self, dev_id):
        self.log.append("DEL_DEV")

    def get_dev_info(self, dev_id):
        info = uapi.ublksrv_ctrl_dev_info()
        info.state = uapi.UBLK_S_DEV_LIVE
        info.ublksrv_pid = 2 ** 22 + 7          # no such process
        return info


def device(ctrl) -> ublkdev.UblkDevice:
    d = ublkdev.UblkDevice(ctrl, 0)
    d.added = True
    return d


def test_busy_is_waited_out_past_the_log_period_and_never_stops_the_device(monkeypatch, caplog):
    monkeypatch.setattr(ublkdev, "RECOVERY_WAIT", 0.02)
    ctrl = FakeCtrl(busy=20)                 # 20 x 50 ms: well past several log periods
    served = []
    d = device(ctrl)
    monkeypatch.setattr(d, "_serve", lambda target, fd, recovering=False: served.append(recovering))
    d.recover(object())
    assert ctrl.log.count("START_USER_RECOVERY") == 21
    assert ctrl.log[-1] == "END_USER_RECOVERY" and "STOP_DEV" not in ctrl.log
    assert served == [True]
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("still waiting to take it over" in r.getMessage() and "is gone" in r.getMessage()
               for r in warned), caplog.text


def test_a_failed_recovery_leaves_the_device_quiesced(monkeypatch):
    ctrl = FakeCtrl(busy=0)
    d = device(ctrl)

    def broken(target, fd, recovering=False):
        assert recovering
        raise OSError(errno.EINVAL, "mmap of the descriptors refused")
    monkeypatch.setattr(d, "_serve", broken)
    with pytest.raises(OSError):
        d.recover(object())
    assert "STOP_DEV" not in ctrl.log and "DEL_DEV" not in ctrl.log
    assert "END_USER_RECOVERY" not in ctrl.log


def test_a_recovering_queue_is_waited_for_past_the_arm_timeout(monkeypatch):
    # under memory pressure arming may take long; a new device would be stopped instead
    monkeypatch.setattr(ublkdev, "ARM_TIMEOUT", 0.02)

    class SlowQueue:
        def __init__(self, *a, **kw):
            self.armed = threading.Event()
            self.error = None

        def serve(self):
            threading.Timer(0.2, self.armed.set).start()
            self.armed.wait()

        def close(self):
            pass

    monkeypatch.setattr(ublkdev, "Queue", SlowQueue)
    monkeypatch.setattr(ublkdev, "open_cdev", lambda dev_id: os.open(os.devnull, os.O_RDONLY))
    ctrl = FakeCtrl(busy=0)
    d = device(ctrl)
    d.recover(object())
    assert ctrl.log == ["START_USER_RECOVERY", "END_USER_RECOVERY"]
    for t in d._threads:
        t.join(1)


class StartedUblk:
    """A started device left by a dead server, whose takeover fails in the kernel."""

    nr_queues = 1

    def __init__(self, dev_id, log):
        self.dev_id, self.log = dev_id, log
        self.bdev = f"/dev/ublkb{dev_id}"
        self.failure = None

    def acquire(self):
        return "started"

    def recover(self, target, *, backing_fd=-1):
        self.log.append(("recover", self.dev_id))
        raise OSError(errno.EIO, "END_USER_RECOVERY failed")

    def delete(self):
        self.log.append(("delete", self.dev_id))

    def add(self):
        self.log.append(("add", self.dev_id))

    def users(self, *, openers=False):
        return ["swap"]


def test_a_failed_takeover_keeps_the_device_and_is_a_failure_of_the_server():
    log = []
    adopted = []

    def factory(dev_id, disksize, *, adopt=False, open_backing=None, **kw):
        assert adopt
        s = small_store(dev_id, 1 << 20)
        adopted.append(s)
        return s

    m = Manager({"num_devices": 1, "target": "compressed", "compressor": "lzo"},
                lambda i: StartedUblk(i, log), factory, ram=64 << 20)
    problems = m.reserve_all(adopt=True)
    assert log == [("recover", 0)]                       # no delete, no add: pages kept
    assert len(problems) == 1 and "left quiesced with its pages" in problems[0]
    assert m.info(0)["state"] == "failed"
    failed = m.failures()
    assert len(failed) == 1 and "takeover failed" in failed[0] and "END_USER_RECOVERY" in failed[0]


def test_a_takeover_without_shared_state_still_frees_the_id():
    # nothing left to keep: the id is deleted and added afresh (its pages were lost already)
    log = []

    def factory(dev_id, disksize, *, adopt=False, open_backing=None, **kw):
        raise OSError(errno.ENOENT, "no shared state for device 0")

    m = Manager({"num_devices": 1, "target": "compressed", "compressor": "lzo"},
                lambda i: StartedUblk(i, log), factory, ram=64 << 20)
    problems = m.reserve_all(adopt=True)
    assert log == [("delete", 0), ("add", 0)]
    assert "its pages are lost" in problems[0] and m.failures() == []


def test_an_uncaught_exception_in_a_daemon_thread_is_logged_and_ends_the_server(monkeypatch, capsys):
    from ublkzswap import daemon
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)   # restored after
    failures = daemon.ThreadFailures()
    failures.install()

    def keeper():
        raise ValueError("segment list corrupt")

    def quitter():
        raise SystemExit(0)                     # a thread that exits on purpose is no failure

    for fn in (keeper, quitter):
        t = threading.Thread(target=fn, name=fn.__name__)
        t.start()
        t.join()
    lines = failures()
    assert len(lines) == 1 and lines[0].startswith("thread keeper: ValueError: segment list corrupt")
    assert "test_takeover_policy.py" in lines[0]
    assert "thread keeper: ValueError" in capsys.readouterr().err
