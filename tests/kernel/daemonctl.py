"""Starting and stopping the real ublkzswapd from kernel tests, and checking that nothing is
left behind. Every daemon started here is stopped by the context manager, even on failure.

``UBLKZSWAP_TEST_QUEUES=N`` in the environment starts every daemon here with ``queues=N``
(unless the test gives queues= itself): the whole suite on devices of several queues."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import subprocess
import sys
import time

PY = os.path.realpath(sys.executable)
ENV_QUEUES = "UBLKZSWAP_TEST_QUEUES"


def _words(words) -> list[str]:
    queues = os.environ.get(ENV_QUEUES)
    if queues and not any(w.lstrip("-").startswith("queues=") for w in words):
        return [*words, f"queues={queues}"]
    return list(words)


def leftovers() -> list[str]:
    return sorted(glob.glob("/dev/ublkb*") + glob.glob("/dev/ublkc*"))


def daemon_pids() -> list[int]:
    out = []
    for d in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmd = open(d, "rb").read().split(b"\0")
        except OSError:
            continue
        # as started (python -m ublkzswap.daemon, or the ublkzswapd script), or as a server
        # and standby show themselves (argv[0] ublkzswapd / ublkzswapd-stby)
        if b"ublkzswap.daemon" in cmd or any(c.endswith(b"/ublkzswapd") for c in cmd) or \
                cmd[0] in (b"ublkzswapd", b"ublkzswapd-stby"):
            pid = int(d.split("/")[2])
            if pid != os.getpid():
                out.append(pid)
    return out


def start(*words: str, timeout: float = 180) -> tuple[int, str]:
    """Run ``ublkzswapd WORDS`` in background mode; return (pid, its ready line).
    Raises RuntimeError with the daemon's message if it did not come up."""
    p = subprocess.run([PY, "-m", "ublkzswap.daemon", *_words(words)], capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"ublkzswapd {' '.join(words)} failed ({p.returncode}): "
                           f"{p.stderr.strip()}")
    m = re.search(r"\(pid (\d+)\)", p.stdout)
    assert m, p.stdout
    return int(m.group(1)), p.stdout.strip()


def start_foreground(*words: str, log: str, timeout: float = 180) -> subprocess.Popen:
    """Run ``ublkzswapd --foreground WORDS`` as a child of this process, so that its exit status
    can be read; its output goes to the file ``log``. Returns once it says ready. Raises
    RuntimeError with the log if it exits or is not ready within ``timeout`` (then it is killed)."""
    with open(log, "w") as f:
        proc = subprocess.Popen([PY, "-m", "ublkzswap.daemon", "--foreground", *_words(words)],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        text = open(log).read()
        if "ublkzswapd: ready" in text:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"ublkzswapd --foreground {' '.join(words)} exited "
                               f"{proc.returncode} during start-up: {text.strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"ublkzswapd --foreground {' '.join(words)} not ready after "
                               f"{timeout:g}s (killed): {text.strip()}")
        time.sleep(0.1)


def exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` (not necessarily our child) to end; True if it did."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and not _zombie(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop(pid: int, timeout: float = 60) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"ublkzswapd {pid} ignored SIGTERM for {timeout}s (killed)")


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


@contextlib.contextmanager
def running(*words: str):
    """``with running("num_devices=2", "disksize_kb=65536") as (pid, line): ...``: ``pid`` is
    the first server; whichever server runs at the end (a standby may have taken over) is
    stopped."""
    pid, line = start(*words)
    try:
        yield pid, line
    finally:
        swapoff_all("/dev/ublkb")   # a failed test may leave swap on; the daemon refuses to stop then
        sock = [w.split("=", 1)[1] for w in words if w.startswith("socket=")]
        stop(current_server(sock[0]) if sock else pid)


def current_server(sock, old: int | None = None, timeout: float = 60) -> int:
    """The daemon's server now, from ``SOCKET.pid`` (one other than ``old`` if given)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid = int(open(f"{sock}.pid").read())
        except (OSError, ValueError):
            pid = 0
        if pid and pid != old and os.path.exists(f"/proc/{pid}") and not _zombie(pid):
            return pid
        if time.monotonic() > deadline:
            raise AssertionError(f"no {'new ' if old else ''}server on {sock} after {timeout:g} s")
        time.sleep(0.1)


def standby_of(server: int, timeout: float = 300) -> int:
    """The server's standby once it is prepared (a child named ublkzswapd-stby)."""
    deadline = time.monotonic() + timeout
    while True:
        for d in glob.glob("/proc/[0-9]*/stat"):
            try:
                text = open(d).read()
                name, rest = text.split("(", 1)[1].rsplit(")", 1)
                if int(rest.split()[1]) == server and name == "ublkzswapd-stby":
                    return int(d.split("/")[2])
            except (OSError, ValueError, IndexError):
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"server {server} has no prepared standby after {timeout:g} s")
        time.sleep(0.2)


def swapoff_all(prefix: str) -> None:
    """swapoff every active swap area whose name starts with ``prefix`` (required and non-empty:
    a test turns off only its own swap, e.g. "/dev/ublkb", never the host's)."""
    if not prefix:
        raise ValueError("swapoff_all needs a prefix such as '/dev/ublkb'")
    for line in open("/proc/swaps").read().splitlines()[1:]:
        name = line.split()[0]
        if name.startswith(prefix):
            subprocess.run(["swapoff", name], timeout=600)


def block_stat(dev: str) -> list[int]:
    """The block layer's counters for ``dev`` (a name, or a /dev path or link to one): the
    fields of /sys/block/NAME/stat, in order (0 reads completed, 2 sectors read, 4 writes
    completed, 6 sectors written, 8 requests in flight, ...)."""
    name = os.path.basename(os.path.realpath(dev) if dev.startswith("/") else dev)
    return [int(x) for x in open(f"/sys/block/{name}/stat").read().split()]


def wait_gone(timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    return leftovers()
