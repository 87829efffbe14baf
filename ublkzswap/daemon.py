"""``ublkzswapd``: the process that owns the ublk devices.

Owns: process work only -- re-executing with glibc's allocator, going to the background,
locking memory, logging, signals -- around the parts that do the rest: :mod:`params` (the
words), :mod:`devices` (compcache's policy), :mod:`ublkdev` (one ublk device), the store
(:mod:`store`) and the control socket (:mod:`ctlserver`)::

    ublkzswapd num_devices=N [disksize_kb=K] [memlimit_kb=M] [backing_swap=PATH] ...
      |  parse; re-exec with PYTHONMALLOC=malloc; fork to the background (unless --foreground;
      |  the parent waits for "ready" or an error and exits 0 / 1)
      v
    lock memory (memory.lock_process: refuse to start if not), warm the store's paths
      v
    ADD_DEV ids 0..N-1 --- control socket up --- device 0 initialised if disksize_kb= or
      v                                          backing_swap= was given
    serve until SIGTERM / SIGINT: then STOP_DEV + DEL_DEV every device and exit 0 -- refused
    (logged, the daemon keeps serving) while a device is swapped on, mounted or held

Still naive: one process; a queue thread that fails leaves its device "failed" (shown by
info and --list) rather than being replaced.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading

from . import memory, ublkctrl
from .ctlserver import ControlServer
from .devices import Manager
from .params import UsageError, help_text, parse_params
from .handler import describe
from .uapi import PAGE_SIZE
from .ublkdev import UblkDevice


def warm_up(storemod, compressor: str) -> None:
    """Run every page path of a small throw-away store once and check the data came back, so
    that what the I/O path needs is resident (and, in a locked process, locked) before a
    device goes live. Raises AssertionError or OSError on a failure."""
    s = storemod.Store(32 * PAGE_SIZE, compressor=compressor, keeper=False, inline_refill=True, low=4, high=16)
    try:
        text = (bytes(range(32, 127)) * 44)[:PAGE_SIZE]
        seed, rnd = 0x9E3779B97F4A7C15, bytearray()
        while len(rnd) < PAGE_SIZE:
            seed = (seed * 6364136223846793005 + 1442695040888963407) & ((1 << 64) - 1)
            rnd += seed.to_bytes(8, "little")
        pages = [bytes(PAGE_SIZE), b"\x5a" * PAGE_SIZE, text, text[::-1], bytes(rnd)]
        data = b"".join(pages)
        s.write(0, memoryview(data))
        out, one = bytearray(len(data)), bytearray(PAGE_SIZE)
        s.read(0, memoryview(out))
        assert out == data, "store self-test: a multi-page read differs"
        for i, p in enumerate(pages):
            s.write_swap((8 + i) * PAGE_SIZE, memoryview(p))
            s.read((8 + i) * PAGE_SIZE, memoryview(one))
            assert one == p, f"store self-test: page {i} differs"
        s.discard(8 * PAGE_SIZE, 2 * PAGE_SIZE)
        s.write_zeroes(10 * PAGE_SIZE, 2 * PAGE_SIZE)
        s.stats()
        s.set_memlimit(PAGE_SIZE)                  # the refusals are paths too
        for write in (s.write_swap, s.write):
            try:
                write(16 * PAGE_SIZE, memoryview(pages[-1]))
                raise AssertionError("store self-test: a write beyond the memory limit was stored")
            except OSError as e:
                assert e.errno in (errno.ENOMEM, errno.ENOSPC), e
    finally:
        s.close()


# ----------------------------------------------------------------------------- main
def _reexec_with_malloc(argv: list[str]) -> None:
    """Start over with Python's allocator on glibc malloc (whose heap lock_process pins)."""
    if os.environ.get("PYTHONMALLOC") != "malloc":
        # no BLAS/OpenMP worker threads: their stacks would only add locked memory
        env = dict(os.environ, PYTHONMALLOC="malloc", MALLOC_ARENA_MAX="1",
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        os.execve(sys.executable, [sys.executable, "-m", "ublkzswap.daemon"] + list(argv), env)


def _daemonize() -> int:
    """Fork; the parent waits for the child's one-line verdict and returns its exit status;
    the child returns -1 with fd ``_READY_FD`` set for :func:`_notify`."""
    global _ready_fd
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        msg = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            msg += chunk
        text = msg.decode(errors="replace").strip()
        if text.startswith("ready"):
            print(f"ublkzswapd: {text[len('ready'):].strip()} (pid {pid})")
            return 0
        print(f"ublkzswapd: {text or 'daemon exited during start-up'}", file=sys.stderr)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return 1
    os.close(r)
    os.setsid()
    _ready_fd = w
    return -1


_ready_fd = -1


def _log_exception(etype, e, tb) -> None:
    print(f"ublkzswapd: fatal: {describe(e)}", file=sys.stderr)
    sys.__excepthook__(etype, e, tb)


class _KmsgLines:
    """stderr of a background daemon: each line one kernel log record at KERN_ERR (fd 2 is
    /dev/kmsg), so it shows in dmesg and on a console."""

    def __init__(self):
        self._part = ""

    def write(self, text: str) -> int:
        *lines, self._part = (self._part + text).split("\n")
        for line in lines:
            try:
                os.write(2, f"<3>{line}\n".encode(errors="replace"))
            except OSError:
                pass
        return len(text)

    def flush(self) -> None:
        if self._part:
            self.write("\n")


def _notify(text: str) -> None:
    global _ready_fd
    if _ready_fd >= 0:
        os.write(_ready_fd, text.encode() + b"\n")
        os.close(_ready_fd)
        _ready_fd = -1
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        os.close(devnull)
        # what a background daemon still has to say goes to the kernel log (dmesg), as a
        # kernel driver's messages would
        try:
            log = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            log = os.open(os.devnull, os.O_WRONLY)
        os.dup2(log, 2)
        os.close(log)
        sys.stderr = _KmsgLines()
        sys.excepthook = _log_exception
    else:
        print(f"ublkzswapd: {text}", file=sys.stderr, flush=True)


def fail(msg: str) -> int:
    if _ready_fd >= 0:
        _notify(msg)
    else:
        print(f"ublkzswapd: {msg}", file=sys.stderr)
    return 1


class _StderrHandler(logging.Handler):
    """Log records as ``ublkzswapd: message`` lines on whatever sys.stderr is now (the kernel
    log once a background daemon has detached)."""

    def emit(self, record):
        try:
            print(f"ublkzswapd: {self.format(record)}", file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def run(cfg: dict) -> int:
    """Bring everything up, serve until SIGTERM/SIGINT, tear down. Returns exit status."""
    root = logging.getLogger("ublkzswap")
    root.addHandler(_StderrHandler())
    root.setLevel(logging.INFO)
    from . import store as storemod           # before locking: no imports on the I/O path
    try:
        memory.lock_process()
        # Every thread (they inherit it): reclaim done on our behalf never writes pages out,
        # so no thread of ours can wait for a request tag on a device we serve -- a thread
        # stuck there could hold the GIL, or a lock the queue thread needs.
        memory.set_io_flusher()
    except OSError as e:
        return fail(f"refusing to serve swap: {e.strerror}")
    if cfg["target"] == "zswap":
        try:
            warm_up(storemod, cfg["compressor"])   # what the I/O path runs: resident and locked
        except Exception as e:
            return fail(f"store self-test failed: {describe(e)}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        control = ublkctrl.Control()
    except OSError as e:
        return fail(f"cannot open {ublkctrl.CONTROL_PATH}: {e.strerror}")
    def make_store(disksize, **kw):
        return storemod.Store(disksize, keeper_init=memory.keeper_thread_init,
                              keeper_idle=memory.lock_heap_tail,
                              may_grow=memory.GrowthGuard(), allocator=cfg["allocator"], **kw)

    manager = Manager(cfg, lambda i: UblkDevice(control, i), make_store)
    server = None
    try:
        manager.reserve_all()
        if "disksize_kb" in cfg or "backing_swap" in cfg:
            manager.set_disksize_kb(0, cfg.get("disksize_kb", 0))
            manager.set_backing_swap(0, cfg.get("backing_swap", ""))
            manager.set_memlimit_kb(0, cfg.get("memlimit_kb", 0))
            manager.init(0)
        server = ControlServer(manager, cfg["socket"], owner_uid=os.getuid())
        server.start()
        server.handle({"v": 1, "op": "list"}, 0)    # warm the control path too
    except OSError as e:
        for line in manager.teardown():
            print(f"ublkzswapd: {line}", file=sys.stderr)
        control.close()
        return fail(e.strerror or str(e))
    n = cfg["num_devices"]
    init = " /dev/ublkb0 initialised" if manager.info(0)["state"] != "uninitialised" else ""
    _notify(f"ready {n} device{'s' if n > 1 else ''} reserved{init}")
    while True:
        while not stop.wait(1.0):
            pass
        busy = manager.busy()
        if not busy:
            break
        # zram cannot be unloaded under an active swap either: stopping now would fail every
        # swap-in from these devices (and kill whatever owns those pages)
        print(f"ublkzswapd: not stopping: {', '.join(busy)} in use (swapoff first); "
              "SIGKILL would lose the pages stored there", file=sys.stderr, flush=True)
        stop.clear()
    if server is not None:
        server.close()
    errors = manager.teardown()
    for line in errors:
        print(f"ublkzswapd: {line}", file=sys.stderr)
    control.close()
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_params(argv)
    except UsageError as e:
        if str(e) == "help":
            print(help_text())
            return 0
        print(f"ublkzswapd: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("ublkzswapd: must run as root (ublk devices and memory locking need it)",
              file=sys.stderr)
        return 1
    ok, why = ublkctrl.ublk_available()
    if not ok:
        os.system("modprobe ublk_drv >/dev/null 2>&1")
        ok, why = ublkctrl.ublk_available()
        if not ok:
            print(f"ublkzswapd: {why}", file=sys.stderr)
            return 1
    _reexec_with_malloc(argv)
    if not cfg["foreground"]:
        rc = _daemonize()
        if rc >= 0:
            return rc
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
