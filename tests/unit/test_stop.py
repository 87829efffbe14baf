"""``ublkzswapd --stop`` (the unit's ExecStop=): a restart of the service leaves the devices to
the next server, a stop swaps them off first. The kernel-side whole is tests/systemd."""
from __future__ import annotations

import signal

import pytest

from ublkzswap import daemon, params


def test_unit_of_cgroup():
    assert daemon.unit_of_cgroup("0::/system.slice/ublkzswapd.service\n") == "ublkzswapd.service"
    # a control process in a sub-cgroup, and a v1 hierarchy line
    assert daemon.unit_of_cgroup("0::/system.slice/ublkzswapd.service/control\n") == "ublkzswapd.service"
    assert daemon.unit_of_cgroup("1:name=systemd:/system.slice/x.service\n") == "x.service"
    assert daemon.unit_of_cgroup("0::/user.slice/user-0.slice/session-1.scope\n") is None
    assert daemon.unit_of_cgroup("") is None


LISTING = """\
 41 ublkzswapd.service restart running
 42 dev-ublkb0.swap    start   waiting
"""


def test_restarting_reads_the_job_type_of_the_unit():
    assert daemon.restarting(LISTING, "ublkzswapd.service")
    assert daemon.restarting(" 7 ublkzswapd.service try-restart running\n", "ublkzswapd.service")
    assert not daemon.restarting(LISTING, "other.service")
    assert not daemon.restarting(" 41 ublkzswapd.service stop running\n", "ublkzswapd.service")
    assert not daemon.restarting(" 41 ublkzswapd.service reload running\n", "ublkzswapd.service")
    assert not daemon.restarting("", "ublkzswapd.service")


def test_stop_is_a_flag_that_reads_no_config(monkeypatch):
    cfg = params.parse_params(["--stop", "socket=/nonexistent/s"])
    assert cfg["stop"] and not cfg["restart"]
    assert not params.parse_params([])["stop"]


class Fake:
    """What request_stop talks to: the control socket, systemd, /proc/swaps, swapoff, kill."""

    def __init__(self, monkeypatch, *, restarting=None, swapped=(), swapoff_rc=0, exits=True):
        self.signals, self.swapoffs = [], []
        fake = self

        class Client:
            def __init__(self, path, timeout):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def call(self, op):
                return {"ping": {"pid": 4242, "v": 1}, "devices": [0, 1]}[op]

        class Done:
            def __init__(self, rc):
                self.returncode, self.stderr = rc, "swapoff: /dev/ublkb0: Cannot allocate memory\n"

        def run(argv, **kw):
            assert argv[0] == "swapoff"
            fake.swapoffs.append(argv[1])
            return Done(swapoff_rc)
        monkeypatch.setattr("ublkzswap.control.Client", Client)
        monkeypatch.setattr(daemon, "systemd_restarting", lambda pid: restarting)
        monkeypatch.setattr(daemon, "block_users", lambda b: ["swap"] if b in swapped else [])
        monkeypatch.setattr(daemon.subprocess, "run", run)
        monkeypatch.setattr(daemon.os, "kill", lambda pid, sig: fake.signals.append((pid, sig)))
        monkeypatch.setattr(daemon, "wait_exit", lambda pid, t: exits)


def stop():
    return daemon.request_stop({"socket": "/run/x.sock"})


def test_a_restart_leaves_the_devices_and_swaps_nothing_off(monkeypatch, capsys):
    f = Fake(monkeypatch, restarting="ublkzswapd.service", swapped=("/dev/ublkb0",))
    assert stop() == 0
    assert f.signals == [(4242, signal.SIGUSR2)] and f.swapoffs == []
    assert "left its devices" in capsys.readouterr().out


def test_a_restart_the_server_refuses_fails(monkeypatch, capsys):
    f = Fake(monkeypatch, restarting="ublkzswapd.service", exits=False)
    assert stop() == 1
    assert f.signals == [(4242, signal.SIGUSR2)]
    err = capsys.readouterr().err
    assert "keeps serving" in err and err.count("\n") == 1


def test_a_stop_swaps_off_what_is_swapped_on_then_sigterms(monkeypatch):
    f = Fake(monkeypatch, swapped=("/dev/ublkb1",))
    assert stop() == 0
    assert f.swapoffs == ["/dev/ublkb1"] and f.signals == [(4242, signal.SIGTERM)]


def test_a_failed_swapoff_is_one_line_and_fails_the_stop(monkeypatch, capsys):
    f = Fake(monkeypatch, swapped=("/dev/ublkb0",), swapoff_rc=255, exits=False)
    assert stop() == 1
    assert f.swapoffs == ["/dev/ublkb0"]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "ublkzswapd: swapoff /dev/ublkb0 failed: swapoff: /dev/ublkb0: Cannot allocate memory"
    assert "still running" in err[1]


def test_no_daemon_is_nothing_to_stop(monkeypatch, capsys, tmp_path):
    assert daemon.request_stop({"socket": str(tmp_path / "none.sock")}) == 0
    assert "no daemon running" in capsys.readouterr().out


@pytest.mark.parametrize("gone", [True, False])
def test_wait_exit(gone):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(%s)" % (0 if gone else 30)])
    try:
        if gone:
            p.wait()
        assert daemon.wait_exit(p.pid, 0.5 if not gone else 5) is gone
    finally:
        p.kill()
        p.wait()
