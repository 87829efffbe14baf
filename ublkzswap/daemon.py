"""``ublkzswapd``: the daemon that owns the ublk devices.

Owns: parsing compcache's module parameters, the process's memory discipline, reserving the
devices, each device's lifecycle, and clean teardown::

    ublkzswapd num_devices=N [disksize_kb=K] [memlimit_kb=M] [backing_swap=PATH] ...
      |  validate parameters; re-exec with PYTHONMALLOC=malloc; fork to background (unless
      |  --foreground; the parent waits for "ready" or an error and exits 0 / 1)
      v
    lock memory: mallopt (no mmap chunks, no trim, one arena), pre-grow the heap, small thread
    stacks, mlockall(CURRENT|FUTURE|ONFAULT), oom_score_adj -1000       -- refuse to start if not
      v
    ADD_DEV ids 0..N-1 ("reserved")  --- control socket up ---  device 0 init if disksize_kb=
      v                                                           or backing_swap= was given
    per device:   UNINITIALISED --init--> INITIALISED --swapon--> ACTIVE --swapoff--> INITIALISED
                  (ADD_DEV done;         (target built, SET_PARAMS,                    --reset-->
                   /dev/ublkcN only)      queue thread serving, START_DEV:             UNINITIALISED
                                          /dev/ublkbN exists)                          (STOP_DEV, DEL_DEV,
      v                                                                                 ADD_DEV again)
    SIGTERM / SIGINT: STOP_DEV + DEL_DEV every device created, exit 0 -- refused (logged, the
    daemon keeps serving) while a device is in use, e.g. swapon'd

:class:`Manager` is what the control socket (:mod:`ublkzswap.control`) drives; its methods
raise ``OSError`` with compcache's errno (EBUSY, ENOTTY, ...).

Still naive: one queue per device; the queue thread does compression itself.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import struct
import sys
import threading
from collections import namedtuple

from . import ctrl as ublkctrl
from . import memory
from . import stats as statsmod
from .queue import Queue, describe
from .target import NullTarget, RamTarget, features

PAGE_SIZE = 4096
MAX_NUM_DEVICES = 32
QUEUE_DEPTH = 64
IO_BUF_BYTES = 64 * 1024     # per tag, populated and locked: 4 MiB for depth 64
DEFAULT_DISKSIZE_PERC_RAM = 25
DEFAULT_MEMLIMIT_PERC_RAM = 15

Param = namedtuple("Param", "name metavar default help")

#: compcache's module parameters plus ours; drives parsing, --help and ublkzswapd(8).
PARAMETERS = (
    Param("num_devices", "N", "1", "number of devices /dev/ublkb0../dev/ublkb(N-1) to reserve (1..32)"),
    Param("disksize_kb", "KB", "25% of RAM",
          "if given, initialise device 0 at start with this size (page-aligned down)"),
    Param("memlimit_kb", "KB", "15% of RAM (with backing_swap)",
          "limit on memory for compressed pages of device 0; with a backing swap, writes beyond it "
          "are forwarded there, without one they fail and the kernel keeps the page"),
    Param("backing_swap", "PATH", "none",
          "if given (and disksize_kb is not), initialise device 0 with this backing swap"),
    Param("target", "zswap|ram|null", "zswap",
          "what stores the data: zswap (compressed, the default), ram (plain, for testing) or "
          "null (no data, for measuring the I/O round trip)"),
    Param("compressor", "NAME", "lzo", "compression algorithm of the zswap target: lzo or lz4"),
    Param("socket", "PATH", "/run/ublkzswap/control.sock",
          "control socket for rzscontrol (environment: UBLKZSWAP_SOCKET)"),
    Param("foreground", None, "off", "stay in the foreground (default: return once the devices are ready)"),
)
_PARAM_NAMES = {p.name for p in PARAMETERS}
_NUMERIC = {"num_devices", "disksize_kb", "memlimit_kb"}

USAGE = ("usage: ublkzswapd [--foreground] [num_devices=N] [disksize_kb=KB] [memlimit_kb=KB] "
         "[backing_swap=PATH] [target=zswap|ram|null] [compressor=lzo|lz4] [socket=PATH]")


class UsageError(Exception):
    """Bad daemon parameters: printed as one line, exit status 2."""


def parse_params(argv: list[str]) -> dict:
    """``key=value`` words (``--key=value`` too) -> dict of typed values. Raises UsageError."""
    out: dict = {"num_devices": 1, "target": "zswap", "compressor": "lzo", "foreground": False,
                 "socket": os.environ.get("UBLKZSWAP_SOCKET", "/run/ublkzswap/control.sock")}
    for word in argv:
        if word in ("-h", "--help"):
            raise UsageError("help")
        w = word[2:] if word.startswith("--") else word
        if w == "foreground":
            out["foreground"] = True
            continue
        key, sep, value = w.partition("=")
        if not sep:
            raise UsageError(f"'{word}' is not key=value")
        if key not in _PARAM_NAMES or key == "foreground":
            raise UsageError(f"unknown parameter '{key}'")
        if key in _NUMERIC:
            if not value.isdigit() or len(value) > 19:
                raise UsageError(f"{key}: '{value}' is not a decimal number")
            out[key] = int(value)
        else:
            if not value:
                raise UsageError(f"{key}: empty value")
            out[key] = value
    if not 1 <= out["num_devices"] <= MAX_NUM_DEVICES:
        raise UsageError(f"num_devices={out['num_devices']}: must be 1..{MAX_NUM_DEVICES}")
    if out["target"] not in ("zswap", "ram", "null"):
        raise UsageError(f"target={out['target']}: must be zswap, ram or null")
    if out["compressor"] not in ("lzo", "lz4"):
        raise UsageError(f"compressor={out['compressor']}: must be lzo or lz4")
    if "disksize_kb" in out and out["disksize_kb"] * 1024 < PAGE_SIZE:
        raise UsageError(f"disksize_kb={out['disksize_kb']}: smaller than one page")
    if "memlimit_kb" in out and "backing_swap" not in out and "disksize_kb" not in out:
        raise UsageError("memlimit_kb parameter is valid only when backing_swap or disksize_kb "
                         "is also specified")
    return out


def total_ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE


def swap_header(disksize: int) -> bytes:
    """Page 0 of a fresh swap area of ``disksize`` bytes, as compcache's setup_swap_header
    builds it: version 1, last_page, no bad pages, magic SWAPSPACE2 in the last 10 bytes."""
    page = bytearray(PAGE_SIZE)
    struct.pack_into("<III", page, 1024, 1, disksize // PAGE_SIZE - 1, 0)
    page[PAGE_SIZE - 10:] = b"SWAPSPACE2"
    return bytes(page)


# ----------------------------------------------------------------------------- devices
class Device:
    """One reserved ublk id and, once initialised, its target and queue thread."""

    def __init__(self, dev_id: int, control: ublkctrl.Control, cfg: dict):
        self.dev_id = dev_id
        self.control = control
        self.cfg = cfg
        self.disksize_kb = 0
        self.memlimit_kb = 0
        self.backing_swap = ""
        self.target = None
        self.backing = None
        self.queue: Queue | None = None
        self.thread: threading.Thread | None = None
        self.added = False

    # -- reservation
    def reserve(self) -> None:
        try:
            self.control.add_dev(self.dev_id, 1, QUEUE_DEPTH, IO_BUF_BYTES)
        except ublkctrl.UblkCtrlError as e:
            if e.errno == errno.EEXIST:
                raise OSError(errno.EEXIST, f"ublk device id {self.dev_id} is taken "
                              f"(another ublk server owns /dev/ublkc{self.dev_id})") from None
            raise
        self.added = True

    @property
    def initialised(self) -> bool:
        return self.target is not None

    @property
    def bdev(self) -> str:
        return f"/dev/ublkb{self.dev_id}"

    def in_use(self) -> bool:
        """True if the block device is held: swapon, a mount, or an exclusive opener."""
        if not self.initialised:
            return False
        try:
            fd = os.open(self.bdev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            return e.errno == errno.EBUSY
        os.close(fd)
        return False

    @property
    def state(self) -> str:
        if not self.initialised:
            return "uninitialised"
        return "active" if self.in_use() else "initialised"

    def _build_target(self, disksize: int, memlimit: int, backing):
        kind = self.cfg["target"]
        if kind == "ram":
            return RamTarget(disksize)
        if kind == "null":
            return NullTarget(disksize)
        from .store import Store
        store = Store(disksize, memlimit=memlimit, compressor=self.cfg["compressor"],
                      backing=backing, keeper_init=memory.keeper_thread_init,
                      may_grow=memory.GrowthGuard())
        store.backing_async = True        # the queue runs backing I/O on its io_uring
        return store

    def _sizes(self, backing) -> tuple[int, int]:
        """(disksize, memlimit) in bytes by compcache's rules (reference 1.3)."""
        ram = total_ram_bytes()
        if backing is not None:
            disksize = backing.size
            memlimit = self.memlimit_kb * 1024
            if memlimit == 0 or memlimit > disksize:
                memlimit = min(DEFAULT_MEMLIMIT_PERC_RAM * (ram // 100), disksize)
            return disksize, memlimit & ~(PAGE_SIZE - 1)
        disksize = self.disksize_kb * 1024
        if disksize == 0:
            disksize = DEFAULT_DISKSIZE_PERC_RAM * (ram // 100)
        return disksize & ~(PAGE_SIZE - 1), self.memlimit_kb * 1024

    # -- lifecycle
    def init(self) -> None:
        if self.initialised:
            raise OSError(errno.EBUSY, "Device already initialized")
        backing = None
        if self.backing_swap:
            if self.cfg["target"] != "zswap":
                raise OSError(errno.EINVAL, "a backing swap needs target=zswap")
            from .backing import Backing
            backing = Backing(self.backing_swap)
        disksize, memlimit = self._sizes(backing)
        if disksize < PAGE_SIZE * 2:
            if backing is not None:
                backing.close()
            raise OSError(errno.EINVAL, "disksize too small")
        try:
            target = self._build_target(disksize, memlimit, backing)
        except BaseException:
            if backing is not None:
                backing.close()
            raise
        self.backing = backing
        try:
            if self.cfg["target"] != "null":
                header = backing.header() if backing is not None else swap_header(disksize)
                if backing is not None:
                    target.backing_async = False      # no queue yet: forward synchronously
                target.write(0, memoryview(header))
                if backing is not None:
                    target.backing_async = True
            params = ublkctrl.basic_params(disksize >> 9, IO_BUF_BYTES,
                                           discard="discard" in features(target))
            self.control.set_params(self.dev_id, params)
            self.queue = Queue(self.dev_id, target, depth=QUEUE_DEPTH, buf_bytes=IO_BUF_BYTES,
                               backing_fd=backing.fd if backing is not None else -1)
            self.thread = threading.Thread(target=self.queue.serve, name=f"ublkq{self.dev_id}",
                                           daemon=True)
            self.thread.start()
            self.queue.armed.wait()
            if self.queue.error is not None:
                raise self.queue.error
            self.control.start_dev(self.dev_id)
        except BaseException:
            self._stop_and_delete()
            self._drop_target(target)
            if not self.added:
                self.reserve()
            raise
        self.target = target
        self.disksize_kb = disksize // 1024
        self.memlimit_kb = memlimit // 1024
        _set_scheduler_none(self.dev_id)

    def _stop_and_delete(self) -> None:
        """STOP_DEV (if started), join the queue thread, DEL_DEV."""
        if self.thread is not None:
            try:
                self.control.stop_dev(self.dev_id)
            except OSError:
                pass
            self.thread.join(30)
            self.thread = None
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        if self.added:
            self.control.del_dev(self.dev_id)
            self.added = False

    def reset(self) -> None:
        if not self.initialised:
            return
        if self.in_use():
            raise OSError(errno.EBUSY, f"{self.bdev} is in use (swapoff first)")
        self._stop_and_delete()
        self._drop_target(self.target)
        self.disksize_kb = self.memlimit_kb = 0
        self.backing_swap = ""
        self.reserve()

    def teardown(self) -> None:
        self._stop_and_delete()
        if self.target is not None:
            self._drop_target(self.target)

    def _drop_target(self, target) -> None:
        _close(target)
        self.target = None
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    # -- numbers
    def stats(self) -> dict:
        if not self.initialised:
            raise OSError(errno.ENOTTY, "device not initialised")
        own = getattr(self.target, "stats", None)
        if own is not None:
            st = dict(own())
        else:
            c = self.queue.counters
            st = statsmod.empty()      # a plain target counts only what the queue sees
            st.update(num_reads=c.reads, num_writes=c.writes, disksize=self.target.size,
                      mem_limit=self.memlimit_kb * 1024, backing_swap=self.backing_swap)
        st.setdefault("disksize", self.target.size)
        st.setdefault("mem_limit", self.memlimit_kb * 1024)
        st.setdefault("backing_swap", self.backing_swap)
        return st

    def info(self) -> dict:
        d = {"dev": self.dev_id, "state": self.state,
             "disksize": self.target.size if self.initialised else self.disksize_kb * 1024,
             "mem_limit": self.memlimit_kb * 1024, "backing_swap": self.backing_swap,
             "algorithm": self.cfg["compressor"] if self.cfg["target"] == "zswap" else self.cfg["target"]}
        if self.initialised:
            st = self.stats()
            for k in ("orig_data_size", "compr_data_size", "mem_used_total"):
                d[k] = st.get(k, 0)
        return d


def _close(target) -> None:
    close = getattr(target, "close", None)
    if close is not None:
        close()


def _set_scheduler_none(dev_id: int) -> None:
    try:
        with open(f"/sys/block/ublkb{dev_id}/queue/scheduler", "w") as f:
            f.write("none")
    except OSError:
        pass


class Manager:
    """The devices of this daemon, as the control socket sees them (contract in
    docs/CONTRACTS.md). Methods serialise on one lock; refusals are OSError(errno)."""

    def __init__(self, control: ublkctrl.Control, cfg: dict):
        self.control = control
        self.cfg = cfg
        self.devs: dict[int, Device] = {}
        self._lock = threading.RLock()

    def reserve_all(self) -> None:
        for i in range(self.cfg["num_devices"]):
            dev = Device(i, self.control, self.cfg)
            dev.reserve()
            self.devs[i] = dev

    def _dev(self, dev_id: int) -> Device:
        try:
            return self.devs[int(dev_id)]
        except (KeyError, ValueError, TypeError):
            raise OSError(errno.ENODEV, f"no device {dev_id}") from None

    def devices(self) -> list[int]:
        return sorted(self.devs)

    def set_backing_swap(self, dev_id: int, path: str) -> None:
        with self._lock:
            d = self._dev(dev_id)
            if d.initialised:
                raise OSError(errno.EBUSY, "device already initialised")
            d.backing_swap = str(path)

    def set_memlimit_kb(self, dev_id: int, kb: int) -> None:
        with self._lock:
            d = self._dev(dev_id)
            d.memlimit_kb = int(kb)
            if d.initialised:
                setter = getattr(d.target, "set_memlimit", None)
                if setter is None:
                    raise OSError(errno.EOPNOTSUPP, "this target has no memory limit")
                setter(int(kb) * 1024)

    def set_disksize_kb(self, dev_id: int, kb: int) -> None:
        with self._lock:
            d = self._dev(dev_id)
            if d.initialised:
                raise OSError(errno.EBUSY, "device already initialised")
            d.disksize_kb = int(kb)

    def init(self, dev_id: int) -> None:
        with self._lock:
            self._dev(dev_id).init()

    def reset(self, dev_id: int) -> None:
        with self._lock:
            self._dev(dev_id).reset()

    def stats(self, dev_id: int) -> dict:
        with self._lock:
            return self._dev(dev_id).stats()

    def info(self, dev_id: int) -> dict:
        with self._lock:
            return self._dev(dev_id).info()

    def teardown(self) -> None:
        with self._lock:
            for dev in self.devs.values():
                try:
                    dev.teardown()
                except OSError as e:
                    print(f"ublkzswapd: teardown of device {dev.dev_id}: {e}", file=sys.stderr)
            self.devs.clear()


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


def run(cfg: dict) -> int:
    """Bring everything up, serve until SIGTERM/SIGINT, tear down. Returns exit status."""
    ok, why = ublkctrl.ublk_available()
    if not ok:
        return fail(why)
    if cfg["target"] == "zswap":
        try:
            importlib.import_module(f"{__package__}.store")   # before locking: no imports on the I/O path
        except ImportError as e:
            return fail(f"target=zswap unavailable: {e}")
    try:
        memory.lock_process()
    except OSError as e:
        return fail(f"refusing to serve swap: {e.strerror}")
    if cfg["target"] == "zswap":
        from .store import warm_up
        try:
            warm_up(cfg["compressor"])    # what the I/O path runs is now resident and locked
        except Exception as e:
            return fail(f"store self-test failed: {describe(e)}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        control = ublkctrl.Control()
    except OSError as e:
        return fail(f"cannot open {ublkctrl.CONTROL_PATH}: {e.strerror}")
    manager = Manager(control, cfg)
    server = None
    try:
        manager.reserve_all()
        dev0 = manager.devs[0]
        if "disksize_kb" in cfg:
            dev0.disksize_kb = cfg["disksize_kb"]
            dev0.memlimit_kb = cfg.get("memlimit_kb", 0)
            dev0.init()
        elif "backing_swap" in cfg:
            dev0.backing_swap = cfg["backing_swap"]
            dev0.memlimit_kb = cfg.get("memlimit_kb", 0)
            dev0.init()
        try:
            from .control import ControlServer
            server = ControlServer(manager, cfg["socket"], owner_uid=os.getuid())
            server.start()
        except ImportError:
            server = None
    except OSError as e:
        manager.teardown()
        control.close()
        return fail(e.strerror or str(e))
    n = cfg["num_devices"]
    init = " /dev/ublkb0 initialised" if manager.devs[0].initialised else ""
    _notify(f"ready {n} device{'s' if n > 1 else ''} reserved{init}")
    while True:
        while not stop.wait(1.0):
            pass
        busy = [d.bdev for d in manager.devs.values() if d.in_use()]
        if not busy:
            break
        # zram cannot be unloaded under an active swap either: stopping now would fail every
        # swap-in from these devices (and kill whatever owns those pages)
        print(f"ublkzswapd: not stopping: {', '.join(busy)} in use (swapoff first); "
              "SIGKILL would lose the pages stored there", file=sys.stderr, flush=True)
        stop.clear()
    if server is not None:
        server.close()
    manager.teardown()
    control.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_params(argv)
    except UsageError as e:
        if str(e) == "help":
            print(USAGE)
            for p in PARAMETERS:
                print(f"  {p.name + ('=' + p.metavar if p.metavar else ''):28s} {p.help} "
                      f"(default: {p.default})")
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
