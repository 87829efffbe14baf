"""sd_notify: what the daemon tells systemd, and the unit it is started by."""

import os
import shutil
import socket
import subprocess

import pytest

from ublkzswap import sdnotify

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _listener(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    s.settimeout(2)
    return s


def test_notify_sends_key_value_lines_to_a_path(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with _listener(path) as s:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.notify(ready=1, mainpid=1234, status="2 devices reserved")
        assert s.recv(4096) == b"READY=1\nMAINPID=1234\nSTATUS=2 devices reserved\n"


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"ublkzswap-test-{os.getpid()}"
    with _listener("\0" + name) as s:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify(stopping=1)
        assert s.recv(4096) == b"STOPPING=1\n"


@pytest.mark.parametrize("value", [None, "", "relative/path"])
def test_without_a_usable_socket_nothing_is_sent(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify(ready=1) is False


def test_a_manager_gone_away_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert sdnotify.notify(ready=1) is False


def _unit():
    with open(os.path.join(ROOT, "systemd", "ublkzswapd.service")) as f:
        return f.read()


def test_the_unit_is_what_a_swap_service_needs():
    unit = _unit()
    for line in ("Type=notify", "NotifyAccess=all", "OOMScoreAdjust=-1000",
                 "DefaultDependencies=no", "After=systemd-modules-load.service",
                 "Before=swap.target shutdown.target", "SendSIGKILL=no",
                 "ExecStart=/usr/local/sbin/ublkzswapd --foreground",
                 "ExecReload=/usr/local/sbin/ublkzswapd --restart"):
        assert line in unit.splitlines(), line
    with open(os.path.join(ROOT, "systemd", "modules-load.conf")) as f:
        assert "ublk_drv" in f.read().split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_passes_on_the_unit(tmp_path):
    """As installed: the commands it names must exist (tools/install-deps links them), so
    verify a copy whose commands point at stand-ins when they are not installed."""
    unit = _unit()
    if not os.access("/usr/local/sbin/ublkzswapd", os.X_OK):
        if os.environ.get("UBLKZSWAP_REQUIRE_INSTALL") == "1":
            pytest.fail("/usr/local/sbin/ublkzswapd is not installed (tools/install-deps)")
        unit = unit.replace("/usr/local/sbin/ublkzswapd", shutil.which("true"))
    path = tmp_path / "ublkzswapd.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ublkzswapd.service" not in r.stderr, r.stderr   # no warning about the unit either
    bad = path.with_name("ublkzswapd.service")
    bad.write_text(unit.replace("Type=notify", "Type=notifyy"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)],
                       capture_output=True, text=True)
    assert "notifyy" in r.stderr              # the check does read the file
