"""Boots the guest under qemu (TCG), runs one command in it and returns its exit status.

The host writes job.sh into a fresh results directory shared with the guest, starts qemu with
the serial console on a pipe, and reads the console: everything before the init's start marker is
boot noise (shown with --verbose, kept for failure reports), everything after it is the command's
output (and any kernel messages) and is copied to our stdout as it arrives. The status comes from
the ``rc`` file the init writes on the results share (the console marker is the fallback).

Exit statuses: the command's own; 124 if the guest did not power off within the timeout (after a
sysrq blocked-task dump); 125 if the guest ended without reporting a status (panic, init failure).
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import guest
from .image import Image

EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 125
TAIL_LINES = 200


@dataclass
class RunOptions:
    argv: list[str]
    timeout: float = 1800.0
    mem_mib: int = 2048
    smp: int = 2
    disk_mib: int = 0
    cwd: str = field(default_factory=os.getcwd)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    results: str | None = None  # host dir to keep as the results share (default: temporary)
    writable: bool = False  # tmpfs overlay on the shared root (writes vanish at power-off)
    systemd: bool = False   # PID 1 is systemd, the job a unit (implies writable)
    verbose: bool = False


def python_bindir() -> str:
    return os.path.dirname(os.path.realpath(sys.executable))


def kernel_cmdline(opts: RunOptions) -> str:
    words = guest.KERNEL_CMDLINE
    if opts.writable or opts.systemd:
        words += f" {guest.WRITABLE_ENV}=1"
    if opts.systemd:
        words += f" {guest.SYSTEMD_ENV}=1"
    return words


def qemu_argv(img: Image, opts: RunOptions, rundir: Path, monitor: Path, disk: Path | None) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
        "-m", str(opts.mem_mib), "-smp", str(opts.smp),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", kernel_cmdline(opts),
        "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
        "-monitor", f"unix:{monitor},server=on,wait=off",
        "-virtfs", f"local,path=/,mount_tag={guest.HOST_TAG},security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={rundir},mount_tag={guest.RESULTS_TAG},security_model=none,multidevs=remap",
    ]
    if disk is not None:
        argv += ["-drive", f"file={disk},if=virtio,format=raw"]
    return argv


def job_script(img: Image, opts: RunOptions, tty: bool) -> str:
    """job.sh for this run: the caller's environment plus the guest facts (the scratch disk
    variable exactly when ``opts.disk_mib`` attaches a disk, as :func:`run` does) and, when our
    output is no tty, TERM=dumb."""
    extra = guest.guest_facts(img.kernel_version, scratch_disk=bool(opts.disk_mib))
    if not tty:
        # the guest's console is a tty; do not let colour codes leak into a host log or pipe
        extra["TERM"] = "dumb"
    env = guest.guest_env(opts.env, python_bindir(), extra)
    return guest.job_script(env, opts.cwd, opts.argv)


def _maybe_marker(partial: str) -> bool:
    return (guest.MARK_START.startswith(partial) or guest.MARK_EXIT.startswith(partial)
            or partial.startswith(guest.MARK_EXIT))


class Console:
    """The serial console: keeps a tail and a full log, echoes the job's part live.

    Lines are split on \\n with the serial line's \\r before it dropped. A partial line of the
    job (pytest's progress dots, fio's \\r status) is echoed as soon as it arrives unless it could
    still become one of init's marker lines. :meth:`feed` is the whole logic; :meth:`start`
    feeds it from a pipe in a thread.
    """

    def __init__(self, out, verbose: bool = False) -> None:
        self.out, self.verbose = out, verbose
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.log: list[str] = []
        self.started_at: float | None = None
        self.marker_rc: int | None = None
        self.ended = False
        self._pending = ""  # current partial line
        self._shown = 0  # how much of it has been echoed
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.thread: threading.Thread | None = None

    def _live(self) -> bool:
        return (self.started_at is not None and not self.ended) or self.verbose

    def _echo(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _line(self, line: str) -> None:
        self.tail.append(line)
        self.log.append(line + "\n")
        if self._shown == 0 and line == guest.MARK_START:
            self.started_at = time.monotonic()
        elif self._shown == 0 and line.startswith(guest.MARK_EXIT):
            try:
                self.marker_rc = int(line[len(guest.MARK_EXIT):])
            except ValueError:
                pass
            self.ended = True
        elif self._live():
            self._echo(line[self._shown:] + "\n")
        self._shown = 0

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        *lines, rest = (self._pending + text).split("\n")
        for line in lines:
            self._line(line[:-1] if line.endswith("\r") else line)
        self._pending = rest
        if final:
            if rest:
                self._line(rest)
            self._pending = ""
            return
        # echo a partial line now, unless it may still turn into a marker (or the \r of a \r\n)
        show = rest[:-1] if rest.endswith("\r") else rest
        if (self._live() and len(show) > self._shown
                and not (self._shown == 0 and _maybe_marker(show))):
            self._echo(show[self._shown:])
            self._shown = len(show)

    def start(self, stream) -> "Console":
        def pump() -> None:
            while True:
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    break
                self.feed(chunk)
            self.feed(b"", final=True)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        if self.thread:
            self.thread.join(timeout)


def _die_with_parent() -> None:
    """In the qemu child: SIGKILL it if we die (even by SIGKILL), so a guest never outlives us."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def monitor_command(sock_path: Path, commands: list[str], pause: float = 0.5) -> None:
    """Send human-monitor commands over the unix socket (best effort)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        for cmd in commands:
            s.sendall(cmd.encode() + b"\n")
            time.sleep(pause)


def blocked_task_dump(sock_path: Path, wait: float = 8.0) -> None:
    """sysrq 7 (console loglevel: `quiet` would hide the dump), w (blocked tasks), l (CPUs)."""
    try:
        monitor_command(sock_path, ["sendkey alt-sysrq-7", "sendkey alt-sysrq-w", "sendkey alt-sysrq-l"])
    except OSError as e:
        print(f"tools.vm: could not reach the qemu monitor: {e}", file=sys.stderr)
        return
    time.sleep(wait)


#: Boots tried again when the kernel panics before the job starts (seen under TCG: an int3 of
#: live text patching tripped in early init, in sched_clock_cpu): nothing of the job has run.
BOOT_RETRIES = 1


def run(img: Image, opts: RunOptions, out=sys.stdout) -> int:
    """Boot, run ``opts.argv``, return its exit status (or EXIT_TIMEOUT / EXIT_NO_STATUS). A
    kernel that panics before the job starts is booted again, BOOT_RETRIES times at most."""
    for attempt in range(BOOT_RETRIES + 1):
        rc, died_booting = _run_once(img, opts, out)
        if not died_booting or attempt == BOOT_RETRIES:
            return rc
        print("tools.vm: the kernel panicked before the job started; booting again",
              file=sys.stderr, flush=True)
    return rc


def _run_once(img: Image, opts: RunOptions, out) -> tuple[int, bool]:
    """One boot of :func:`run`: (exit status, whether the kernel panicked before the job
    started)."""
    keep = opts.results is not None
    rundir = Path(opts.results) if keep else Path(tempfile.mkdtemp(prefix="ublkzswap-vm-"))
    rundir.mkdir(parents=True, exist_ok=True)
    for stale in ("rc", "job.sh"):
        (rundir / stale).unlink(missing_ok=True)
    # qemu's unix socket path must be short; keep the socket and disk out of a long results path.
    private = Path(tempfile.mkdtemp(prefix="ublkzswap-vm-"))
    monitor = private / "monitor.sock"
    disk = None
    if opts.disk_mib:
        disk = private / "disk.raw"
        with open(disk, "wb") as f:
            f.truncate(opts.disk_mib << 20)
    (rundir / "job.sh").write_text(job_script(img, opts, out.isatty()))

    t0 = time.monotonic()
    proc = subprocess.Popen(qemu_argv(img, opts, rundir, monitor, disk), preexec_fn=_die_with_parent,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if threading.current_thread() is threading.main_thread() else None
    console = Console(out, opts.verbose).start(proc.stdout)
    timed_out = False
    try:
        try:
            proc.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"\ntools.vm: guest still running after {opts.timeout:g}s; asking for a blocked-task dump",
                  file=sys.stderr, flush=True)
            blocked_task_dump(monitor)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        console.join(10)
        t_end = time.monotonic()
        try:
            (rundir / "console.log").write_text("".join(console.log))
        except OSError:
            pass
        rc_text = None
        try:
            rc_text = (rundir / "rc").read_text().strip()
        except OSError:
            pass
        shutil.rmtree(private, ignore_errors=True)
        if not keep:
            shutil.rmtree(rundir, ignore_errors=True)

    boot = (console.started_at - t0) if console.started_at else None
    timing = f"boot {boot:.1f}s, job {t_end - console.started_at:.1f}s" if boot is not None else f"{t_end - t0:.1f}s, job never started"
    if timed_out:
        _report_tail(console, f"timed out after {opts.timeout:g}s ({timing})")
        return EXIT_TIMEOUT, False
    rc = int(rc_text) if rc_text and rc_text.lstrip("-").isdigit() else console.marker_rc
    if rc is None:
        panic = any("Kernel panic" in line for line in console.tail)
        if panic:
            timing = "kernel panic, " + timing
        _report_tail(console, f"guest ended without a status, qemu exit {proc.returncode} ({timing})")
        return EXIT_NO_STATUS, panic and boot is None
    if opts.verbose or rc:
        print(f"tools.vm: exit {rc} ({timing})", file=sys.stderr, flush=True)
    return rc, False


KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]")
JOB_TAIL_LINES = 40


def job_tail(lines, n: int = JOB_TAIL_LINES) -> list[str]:
    """The last ``n`` console lines that are not kernel messages: what the job itself printed
    last (a kernel stack dump would otherwise push it out of the console tail)."""
    out = [line.rstrip("\n") for line in lines if not KERNEL_LINE.match(line)]
    return out[-n:]


def _report_tail(console: Console, why: str) -> None:
    print(f"\ntools.vm: {why}; last {len(console.tail)} console lines:", file=sys.stderr)
    print("\n".join(console.tail), file=sys.stderr)
    mine = job_tail(console.log)
    print(f"tools.vm: the job's own last {len(mine)} lines (kernel messages left out):", file=sys.stderr)
    print("\n".join(mine), file=sys.stderr)
    print(f"tools.vm: {why}", file=sys.stderr, flush=True)
