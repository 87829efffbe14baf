"""``ublkzswapd``: the process that owns the ublk devices.

Owns: process work only -- re-executing with glibc's allocator, going to the background,
locking memory, logging, signals -- around the parts that do the rest: :mod:`params` (the
words), :mod:`devices` (compcache's policy), :mod:`ublkdev` (one ublk device), the store
(:mod:`store`) and the control socket (:mod:`ctlserver`)::

    ublkzswapd num_devices=N [disksize_kb=K] [memlimit_kb=M] [backing_swap=PATH] ...
      |  parse the words and the configuration file (params.configure: a bad one is one line,
      |  exit 2, before anything else); re-exec as DAEMON_FLAGS and daemon_env say (glibc
      |  malloc for Python, no site, -OO); fork to the
      |  background (unless --foreground; the parent waits for "ready" or an error and exits
      v  0 / 1)
    lock memory (memory.lock_process: refuse to start if not), warm the store's paths (with
      v  every compressor the configuration uses)
    server: take over every device a dead server left (shared state: shmstate), else ADD_DEV
      |  ids 0..N-1 --- every configured device not taken over initialised (init_configured;
      |  if one fails, those initialised here are reset and the start fails) --- control socket
      |  up --- with ``standby``, start a standby (posix_spawn: the same command, prepared the
      v  same way, then waiting on a pidfd of the server; see Standby)
    serve until SIGTERM / SIGINT: then end the standby, STOP_DEV + DEL_DEV every device and
    exit 0 -- refused (logged, the server keeps serving) while a device is swapped on,
    mounted or held. SIGHUP (``ublkzswapd --restart``): a fresh standby (the installed code)
    is prepared, then the server leaves its devices to it. SIGUSR2 (``ublkzswapd --stop``
    while systemd restarts the service): the server leaves its devices held for the next
    ublkzswapd, if the kernel could give that one its memory; ``--stop`` otherwise swaps the
    devices off, then sends SIGTERM.

When the server dies -- kill -9, a crash, or on purpose because a device's queue thread
ended -- the kernel holds the devices' requests and the standby takes them over and becomes
the server (with a standby of its own). Without ``standby`` the devices stay held, every page
kept, until ``ublkzswapd`` is started again (a server ending on purpose starts a standby
first). The server's pid is in ``SOCKET.pid``.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

from . import memory, sdnotify, ublkctrl
from .config import ConfigError
from .ctlserver import ControlServer
from .devices import Manager
from .params import UsageError, compressors, configure, help_text, parse_params, queue_count
from .handler import describe
from .uapi import PAGE_SIZE, UBLK_IO_F_SWAP
from .libc import spawn
from .queue import prepare_buffers
from .ublkdev import IO_BUF_BYTES, QUEUE_DEPTH, UblkDevice, block_users


def keeper_options() -> dict:
    """How a device's store runs its arena keeper in the daemon (and in its self-test)."""
    return dict(keeper_init=memory.keeper_thread_init, keeper_idle=memory.lock_heap_tail,
                may_grow=memory.GrowthGuard(), pressure=memory.SwapActivity())


WARM_DENSE = 1024         # the self-test writes these pages densely: several keeper batches


def warm_up(storemod, compressor: str, allocator: str) -> None:
    """Run every page path of a small throw-away store once and check the data came back, so
    that what the I/O path needs is resident (and, in a locked process, locked) before a
    device goes live. The store is built as a device's is: on shared state (private
    segments, gone when it closes) and with a keeper thread, whose waits, refills and
    compaction (on demand and in the background) are run too, and so is a takeover of what
    it left -- code first touched later would be read back from disk, under memory
    pressure, by a request. Raises AssertionError or OSError on a failure."""
    from . import shmstate
    npages = storemod.COMPACT_SCAN + WARM_DENSE     # a scan of a whole slice and of a part
    disksize = npages * PAGE_SIZE
    state = shmstate.DeviceState.create(
        -1, disksize=disksize, arena_pages=storemod.arena_pages(disksize, allocator),
        unit=storemod.ALLOCATORS[allocator].UNIT_PAGES,
        allocator=list(storemod.ALLOCATORS).index(allocator), compressor=compressor,
        private=True)
    try:
        s = storemod.Store(disksize, state=state, allocator=allocator, compressor=compressor,
                           **keeper_options())
    except BaseException:
        state.detach()
        raise
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
        _expect(out == data, "a multi-page read differs")
        for i, p in enumerate(pages):
            s.write_swap((8 + i) * PAGE_SIZE, memoryview(p))
            s.read((8 + i) * PAGE_SIZE, memoryview(one))
            _expect(one == p, f"page {i} differs")
        s.discard(8 * PAGE_SIZE, 2 * PAGE_SIZE)
        # the queue's fast path (a wake-up's requests of whole pages in one call), as a
        # queue runs it: writes of every kind of page (swap and not; one page a request, and
        # all of them in one request), then reads of each back (short of memory a write
        # may be refused, ENOSPC/ENOMEM: then only what was stored is checked, as below)
        bufs = [memoryview(bytearray(PAGE_SIZE)) for _ in pages] + [memoryview(bytearray(data))]
        serve, done = s.page_server(bufs, lambda e: -errno.EIO), []
        for b, p in zip(bufs, pages):
            b[:] = p
        many = len(pages)                            # the tag of the multi-page request
        serve([(k, 1 | (UBLK_IO_F_SWAP if k & 1 else 0), 8 + k, 1) for k in range(many)]
              + [(many, 1, 24, many)], done)
        stored = [k for k, r in done if r == PAGE_SIZE * (many if k == many else 1)]
        _expect(all(r in (PAGE_SIZE, PAGE_SIZE * many, -errno.ENOSPC, -errno.ENOMEM)
                    for _, r in done), f"the fast path failed a write: {done}")
        for b in bufs:
            b[:] = bytes(len(b))
        done.clear()
        serve([(k, 0, 8 + k, 1) if k < many else (k, 0, 24, many) for k in stored], done)
        _expect(done == [(k, len(bufs[k])) for k in stored] and
                all(bytes(bufs[k]) == (pages[k] if k < many else data) for k in stored),
                "the fast path differs")
        s.write_zeroes(10 * PAGE_SIZE, 2 * PAGE_SIZE)
        # deduplication: swap-outs of a stored page share its object (both paths); holders
        # leave by overwrite and by discard; two stay, for compaction to move below
        for k in range(12, 15):
            s.write_swap(k * PAGE_SIZE, memoryview(text))
        bufs[2][:] = text
        done.clear()
        serve([(2, 1 | UBLK_IO_F_SWAP, 15, 1)], done)
        _expect(done == [(2, PAGE_SIZE)], f"the fast path failed a shared swap-out: {done}")
        s.write_swap(12 * PAGE_SIZE, memoryview(rnd))
        s.discard(13 * PAGE_SIZE, PAGE_SIZE)
        s.read(15 * PAGE_SIZE, memoryview(one))
        _expect(one == text, "a shared page differs")
        # fill past the ready pool twice (writes wait for the keeper), leave holes, compact;
        # then free everything, so that the keeper gives the surplus back
        # (short of memory -- a standby prepared under pressure -- the store may refuse a
        # write: what was stored is still checked, and the rest is warmed by use)
        # (no copies of what was written are kept: a page is made again to check it, so the
        # self-test's peak -- left in the never-trimmed heap -- stays small)
        used = list(range(16, WARM_DENSE)) + list(range(WARM_DENSE, npages, 61))

        def page(i: int, round_: int) -> bytes:
            p = pages[(i + round_) % len(pages)]
            return p[i % 64:] + p[:i % 64]

        written = {}                                # page -> the round that wrote it last
        try:
            for round_ in range(2):
                for i in used:
                    s.write(i * PAGE_SIZE, memoryview(page(i, round_)))
                    written[i] = round_
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
        kept = sorted(written)
        for i in kept[::2]:
            s.discard(i * PAGE_SIZE, PAGE_SIZE)
        s.compact()
        s.compact_if_wasteful()
        for i in kept[1::2]:
            s.read(i * PAGE_SIZE, memoryview(one))
            _expect(one == page(i, written[i]), f"page {i} differs after compaction")
        s.stats()
        s.discard(16 * PAGE_SIZE, disksize - 16 * PAGE_SIZE)
        s.compact()
        s.pool.step()
        s.set_memlimit(PAGE_SIZE)                  # the refusals are paths too
        for write in (s.write_swap, s.write):
            try:
                write(16 * PAGE_SIZE, memoryview(pages[-1][::-1]))   # stored nowhere
                _expect(False, "a write beyond the memory limit was stored")
            except OSError as e:
                _expect(e.errno in (errno.ENOMEM, errno.ENOSPC), f"a refused write: {e}")
        # a takeover of what it left, as a standby makes one while the kernel holds the I/O
        # (code first run then would be read back from disk, under memory pressure): the
        # store made again on the same state once this one's keeper has stopped
        s.pool.stop()
        t = storemod.Store(disksize, state=state, adopt=True, allocator=allocator,
                           compressor=compressor, **keeper_options())
        try:
            t.read(15 * PAGE_SIZE, memoryview(one))
            _expect(one == text, "a shared page differs after a takeover")
            t.resume()
            t.pool.step()
        finally:
            t.close()
    finally:
        s.close()
    _warm_sorts()


def _expect(ok: bool, what: str) -> None:
    """The self-test's check (not ``assert``: the daemon runs under ``-OO``)."""
    if not ok:
        raise AssertionError(f"store self-test: {what}")


SORT_SIZES = (2, 7, 16, 17, 31, 64, 65, 128, 129, 256, 1000, 4096, 20000)


def _warm_sorts() -> None:
    """Run numpy's sorts the arena keeper and compaction use (a keeper batch's pages, the
    segments by live bytes) at every size class: numpy picks a sorting network, a SIMD
    partition or a fallback by length and type, each its own code, and the self-test's
    small store reaches only the smallest. In the VM a keeper pass first sorting a big batch
    under swap pressure read that code from disk."""
    import numpy as np
    rng = np.random.default_rng(1)
    for dtype in (np.int64, np.uint64, np.int32, np.uint32):
        for n in SORT_SIZES:
            a = rng.integers(0, 1 << 30, n).astype(dtype)
            np.argsort(a, kind="stable")   # (not the default argsort: never used, and its
            a.sort()                        # SIMD code segfaulted in the VM, locked heap)
            a[::-1].copy().sort()


# ----------------------------------------------------------------------------- main
#: how the daemon's own interpreter runs: no ``site`` (its .pth hooks import modules the daemon
#: never uses, into a heap that is locked and never trimmed) and ``-OO`` (no docstrings kept);
#: its modules are found through PYTHONPATH instead (:func:`daemon_env`). Compiled ``.opt-2.pyc``
#: files (tools/install-deps makes them) spare it compiling every module, and the compiler's
#: peak, at each start.
DAEMON_FLAGS = ("-S", "-OO")


def daemon_argv(argv) -> list[str]:
    """The command line that runs the daemon's code with ``argv``, as the daemon runs."""
    return [sys.executable, *DAEMON_FLAGS, "-m", "ublkzswap.daemon", *argv]


def daemon_env(**extra: str) -> dict:
    """The environment for :func:`daemon_argv`: glibc's allocator for Python (whose heap
    lock_process pins), one malloc arena, no BLAS/OpenMP worker threads (their stacks would
    only add locked memory), and this interpreter's module path, since ``-S`` drops the one
    ``site`` would build (the editable install's finder, a venv's site-packages)."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [pkg_parent] + [p for p in sys.path if p and p != pkg_parent and os.path.isdir(p)]
    return dict(os.environ, PYTHONMALLOC="malloc", MALLOC_ARENA_MAX="1",
                OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(path), **extra)


def _reexec_as_daemon(argv: list[str]) -> None:
    """Start over as :func:`daemon_argv` runs the daemon, unless this is already that."""
    if os.environ.get("PYTHONMALLOC") != "malloc" or not sys.flags.no_site:
        os.execve(sys.executable, daemon_argv(argv), daemon_env())


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


# syslog levels (what the kernel log and journald take)
CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = 2, 3, 4, 5, 6, 7
_LEVELS = {logging.CRITICAL: CRIT, logging.ERROR: ERR, logging.WARNING: WARNING,
           logging.INFO: INFO, logging.DEBUG: DEBUG}


def _under_journald() -> bool:
    """stderr is journald's stream (systemd sets JOURNAL_STREAM to its device:inode)."""
    try:
        dev, ino = (int(x) for x in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (dev, ino)
    except (KeyError, ValueError, OSError):
        return False


def say(text: str, level: int = INFO) -> None:
    """One message line of the running daemon at syslog ``level``: in the background a
    kernel log record ``<level>ublkzswapd[pid]: text`` (dmesg --level shows real levels);
    in the foreground under journald ``<level>text`` (journald adds name and pid); else
    ``ublkzswapd: text`` on stderr."""
    if isinstance(sys.stderr, _KmsgLines):
        sys.stderr.record(level, text)
    elif _under_journald():
        print(f"<{level}>{text}", file=sys.stderr, flush=True)
    else:
        print(f"ublkzswapd: {text}", file=sys.stderr, flush=True)


def _log_exception(etype, e, tb) -> None:
    say(f"fatal: {describe(e)}", CRIT)
    sys.__excepthook__(etype, e, tb)


class ThreadFailures:
    """Uncaught exceptions in the daemon's threads (the arena keeper, the control server, the
    standby keeper): each is logged and recorded, and the server's main loop ends the server
    on purpose, as for a queue thread that ended, so that its standby takes the devices over
    instead of a half-dead server serving on (a keeper gone would fail every write that
    needs memory)."""

    def __init__(self):
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def install(self) -> None:
        threading.excepthook = self._hook

    def _hook(self, args) -> None:
        if issubclass(args.exc_type, SystemExit):
            return
        name = args.thread.name if args.thread is not None else "?"
        line = f"thread {name}: {describe(args.exc_value, args.exc_traceback)}"
        say(line, ERR)
        with self._lock:
            self.lines.append(line)

    def __call__(self) -> list[str]:
        with self._lock:
            return list(self.lines)


class _KmsgLines:
    """stderr of a background daemon (fd 2 is /dev/kmsg): :func:`say` writes records at their
    level; anything else written to stderr (a traceback) becomes one record a line at
    KERN_ERR. Every record is ``ublkzswapd[pid]: ...``, as dmesg shows a driver's."""

    def __init__(self):
        self._part = ""

    def record(self, level: int, line: str) -> None:
        try:
            os.write(2, f"<{level}>ublkzswapd[{os.getpid()}]: {line}\n".encode(errors="replace"))
        except OSError:
            pass

    def write(self, text: str) -> int:
        *lines, self._part = (self._part + text).split("\n")
        for line in lines:
            self.record(ERR, line)
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
        _detach_output()
    else:
        say(text, NOTICE)


def _detach_output() -> None:
    """A background daemon's stdin/stdout go to /dev/null, its stderr to the kernel log (as a
    kernel driver's messages would)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        log = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        log = os.open(os.devnull, os.O_WRONLY)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = _KmsgLines()
    sys.excepthook = _log_exception


def fail(msg: str) -> int:
    if _ready_fd >= 0:
        _notify(msg)
    else:
        say(msg, ERR)
    return 1


class _StderrHandler(logging.Handler):
    """Log records through :func:`say` at their level (the kernel log once a background
    daemon has detached)."""

    def emit(self, record):
        try:
            say(self.format(record), _LEVELS.get(record.levelno, INFO))
        except Exception:
            self.handleError(record)


def private_anon_bytes() -> int:
    """This process's anonymous memory (RssAnon): what a fresh server must take anew."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def pidfile(cfg: dict) -> str:
    """Where the server's pid is kept: next to its control socket."""
    return cfg["socket"] + ".pid"


def request_restart(cfg: dict) -> int:
    """``ublkzswapd --restart``: ask the server on ``socket=`` to hand its devices to a fresh
    standby running the installed code, and wait until that one answers."""
    from .control import Client
    try:
        with open(pidfile(cfg)) as f:
            pid = int(f.read())
        before = Client(cfg["socket"], timeout=5).call("ping")["pid"]
    except (OSError, ValueError) as e:
        print(f"ublkzswapd: no running daemon to restart on {cfg['socket']}: "
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + RESTART_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            now = Client(cfg["socket"], timeout=5).call("ping")["pid"]
        except OSError:
            continue
        if now != before:
            print(f"ublkzswapd: restarted (server {before} -> {now})")
            return 0
    print(f"ublkzswapd: the daemon did not come back within {RESTART_WAIT:g} s", file=sys.stderr)
    return 1


def unit_of_cgroup(text: str) -> str | None:
    """The systemd service named by a /proc/PID/cgroup ``text`` (its innermost ``*.service``
    path component), or None: the process runs outside any service."""
    for line in text.splitlines():
        for part in reversed(line.split(":", 2)[-1].split("/")):
            if part.endswith(".service"):
                return part
    return None


def restarting(listing: str, unit: str) -> bool:
    """Whether ``systemctl list-jobs --no-legend`` ``listing`` (JOB UNIT TYPE STATE) has a
    restart job for ``unit``: systemd runs a restart as a stop, then a start, in one job whose
    type stays ``restart`` while the stop part (ExecStop=) runs."""
    for line in listing.splitlines():
        f = line.split()
        if len(f) >= 3 and f[1] == unit and f[2] in ("restart", "try-restart"):
            return True
    return False


def systemd_restarting(pid: int) -> str | None:
    """The service ``pid`` runs in, if systemd is restarting it now; else None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            unit = unit_of_cgroup(f.read())
    except OSError:
        return None
    if unit is None:
        return None
    try:
        out = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--no-pager", "--full"],
                             capture_output=True, text=True, timeout=STOP_QUERY_TIMEOUT).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return unit if restarting(out, unit) else None


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for process ``pid`` to end; True if it has."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def request_stop(cfg: dict) -> int:
    """``ublkzswapd --stop``, the unit's ExecStop=: stop the daemon on ``socket=`` losing
    nothing. When systemd is restarting the service the server leaves its devices held, pages
    and all, for the ublkzswapd the restart starts next (SIGUSR2; their I/O waits meanwhile);
    otherwise each of its devices in use as swap is swapped off first (as stopping zram's
    swap units does), then the server is asked to stop (SIGTERM). Exit status 0 once the
    server has ended (or none was running)."""
    from .control import Client
    try:
        with Client(cfg["socket"], timeout=5) as c:
            pid = c.call("ping")["pid"]
            ids = c.call("devices")
    except OSError as e:
        print(f"ublkzswapd: no daemon running on {cfg['socket']}: "
              f"{getattr(e, 'strerror', None) or e}")
        return 0
    unit = systemd_restarting(pid)
    if unit is not None:
        os.kill(pid, signal.SIGUSR2)
        if wait_exit(pid, STOP_WAIT):
            print(f"ublkzswapd: server {pid} left its devices to the next ublkzswapd "
                  f"({unit} is restarting)")
            return 0
        print(f"ublkzswapd: server {pid} did not leave its devices within {STOP_WAIT:g} s "
              "(its log says why); it keeps serving", file=sys.stderr)
        return 1
    rc = 0
    for i in ids:
        bdev = f"/dev/ublkb{i}"
        if "swap" not in block_users(bdev):
            continue
        p = subprocess.run(["swapoff", bdev], capture_output=True, text=True)
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            print(f"ublkzswapd: swapoff {bdev} failed: {why}", file=sys.stderr)
            rc = 1
    os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, STOP_WAIT):
        print(f"ublkzswapd: server {pid} still running after {STOP_WAIT:g} s "
              "(its log says why)", file=sys.stderr)
        return 1
    return rc


def run(cfg: dict, argv: list[str]) -> int:
    """Prepare (imports, locked memory, a self-test through the store), then serve -- or, in a
    standby, wait for the server to die and take its devices over. Returns the exit status."""
    server_fd = None
    if os.environ.get(ENV_STANDBY):
        # a standby: hold on to the server first thing (a pid cannot be mistaken later)
        try:
            server_fd = os.pidfd_open(int(os.environ[ENV_STANDBY]))
        except ProcessLookupError:
            server_fd = -1                        # gone already: take over once prepared
    root = logging.getLogger("ublkzswap")
    root.addHandler(_StderrHandler())
    root.setLevel(logging.INFO)
    from . import store as storemod           # before locking: no imports on the I/O path
    try:
        memory.lock_process()
        # Every thread (they inherit it, as does the standby across exec): reclaim done on
        # our behalf never writes pages out, so no thread of ours can wait for a request tag
        # on a device we serve -- a thread stuck there would hold the GIL, or keep a killed
        # server from exiting and so the device from being taken over.
        memory.set_io_flusher()
        # the stacks of every thread it will run, made now: a thread's first Python runs
        # holding the GIL, and a fault there on a new stack page, short of memory, would
        # stall the queues -- and with them the swap-out that could free the page
        memory.reserve_thread_stacks(thread_stacks(cfg))
    except OSError as e:
        return fail(f"refusing to serve swap: {e.strerror}")
    if cfg["target"] == "compressed":
        try:
            for name in compressors(cfg):    # what the I/O path runs: resident and locked
                warm_up(storemod, name, cfg["allocator"])
        except Exception as e:
            return fail(f"store self-test failed: {describe(e)}")
        try:
            memory.lock_touched()          # again: the code it ran, with its neighbourhood
        except OSError as e:
            return fail(f"refusing to serve swap: {e.strerror}")
    if server_fd is not None:
        return standby(cfg, storemod, argv, server_fd)
    return serve(cfg, storemod, argv, first=True)


RESTART_WAIT = 300.0
STOP_WAIT = 120.0             # seconds --stop waits for the server to leave or to stop
STOP_QUERY_TIMEOUT = 10.0     # seconds for systemctl to list its jobs
RELEASE_MARGIN = 16 << 20     # free memory a restart needs beyond the server's own image
STANDBY_READY_WAIT = 300.0    # seconds a standby may take to prepare (imports, locking, self-test)
STANDBY_BACKOFF = (1.0, 30.0)  # respawn delay after a standby died: first, most
EXIT_HANDOVER = 75            # a server that left its devices to its standby on purpose
EXIT_FAILED = 70              # a server that found a device it could no longer serve
ENV_REEXEC = "UBLKZSWAPD_REEXEC"
ENV_STANDBY = "UBLKZSWAPD_STANDBY_FOR"       # the pid of the server a standby is for
ENV_READY_FD = "UBLKZSWAPD_READY_FD"         # where a standby says it is prepared


class Standby:
    """The server's standby: the next server, started and prepared before it is needed.

    It is a fresh process (``posix_spawn``: the kernel's vfork, so nothing is shared
    copy-on-write with the server, whose I/O path must never fault), running the installed
    code: imports done, memory locked, heap pre-grown, the store self-tested. It then waits,
    running no Python, on a pidfd of the server; when the server dies (crash, kill -9, a
    failure it ended itself for, a planned hand-over) it takes every device over from the
    shared state, without the cold start whose allocations could wait on the very swap that
    is held, and starts a standby of its own. A thread here keeps one standby ready and starts
    another if it dies (with back-off).

    ``keep`` (the ``standby`` parameter) keeps one prepared all the time. Without it a standby
    is started only when one is needed (:meth:`ready`: a planned restart, a server ending on
    purpose); a server that just dies then leaves its devices held, pages kept, for the next
    ``ublkzswapd``.

    Still naive: a standby is a second whole image of the daemon (about as much locked memory
    as the server), which is why it is not kept by default."""

    def __init__(self, argv: list[str], keep: bool = True):
        self.argv = argv
        self.keep = keep
        self.pid = 0
        self._ready = threading.Event()
        self._closing = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start keeping a standby now if ``keep``, else when :meth:`ready` is first called."""
        if self.keep:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._keep, name="standby", daemon=True)
            self._thread.start()

    def _spawn(self) -> tuple[int, int]:
        r, w = os.pipe()
        os.set_inheritable(w, True)
        env = daemon_env(**{ENV_STANDBY: str(os.getpid()), ENV_READY_FD: str(w),
                            ENV_REEXEC: "1"})
        try:
            pid = spawn(sys.executable, daemon_argv(self.argv), env)
        finally:
            os.close(w)
        return pid, r

    def _keep(self) -> None:
        memory.daemon_thread_init()
        delay = STANDBY_BACKOFF[0]
        while not self._closing:
            with self._lock:
                if self._closing:
                    return
                try:
                    self.pid, r = self._spawn()
                except OSError as e:
                    say(f"cannot start a standby: {e.strerror}", ERR)
                    self.pid, r = 0, -1
            if self.pid:
                ok = _read_retrying(r) == b"!"
                os.close(r)
                if ok:
                    self._ready.set()
                    delay = STANDBY_BACKOFF[0]
                code = _wait_exit(self.pid)
                self._ready.clear()
                if self._closing:
                    return
                say(f"standby {self.pid} ended ({_how(code)}); starting another", WARNING)
            time.sleep(delay)
            delay = min(delay * 2, STANDBY_BACKOFF[1])

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a prepared standby (starting one if none is kept); True
        if there is one."""
        self._start()
        return self._ready.wait(timeout)

    def replace(self) -> None:
        """End the standby (the keeper starts a fresh one: the installed code)."""
        self._ready.clear()
        self._signal(signal.SIGTERM)

    def stop(self) -> None:
        """End the standby for good (a clean stop: the devices go with the server)."""
        with self._lock:
            self._closing = True
        self._signal(signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(30)

    def _signal(self, sig) -> None:
        if self.pid:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


TAKEOVER_RESERVE = 4 << 20      # a standby's memory handed back as it takes the devices over
TAKEOVER_HEAP_PER_UNIT = 64    # heap bytes a takeover's rebuild uses per arena unit (about 43)
STANDBY_CHECK = 5.0            # seconds between a standby's looks at the devices' sizes


def thread_stacks(cfg: dict) -> int:
    """How many threads a server of ``cfg`` runs at once: each device's queues and arena
    keeper, the control server, one control op, and the standby keeper if it keeps one."""
    return cfg["num_devices"] * (queue_count(cfg) + 1) + 2 + bool(cfg.get("standby"))


def takeover_heap(cfg: dict) -> int:
    """Free heap a standby keeps for taking over the devices initialised now: the I/O path's
    headroom and the rebuild's numpy temporaries (per arena unit). The heap grows otherwise
    while the kernel holds the devices' I/O."""
    from . import shmstate
    need = memory.HEAP_HEADROOM
    for i in range(cfg["num_devices"]):
        try:
            st = shmstate.DeviceState.attach(i)
        except OSError:
            continue                      # not initialised (or not ours): nothing to rebuild
        try:
            need += TAKEOVER_HEAP_PER_UNIT * (st.arena_pages // max(1, st.unit))
        finally:
            st.detach()
    return need


STANDBY_NAME = "ublkzswapd-stby"   # a prepared standby's name (ps, /proc/PID/comm)
SERVER_NAME = "ublkzswapd"


def standby(cfg: dict, storemod, argv: list[str], fd: int) -> int:
    """A prepared standby (see :class:`Standby`): say so, wait for the server (pidfd ``fd``,
    -1 if it is gone already) to end, then serve in its place. SIGTERM before then ends it
    quietly."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if os.path.realpath("/proc/self/fd/2") == "/dev/kmsg":     # the server's log, inherited
        sys.stderr = _KmsgLines()
        sys.excepthook = _log_exception
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ready = int(os.environ.pop(ENV_READY_FD, "-1"))
    os.environ.pop(ENV_STANDBY, None)
    # every configured queue's tag buffers (a device taken over that has more queues than
    # configured makes the rest while its I/O is held: keep queues= as the devices were made)
    prepare_buffers(cfg["num_devices"] * queue_count(cfg), QUEUE_DEPTH * IO_BUF_BYTES)
    # the free heap a takeover's rebuild needs, and pages to hand back for what it cannot
    # make ahead (see takeover_heap); the heap is looked at again while waiting, as devices
    # are initialised after the standby was started
    heap = takeover_heap(cfg)
    memory.ensure_heap_headroom(heap)
    reserve = memory.Reserve(TAKEOVER_RESERVE)
    memory.set_thread_name(STANDBY_NAME)
    memory.set_command_line([STANDBY_NAME, *argv])
    if ready >= 0:
        try:
            os.write(ready, b"!")
        finally:
            os.close(ready)
    if fd >= 0:
        p = select.poll()
        p.register(fd, select.POLLIN)
        while not p.poll(int(STANDBY_CHECK * 1000)):
            need = takeover_heap(cfg)
            if need > heap:
                memory.ensure_heap_headroom(need)
                heap = need
        os.close(fd)
    reserve.release()            # free pages for what the takeover cannot make ahead
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return serve(cfg, storemod, argv, first=False)


def _read_retrying(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, 1)
        except InterruptedError:
            continue


def _wait_exit(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


RESET_WAIT = 5.0              # seconds a device just initialised may be busy (udev's probe)


def init_configured(manager, devices: dict) -> list[int]:
    """Initialise every configured device (number -> config.DeviceConfig) that is
    uninitialised (one taken over from a dead server is left as it is), in order. Returns the
    numbers initialised. If one fails, the ones initialised here are reset and OSError is
    raised with one line naming the device and why (and any reset that failed)."""
    done: list[int] = []
    for i, dev in devices.items():
        if manager.info(i)["state"] != "uninitialised":
            continue
        try:
            manager.set_disksize_kb(i, dev.disksize_kb)
            manager.set_backing_swap(i, dev.backing_swap)
            manager.set_memlimit_kb(i, dev.memlimit_kb)
            manager.set_compressor(i, dev.compressor)
            manager.init(i)
        except OSError as e:
            problems = _reset_all(manager, reversed(done))
            where = f" ({dev.where})" if dev.where else ""
            why = (e.strerror or str(e)) + (f": {e.filename}" if e.filename else "")
            raise OSError(e.errno, f"cannot initialise {dev.bdev}{where}: {why}"
                          + "".join(f"; {p}" for p in problems)) from e
        done.append(i)
    return done


def _reset_all(manager, ids) -> list[str]:
    """Reset each device, waiting up to RESET_WAIT s while it is busy; the failures' lines."""
    problems = []
    for i in ids:
        deadline = time.monotonic() + RESET_WAIT
        while True:
            try:
                manager.reset(i)
                break
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                problems.append(f"reset of /dev/ublkb{i} failed: {e.strerror or e}")
                break
    return problems


def serve(cfg: dict, storemod, argv: list[str], *, first: bool) -> int:
    """The server: take over or reserve the devices, serve the control socket, keep a standby,
    serve I/O until SIGTERM/SIGINT, tear down. Returns the exit status."""
    from . import shmstate
    memory.set_thread_name(SERVER_NAME)          # top, pkill; ps and pidof read the command line:
    memory.set_command_line([SERVER_NAME, *argv])   # "kill $(pidof ublkzswapd)" finds the server
    thread_failures = ThreadFailures()
    thread_failures.install()
    stop = threading.Event()
    handover = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: (handover.set(), stop.set()))
    release = threading.Event()     # SIGUSR2 (--stop, for systemctl restart): leave the devices
    signal.signal(signal.SIGUSR2, lambda *_: (release.set(), stop.set()))
    try:
        control = ublkctrl.Control()
    except OSError as e:
        return fail(f"cannot open {ublkctrl.CONTROL_PATH}: {e.strerror}")
    alloc = cfg["allocator"]
    alloc_ids = list(storemod.ALLOCATORS)

    def make_store(dev_id, disksize, *, adopt=False, open_backing=None, **kw):
        common = keeper_options()
        if adopt:
            state = shmstate.DeviceState.attach(dev_id)
            try:
                backing = open_backing(state.backing) if state.backing else None
                return storemod.Store(state.disksize, state=state, adopt=True,
                                      memlimit=state.memlimit, backing=backing,
                                      compressor=state.compressor,
                                      allocator=alloc_ids[state.allocator], **common)
            except BaseException:
                state.detach()
                raise
        backing = kw.get("backing")
        state = shmstate.DeviceState.create(
            dev_id, disksize=disksize, arena_pages=storemod.arena_pages(disksize, alloc),
            unit=storemod.ALLOCATORS[alloc].UNIT_PAGES, allocator=alloc_ids.index(alloc),
            compressor=kw["compressor"], memlimit=kw.get("memlimit", 0),
            backing=backing.name if backing is not None else "")
        try:
            return storemod.Store(disksize, state=state, allocator=alloc, **common, **kw)
        except BaseException:
            state.remove()
            state.detach()
            raise

    queues = queue_count(cfg)
    if queues < cfg.get("queues", 1):
        say(f"queues={cfg['queues']}: {queues} per device (one per online CPU at most)", NOTICE)
    manager = Manager(cfg, lambda i: UblkDevice(control, i, nr_queues=queues), make_store)
    server = None
    taken: list[int] = []
    try:
        for line in manager.reserve_all(adopt=True):
            say(line, NOTICE)
        taken = [i for i in manager.devices() if manager.info(i)["state"] != "uninitialised"]
        if first:
            init_configured(manager, cfg.get("devices", {}))
        server = ControlServer(manager, cfg["socket"], owner_uid=os.getuid())
        server.start()
        server.handle({"v": 1, "op": "list"}, 0)    # warm the control path too
    except OSError as e:
        if taken:
            # devices taken over from a dead server hold its pages (maybe in use as swap):
            # leave them held, as a crash would, for the next server
            fail(f"{e.strerror or e}; leaving {', '.join(f'/dev/ublkb{i}' for i in taken)} "
                 "held for the next ublkzswapd")
            os._exit(1)
        for line in manager.teardown():
            say(line, ERR)
        control.close()
        return fail(e.strerror or str(e))
    try:
        with open(pidfile(cfg), "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError:
        pass
    n = cfg["num_devices"]
    adopted = [i for i in manager.devices() if manager.info(i)["state"] != "uninitialised"]
    held = f"taking {manager.held_new_bytes() >> 10} KiB of new memory while their I/O was held"
    if first:
        if taken:      # a previous server's, left by a crash or for a restart
            say(f"{os.getpid()} took over {len(taken)} device(s) a previous server left, {held}",
                NOTICE)
        init = f" {', '.join(f'/dev/ublkb{i}' for i in adopted)} initialised" if adopted else ""
        status = f"{n} device{'s' if n > 1 else ''} reserved{init}"
        sdnotify.notify(ready=1, mainpid=os.getpid(), status=status)   # before the parent exits
        _notify(f"ready {status}")
    else:
        say(f"{os.getpid()} took over {len(adopted)} device(s), {held}", NOTICE)
        sdnotify.notify(mainpid=os.getpid(), ready=1,
                        status=f"took over {len(adopted)} initialised device(s)")
    standby_ = Standby(argv, keep=cfg["standby"])
    standby_.start()
    while True:
        while not stop.wait(1.0):
            failed = manager.failures() + thread_failures()
            if failed:
                # fail fast: a device whose queue has ended (or that could not be taken over)
                # serves nothing; leave the devices as a crash would, once the standby that
                # takes them over (and tries again) is prepared
                say(f"{os.getpid()} ending on purpose: {'; '.join(failed)}", ERR)
                if standby_.ready(STANDBY_READY_WAIT):
                    sdnotify.notify(mainpid=standby_.pid, status="handing over after a failure")
                server.close()
                os._exit(EXIT_FAILED)
        if handover.is_set():
            # a planned restart: a standby running the installed code, prepared, then leave
            # everything as a crash would, on purpose; it takes the devices over
            handover.clear()
            standby_.replace()
            if not standby_.ready(STANDBY_READY_WAIT):
                say("not restarting: no standby got ready", WARNING)
                stop.clear()
                continue
            say(f"{os.getpid()} handing its devices to standby {standby_.pid}", NOTICE)
            # systemd follows the standby from now on: this exit is not the service's
            sdnotify.notify(mainpid=standby_.pid, status=f"handing over to {standby_.pid}")
            server.close()
            os._exit(EXIT_HANDOVER)
        if release.is_set():
            # systemctl restart: the next ublkzswapd adopts the devices; it starts cold (no
            # standby can outlive the service's stop), so only with room to spare
            release.clear()
            need, avail = private_anon_bytes() + RELEASE_MARGIN, memory.GrowthGuard().available()
            if avail < need:
                say(f"not leaving the devices for a restart: {avail >> 20} MiB available, a "
                    f"new server needs about {need >> 20} MiB (systemctl reload hands over to "
                    "a prepared standby instead)", WARNING)
                stop.clear()
                continue
            say(f"{os.getpid()} leaving its devices, pages and all, to the next ublkzswapd",
                NOTICE)
            sdnotify.notify(status="leaving the devices to the next ublkzswapd (restart)")
            standby_.stop()               # it would take them over: not within the service
            server.close()
            os._exit(EXIT_HANDOVER)
        busy = manager.busy()
        if not busy:
            break
        # zram cannot be unloaded under an active swap either: stopping now would fail every
        # swap-in from these devices (and kill whatever owns those pages)
        refusal = f"not stopping: {', '.join(busy)} in use (swapoff first)"
        say(refusal, WARNING)
        sdnotify.notify(status=refusal)
        stop.clear()
    sdnotify.notify(stopping=1, status="stopping")
    standby_.stop()
    server.close()
    errors = manager.teardown()
    for line in errors:
        say(line, ERR)
    control.close()
    try:
        os.unlink(pidfile(cfg))
    except OSError:
        pass
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_params(argv)
        if not cfg["version"] and not cfg["restart"] and not cfg["stop"]:
            cfg = configure(cfg)
    except UsageError as e:
        if str(e) == "help":
            print(help_text())
            return 0
        print(f"ublkzswapd: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"ublkzswapd: {e}", file=sys.stderr)
        return 2
    if cfg["version"]:
        from . import __version__
        print(f"ublkzswapd from ublkzswap {__version__}")
        return 0
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
    if cfg["restart"]:
        return request_restart(cfg)
    if cfg["stop"]:
        return request_stop(cfg)
    _reexec_as_daemon(argv)
    if not cfg["foreground"] and os.environ.get(ENV_REEXEC) != "1":
        rc = _daemonize()
        if rc >= 0:
            return rc
    return run(cfg, argv)


if __name__ == "__main__":
    sys.exit(main())
