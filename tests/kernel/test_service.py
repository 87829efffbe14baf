"""ublkzswapd as systemd runs it: the installed command (tools/install-deps: a venv of Debian's
own Python, linked into /usr/local/sbin), started with the unit's ExecStart, from a config file
with two devices, telling a NOTIFY_SOCKET that it is ready; the swap units the generator makes
of the config, applied as systemd would (priority, discard); ``pidof`` and README's unload."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from ublkzswap import config, generator

from .daemonctl import exited, leftovers, wait_gone

SBIN = "/usr/local/sbin"
UNIT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "systemd", "ublkzswapd.service")


def exec_start() -> list[str]:
    """The unit's ExecStart= words."""
    for line in open(UNIT).read().splitlines():
        if line.startswith("ExecStart="):
            return line.split("=", 1)[1].split()
    raise AssertionError("no ExecStart= in the unit")


def installed(cmd: str) -> str:
    path = os.path.join(SBIN, cmd)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not installed: run tools/install-deps")
    return path


def swaps() -> dict[str, int]:
    """Active swap areas: name -> priority."""
    out = {}
    for line in open("/proc/swaps").read().splitlines()[1:]:
        f = line.split()
        out[f[0]] = int(f[4])
    return out


def notifications(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Datagrams received until one has the line ``until`` (or ``timeout`` s pass)."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if until in got[-1].splitlines():
            break
    return got


def test_the_service_as_systemd_starts_it_from_a_config_file(tmp_path):
    daemon = installed("ublkzswapd")
    rzscontrol = installed("rzscontrol")
    # the installed copy runs on Debian's own Python, not the one running these tests
    venv_python = os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(daemon)),
                                                "python"))
    assert venv_python.startswith("/usr/bin/python3"), venv_python
    argv = exec_start()
    assert argv[0] == daemon
    conf_path = str(tmp_path / "ublkzswap.conf")
    conf = config.write(conf_path, {
        0: {"disksize": "64M", "swap-priority": "100", "options": "discard"},
        1: {"disksize": "32M", "compression-algorithm": "lz4", "swap-priority": "50"},
    })
    sockpath = str(tmp_path / "ctl.sock")
    notify_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    env.pop("PYTHONPATH", None)
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([*argv, f"config={conf_path}", f"socket={sockpath}"], cwd="/",
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        got = notifications(listener, "READY=1", 240)
        assert got and "READY=1" in got[-1].splitlines(), (got, open(tmp_path / "daemon.log").read())
        assert f"MAINPID={proc.pid}" in got[-1].splitlines()
        assert "STATUS=2 devices reserved /dev/ublkb0, /dev/ublkb1 initialised" in got[-1]

        # the swap units the generator writes, applied as systemd applies them
        gen = tmp_path / "generator"
        gen.mkdir()                              # systemd makes the directories
        r = subprocess.run([os.path.join(os.path.dirname(os.path.realpath(daemon)),
                                         "ublkzswap-generator"), "--config", conf_path, str(gen)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for dev in conf.devices.values():
            unit = (gen / generator.unit_name(dev)).read_text()
            assert f"What={dev.bdev}" in unit and f"Priority={dev.swap_priority}" in unit
            assert (gen / "swap.target.wants" / generator.unit_name(dev)).is_symlink()
            subprocess.run(generator.swapon_argv(dev), check=True, timeout=60)
        active = swaps()
        assert active.get("/dev/ublkb0") == 100 and active.get("/dev/ublkb1") == 50, active

        listed = subprocess.run([rzscontrol, "--list", "--socket", sockpath, "-o",
                                 "NAME,ALGORITHM,MOUNTPOINT", "--raw", "-n"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines() == ["/dev/ublkb0 lzo [SWAP]", "/dev/ublkb1 lz4 [SWAP]"]

        pids = subprocess.run(["pidof", "ublkzswapd"], capture_output=True, text=True).stdout.split()
        assert str(proc.pid) in pids, pids

        for dev in ("/dev/ublkb0", "/dev/ublkb1"):
            subprocess.run(["swapoff", dev], check=True, timeout=300)
        # README's unload, once swap is off
        subprocess.run("kill $(pidof ublkzswapd)", shell=True, check=True, timeout=30)
        assert proc.wait(60) == 0, open(tmp_path / "daemon.log").read()
        got = notifications(listener, "STOPPING=1", 5)
        assert any("STOPPING=1" in g.splitlines() for g in got), got
        assert wait_gone() == []
    finally:
        for dev in ("/dev/ublkb0", "/dev/ublkb1"):
            if dev in swaps():
                subprocess.run(["swapoff", dev], timeout=300)
        if proc.poll() is None:
            proc.terminate()
            if not exited(proc.pid, 60):
                proc.kill()
            proc.wait()
        listener.close()
        log.close()
    assert leftovers() == []


def test_a_bad_config_file_starts_nothing(tmp_path):
    daemon = installed("ublkzswapd")
    bad = tmp_path / "ublkzswap.conf"
    bad.write_text("[ublkb0]\ndisksize = 64M\n[ublkb1]\ndisksize = lots\n")
    r = subprocess.run([daemon, "--foreground", f"config={bad}",
                        f"socket={tmp_path / 'ctl.sock'}"], cwd="/", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ublkzswapd: {bad}:4: "), r.stderr
    assert leftovers() == []
