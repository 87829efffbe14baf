"""ublkzswapd.service under systemd as PID 1: configured from /etc/ublkzswap.conf, started
(Type=notify), its generated swap unit swapped on with the configured priority, then, while
a process holds pages out on that swap, ``systemctl reload`` (a hand-over to a prepared
standby) and ``systemctl restart`` (the server leaves its devices held for the next one; the
swap unit is not touched) -- neither loses a page -- and ``systemctl stop``, which swaps the
device off first and leaves nothing running."""
from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
UNIT = "ublkzswapd.service"
SWAP_UNIT = "dev-ublkb0.swap"
CONF = "/etc/ublkzswap.conf"
PRIORITY = 77
HOLD_MIB = 96          # held by a process limited to MEM_MAX_MIB: most of it goes out to swap
MEM_MAX_MIB = 32


def run(*argv, timeout=600, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {p.returncode}: {p.stdout}{p.stderr}\n"
                             f"{journal()}")
    return p


def journal(lines: int = 40) -> str:
    p = subprocess.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines),
                        "-u", UNIT, "-u", SWAP_UNIT], capture_output=True, text=True, timeout=60)
    return "journal:\n" + p.stdout


def show(unit: str, prop: str) -> str:
    return run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()


def swaps() -> dict[str, tuple[int, int]]:
    """Active swap areas: name -> (priority, KiB used)."""
    out = {}
    for line in open("/proc/swaps").read().splitlines()[1:]:
        f = line.split()
        out[f[0]] = (int(f[4]), int(f[3]))
    return out


def wait_for(what: str, cond, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{journal()}")


def test_the_unit_under_systemd(tmp_path):
    with open(CONF, "w") as f:
        f.write(f"[ublkb0]\ndisksize = 256M\nswap-priority = {PRIORITY}\n")
    try:
        scenario(tmp_path)
    finally:
        subprocess.run(["systemctl", "stop", SWAP_UNIT, UNIT], timeout=600)
        os.unlink(CONF)


def scenario(tmp_path):
    # the generator makes the swap unit of the config
    run("systemctl", "daemon-reload")
    text = run("systemctl", "cat", SWAP_UNIT).stdout
    assert f"Priority={PRIORITY}" in text and f"Wants={UNIT}" in text, text

    # Type=notify: start returns once READY=1 came, the server is the main pid
    run("systemctl", "start", UNIT, timeout=900)
    assert show(UNIT, "ActiveState") == "active"
    server = int(show(UNIT, "MainPID"))
    assert open(f"/proc/{server}/comm").read().strip() == "ublkzswapd"
    assert "reserved" in show(UNIT, "StatusText")

    # the swap unit (udev makes dev-ublkb0.device) swaps on with the configured priority
    run("systemctl", "start", SWAP_UNIT, timeout=300)
    assert swaps().get("/dev/ublkb0", (None,))[0] == PRIORITY, open("/proc/swaps").read()
    swap_since = show(SWAP_UNIT, "ActiveEnterTimestampMonotonic")

    # a process holding pages out on it
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = subprocess.Popen(
        ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={MEM_MAX_MIB}M",
         sys.executable, os.path.join(HERE, "holder.py"), str(HOLD_MIB), str(ready), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("the holder to fill its memory", lambda: ready.exists() or holder.poll() is not None,
                 600)
        assert holder.poll() is None, holder.communicate()[0]
        used = wait_for("its pages to be out on /dev/ublkb0",
                        lambda: swaps()["/dev/ublkb0"][1] >= (HOLD_MIB - MEM_MAX_MIB) // 2 * 1024
                        and swaps()["/dev/ublkb0"][1], 300)

        # reload: a prepared standby takes the devices over and becomes the main pid
        run("systemctl", "reload", UNIT, timeout=900)
        assert show(UNIT, "ActiveState") == "active"
        after_reload = int(show(UNIT, "MainPID"))
        assert after_reload not in (0, server), (server, after_reload, journal())
        assert swaps()["/dev/ublkb0"][1] >= used // 2, "the swapped pages went somewhere"

        # restart: the server leaves its devices held, the new one takes them over; the swap
        # unit is never stopped (a swapoff would pull the pages back in)
        run("systemctl", "restart", UNIT, timeout=900)
        assert show(UNIT, "ActiveState") == "active"
        after_restart = int(show(UNIT, "MainPID"))
        assert after_restart not in (0, after_reload), (after_reload, after_restart, journal())
        assert show(SWAP_UNIT, "ActiveEnterTimestampMonotonic") == swap_since, journal()
        assert swaps()["/dev/ublkb0"][1] >= used // 2, "the swapped pages went somewhere"
        log = journal(200)
        assert "leaving its devices" in log and "took over" in log, log

        # every page comes back as written
        go.write_text("")
        out = holder.communicate(timeout=900)[0]
        assert holder.returncode == 0 and "bad pages: 0 of" in out, out
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    # stop: swapoff first (ExecStop), then the server ends; nothing is left running
    run("systemctl", "stop", UNIT, timeout=900)
    assert "/dev/ublkb0" not in swaps()
    assert show(UNIT, "ActiveState") == "inactive"
    assert show(SWAP_UNIT, "ActiveState") == "inactive"
    assert subprocess.run(["pidof", "ublkzswapd", "ublkzswapd-stby"], capture_output=True).returncode == 1
