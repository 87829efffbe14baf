"""Policy for tests that need a real ublk kernel (owned by the VM helper; see tools/vm).

- ``ublk_kernel`` (session, autouse here): needs root and /dev/ublk-control (tries
  ``modprobe ublk_drv`` once when it is missing). Otherwise every test in tests/kernel skips with
  the exact reason -- or FAILS with it when UBLKZSWAP_REQUIRE_KERNEL=1 (tools/test sets that, so a
  kernel run that silently tested nothing is impossible). In the VM the modules are preloaded.
- ``cleanup_ublk`` (function, autouse here): after each test, stops daemons the test left running
  (SIGTERM, 10 s, SIGKILL): those passed to :func:`register_daemon` and any process whose command
  line names ublkzswap.daemon / ublkzswapd that is a descendant of this pytest or started during
  the test (never a daemon that was already running, e.g. the host's real swap). A daemon that
  needed the SIGKILL (it did not exit on SIGTERM: a shutdown bug, or a device the test left in
  use) is a test error naming its pid; so is one that survives the SIGKILL. The SIGKILL still
  happens, so the next test starts clean. It also reports a test error if /dev/ublkbN or
  /dev/ublkcN nodes appeared during the test and are still there: deleting devices is the test's
  (the lead's fixtures') job, this only catches leaks.
- ``deadline`` (autouse here): every test runs under a watchdog of DEFAULT_DEADLINE seconds
  (``@pytest.mark.deadline(s)`` to change it). On expiry it has the kernel dump blocked tasks and
  CPUs (sysrq w, l) and fails the test naming it, so a hang is a failure with a stack dump in
  the log instead of a silent VM timeout.
- Every test collected here gets the ``kernel`` marker (registered in pyproject.toml), so
  ``-m 'not kernel'`` deselects them.

Usage from a test module (this conftest is the module tests.kernel.conftest)::

    from .conftest import register_daemon
    proc = register_daemon(subprocess.Popen([...]))
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

import pytest

DAEMON_PATTERNS = ("ublkzswap.daemon", "ublkzswapd")
DEFAULT_DEADLINE = 600
TERM_GRACE = 10.0
NODE_GRACE = 5.0

_registered: list[subprocess.Popen] = []


def register_daemon(proc: subprocess.Popen) -> subprocess.Popen:
    """Have ``cleanup_ublk`` stop ``proc`` after the current test if it is still running."""
    _registered.append(proc)
    return proc


def kernel_unavailable_reason() -> str | None:
    """Why kernel tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "kernel tests need root (ublk control commands, swapon); run as root or inside tools/vm"
    if not os.path.exists("/dev/ublk-control"):
        try:
            subprocess.run(["modprobe", "ublk_drv"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not os.path.exists("/dev/ublk-control"):
        return ("no /dev/ublk-control: this kernel lacks ublk_drv (CONFIG_BLK_DEV_UBLK) and "
                "'modprobe ublk_drv' did not provide it; run the kernel tests in the VM: "
                "python3 -m tools.vm run -- <real python> -m pytest tests/kernel")
    if not os.access("/dev/ublk-control", os.R_OK | os.W_OK):
        return "/dev/ublk-control is not readable and writable by this process"
    return None


@pytest.fixture(scope="session", autouse=True)
def ublk_kernel():
    """Skip (or, with UBLKZSWAP_REQUIRE_KERNEL=1, fail) every kernel test without ublk + root."""
    reason = kernel_unavailable_reason()
    if reason:
        if os.environ.get("UBLKZSWAP_REQUIRE_KERNEL") == "1":
            pytest.fail(f"UBLKZSWAP_REQUIRE_KERNEL=1 but {reason}", pytrace=False)
        pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "deadline(seconds): the watchdog limit of one kernel test")


class DeadlineExceeded(Exception):
    pass


def _sysrq(keys: str) -> None:
    try:
        with open("/proc/sys/kernel/sysrq", "w") as f:
            f.write("1")
        for k in keys:
            with open("/proc/sysrq-trigger", "w") as f:
                f.write(k)
    except OSError:
        pass


@pytest.fixture(autouse=True)
def deadline(request):
    """The per-test watchdog (SIGALRM in the main thread; see the module docstring)."""
    mark = request.node.get_closest_marker("deadline")
    limit = int(mark.args[0]) if mark else DEFAULT_DEADLINE
    name = request.node.nodeid

    def expired(signum, frame):
        _sysrq("wl")
        msg = f"{name}: still running after its {limit}s deadline (blocked tasks dumped to the kernel log)"
        print(f"\n{msg}", flush=True)
        raise DeadlineExceeded(msg)

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    try:
        yield limit
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here + os.sep):
            item.add_marker(pytest.mark.kernel)


def _ublk_nodes() -> set[str]:
    return set(glob.glob("/dev/ublkb*")) | set(glob.glob("/dev/ublkc*"))


def _boot_ticks_now() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks since boot) of ``pid``, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_descendant(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        st = _stat(pid)
        if st is None or st[0] <= 1:
            return False
        if st[0] == ancestor:
            return True
        pid = st[0]
    return False


def _stray_daemons(since_ticks: float) -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        cmd = _cmdline(pid)
        if not any(p in cmd for p in DAEMON_PATTERNS):
            continue
        st = _stat(pid)
        if st and (st[1] >= since_ticks or _is_descendant(pid, me)):
            found.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children so they do not linger as zombies
        if done:
            return False
    except ChildProcessError:
        pass
    st = _stat(pid)
    if st is None:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def _stop(pids: list[int]) -> tuple[list[int], list[int]]:
    """SIGTERM, wait up to TERM_GRACE, then SIGKILL. Returns (the pids that needed SIGKILL,
    those still alive after it)."""
    live = [p for p in pids if _alive(p)]
    stubborn: list[int] = []
    for sig, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 5.0)):
        for p in live:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in live):
            time.sleep(0.1)
        live = [p for p in live if _alive(p)]
        if sig == signal.SIGTERM:
            stubborn = list(live)
    return stubborn, live


@pytest.fixture(autouse=True)
def cleanup_ublk():
    """After each test: stop the test's leftover daemons, then error on leaked ublk nodes."""
    before = _ublk_nodes()
    since = _boot_ticks_now() - 1
    del _registered[:]
    yield
    pids = {p.pid for p in _registered if p.poll() is None}
    pids |= set(_stray_daemons(since))
    cmdlines = {p: _cmdline(p) for p in pids}
    killed, survivors = _stop(sorted(pids))
    for p in _registered:
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    del _registered[:]
    deadline = time.monotonic() + NODE_GRACE
    leaked = _ublk_nodes() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.2)
        leaked = _ublk_nodes() - before
    errors = []
    if killed:
        errors.append(f"ublkzswap daemons did not exit within {TERM_GRACE:g}s of SIGTERM (a shutdown bug, "
                      "or a device the test left in use) and were killed: "
                      + "; ".join(f"pid {p} ({cmdlines[p].strip()})" for p in killed))
    if survivors:
        errors.append(f"ublkzswap daemons still alive after SIGKILL (stuck in the kernel?): {survivors}")
    if leaked:
        errors.append(f"test left ublk device nodes behind (delete devices in the test's teardown): "
                      f"{sorted(leaked)}")
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
