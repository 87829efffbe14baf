"""A daemon that dies loses no page: the server (run with ``standby``) is SIGKILLed under fio
and under swap, and its standby takes the devices over from the shared state the dead one left;
the devices of a killed server with no standby (the default), or whose standby was killed too,
are held and adopted by a ublkzswapd started by hand; a planned restart hands them to the
installed code under load (its standby started for it)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tools.swapload import mem_total_mib
from ublkzswap import ublkdev

from .daemonctl import (PY, current_server, leftovers, running, standby_of, start, stop,
                        swapoff_all, wait_gone)
from .test_swap import MIX, SWAPLOAD, daemon_swap_kb, rzs, scratch_disk, stats  # noqa: F401 (fixture)
from .workload import kernel_log_oom_lines, workload_verdict

MiB = 1 << 20


@pytest.fixture(autouse=True)
def clean():
    assert leftovers() == []
    yield
    swapoff_all("/dev/ublkb")
    assert wait_gone() == []


def kill_server(sock) -> int:
    """SIGKILL the daemon's server once its standby is prepared; returns the killed pid."""
    pid = current_server(sock)
    standby_of(pid)
    os.kill(pid, signal.SIGKILL)
    return pid


HELD_MOST_KIB = 1024    # new memory a takeover may take while the kernel holds the I/O


def held_new_kib(pid: int, timeout: float = 60) -> int:
    """What server ``pid`` logged (kernel log) as the new memory its takeover took while the
    devices' I/O was held."""
    pattern = re.compile(rf"\b{pid} took over \d+ device\(s\), taking (\d+) KiB")
    deadline = time.monotonic() + timeout
    while True:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=60).stdout
        m = pattern.search(log)
        if m:
            return int(m.group(1))
        assert time.monotonic() < deadline, f"server {pid} logged no takeover"
        time.sleep(1)


def fio_verify(size: str, *args: str) -> subprocess.Popen:
    """fio writing 3:1 data at random over the first ``size`` of /dev/ublkb0 with crc32c, then
    reading all of it back (``args``: queue depth, block sizes)."""
    return subprocess.Popen(
        ["fio", "--name=v", "--filename=/dev/ublkb0", "--ioengine=io_uring", "--direct=1",
         "--rw=randwrite", f"--size={size}", *args, "--verify=crc32c", "--do_verify=1",
         "--verify_fatal=1", "--buffer_compress_percentage=67", "--refill_buffers",
         "--output-format=normal"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Relay:
    """A workload run back to back, so that it outlasts whatever the test does meanwhile on a
    machine of any speed: ``start()`` makes one run (a Popen with stdout and stderr piped);
    :meth:`running` says whether the current run goes on, and if it has ended keeps its result
    and starts the next; :meth:`finish` waits for the current one. ``runs``: (returncode,
    stdout, stderr) of every run that ended."""

    def __init__(self, start):
        self.start, self.runs = start, []
        self.proc = start()

    def running(self) -> bool:
        if self.proc.poll() is None:
            return True
        self.runs.append((self.proc.returncode, *self.proc.communicate()))
        self.proc = self.start()
        return False

    def finish(self, timeout: float) -> list[tuple]:
        out, err = self.proc.communicate(timeout=timeout)
        self.runs.append((self.proc.returncode, out, err))
        return self.runs


def kills_during(load: Relay, sock, n: int, every: float) -> tuple[list[int], list[int]]:
    """Kill the server ``n`` times, ``every`` seconds apart, each time while a run of ``load``
    is under way (one that ended meanwhile is followed by the next before the kill); returns
    the killed pids and pages_stored as each new server answered (stats work after a
    takeover)."""
    kills, stored = [], []
    while len(kills) < n:
        time.sleep(every)
        if not load.running():
            continue
        kills.append(kill_server(sock))
        current_server(sock, old=kills[-1])
        stored.append(stats(sock)["pages_stored"])
    return kills, stored


def assert_fio_verified(runs: list[tuple]) -> None:
    """Every fio run of a relay exited 0 with nothing wrong read back."""
    for rc, out, err in runs:
        assert rc == 0, out[-3000:] + err[-3000:]
        assert "verify:" not in err and "bad magic" not in err and "err= 0" in out, err[-3000:]


class Prober(threading.Thread):
    """Reads block 0 of the device (O_DIRECT) every 50 ms and records the longest time one
    read took: across a takeover, that is kill -> first completed request."""

    def __init__(self, dev: str):
        super().__init__(daemon=True)
        self.dev, self.longest, self.errors = dev, 0.0, []
        self.halt = threading.Event()

    def run(self):
        import mmap
        buf = mmap.mmap(-1, 4096)
        fd = os.open(self.dev, os.O_RDONLY | os.O_DIRECT)
        try:
            while not self.halt.is_set():
                t0 = time.monotonic()
                try:
                    os.preadv(fd, [buf], 0)
                except OSError as e:
                    self.errors.append(e)
                self.longest = max(self.longest, time.monotonic() - t0)
                time.sleep(0.05)
        finally:
            os.close(fd)


@pytest.mark.deadline(1200)
def test_fio_verifies_across_three_kills_of_the_server(tmp_path):
    sock = tmp_path / "ctl.sock"
    with running("num_devices=1", "standby", f"socket={sock}") as (pid, _):
        rzs(sock, "/dev/ublkb0", "--disksize_kb=262144", "--init")
        fio = Relay(lambda: fio_verify("256M", "--iodepth=16", "--bsrange=4k-64k"))
        prober = Prober("/dev/ublkb0")
        prober.start()
        try:
            kills, stored = kills_during(fio, sock, 3, every=8)
            runs = fio.finish(timeout=900)
        finally:
            prober.halt.set()
            prober.join(30)
        assert len(kills) == 3
        assert_fio_verified(runs)
        assert all(n > 0 for n in stored), stored            # not reset by a takeover
        assert not prober.errors, prober.errors[:3]
        # the short request timeout that bounds a takeover is set again by each new server
        with open("/sys/block/ublkb0/queue/io_timeout") as f:
            assert int(f.read()) == ublkdev.IO_TIMEOUT_MS
        print(f"\ntakeover: longest read across three kills {prober.longest:.2f} s")
        rzs(sock, "/dev/ublkb0", "--reset")


def swapped(load: Relay, sock, key: str, since: int, pages: int, timeout: float = 600) -> int:
    """Wait, keeping ``load`` going, until the device's ``key`` count (num_writes, num_reads) has
    grown by ``pages`` since ``since`` while a run is under way; returns the count. Waiting on
    the device's own traffic rather than a fixed delay makes a kill land mid-swap on a machine
    of any speed, and no later than it must."""
    deadline = time.monotonic() + timeout
    while True:
        n = stats(sock)[key]
        if n - since >= pages and load.running():
            return n
        assert time.monotonic() < deadline, f"{key} grew {n - since} of {pages} in {timeout:g} s"
        time.sleep(1)


@pytest.mark.deadline(1500)
def test_swap_survives_two_kills_of_the_server(tmp_path):
    sock = tmp_path / "ctl.sock"
    mib = int(mem_total_mib() * 1.25)
    with running("num_devices=1", "standby", f"socket={sock}") as (pid, _):
        rzs(sock, "/dev/ublkb0", f"--disksize_kb={3 * mib * 1024}", "--init")
        subprocess.run(["swapon", "--discard", "/dev/ublkb0"], check=True, timeout=300)
        # one pass: the workload fills its memory (swapping out), then reads every page back
        load = Relay(lambda: subprocess.Popen(
            [PY, SWAPLOAD, "--mib", str(mib), "--passes", "1", "--quiet", "--mix", MIX],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        # the first kill once 64 MiB have been swapped out to the first server; the second once
        # the next server has served 16 MiB of swap-ins (most of them pages the first stored)
        stored, held = [], []
        for key, pages in (("num_writes", 16384), ("num_reads", 4096)):
            swapped(load, sock, key, stats(sock)[key], pages)
            old = kill_server(sock)
            t0 = time.monotonic()
            new = current_server(sock, old=old)
            stored.append(stats(sock)["pages_stored"])
            held.append(held_new_kib(new))
            print(f"\ntakeover under swap: kill -> stats answered by the new server "
                  f"{time.monotonic() - t0:.1f} s; {held[-1]} KiB of new memory while held")
        for rc, out, _ in load.finish(timeout=1200):
            why = workload_verdict(rc, out, killed_by_test=False)
            assert why is None, f"{why}\n{out[-3000:]}\n{kernel_log_oom_lines()}"
        assert all(n > 0 for n in stored), stored
        # the takeover under swap pressure: the I/O is held, and a page found for the new
        # server might have to be swapped out to this device first (the machine froze so)
        assert max(held) <= HELD_MOST_KIB, held
        assert stats(sock)["failed_reads"] == 0 and daemon_swap_kb(current_server(sock)) == 0
        subprocess.run(["swapoff", "/dev/ublkb0"], check=True, timeout=900)
        rzs(sock, "/dev/ublkb0", "--reset")


@pytest.mark.deadline(600)
@pytest.mark.parametrize("standby", [False, True], ids=["no-standby", "standby-killed-too"])
def test_devices_of_a_killed_daemon_go_to_the_next_ublkzswapd(tmp_path, standby):
    # Without a standby (the default) a killed server leaves its devices held; with one, the
    # standby is killed first. Either way nothing serves them until ublkzswapd is started.
    sock = tmp_path / "ctl.sock"
    data = os.urandom(1 * MiB) + b"ublkzswap " * (MiB // 10)
    words = ["num_devices=2", f"socket={sock}"] + (["standby"] if standby else [])
    pid, _ = start(*words)
    try:
        rzs(sock, "/dev/ublkb0", "--disksize_kb=65536", "--init")
        with open("/dev/ublkb0", "r+b", buffering=0) as f:
            f.seek(8 * MiB)
            f.write(data)
            os.fsync(f.fileno())
        victims = [standby_of(pid)] if standby else []
        victims.append(pid)                              # the standby first, then the server
        for p in victims:
            os.kill(p, signal.SIGKILL)
        for p in victims:
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{p}") and time.monotonic() < deadline:
                time.sleep(0.1)
        assert os.path.exists("/dev/ublkb0") and os.path.exists("/dev/ublkc1")   # held, not lost
        assert not any(name == "ublkzswapd-stby" for name in _comms()), "a standby was left"
        pid, line = start("num_devices=2", f"socket={sock}")
        assert "/dev/ublkb0 initialised" in line, line
        with open("/dev/ublkb0", "rb", buffering=0) as f:
            f.seek(8 * MiB)
            assert f.read(len(data)) == data
        st = json.loads(rzs(sock, "/dev/ublkb0", "--json"))
        assert st["pages_stored"] > 0
        rzs(sock, "/dev/ublkb0", "--reset")
    finally:
        stop(pid)


def _comms() -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out.append(open(f"/proc/{d}/comm").read().strip())
            except OSError:
                pass
    return out


@pytest.mark.deadline(900)
def test_a_planned_restart_under_load_loses_nothing(tmp_path):
    sock = tmp_path / "ctl.sock"
    # no standby kept (the default): the restart starts one, prepared, then hands over
    with running("num_devices=1", f"socket={sock}") as (pid, _):
        rzs(sock, "/dev/ublkb0", "--disksize_kb=131072", "--init")
        before = current_server(sock)
        assert "ublkzswapd-stby" not in _comms()
        fio = Relay(lambda: fio_verify("128M", "--iodepth=8", "--bs=4k"))
        time.sleep(10)
        restart = subprocess.Popen([PY, "-m", "ublkzswap.daemon", "--restart", f"socket={sock}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while restart.poll() is None:     # fio runs throughout the hand-over
            fio.running()
            time.sleep(0.2)
        out, err = restart.communicate()
        assert restart.returncode == 0 and "restarted" in out, out + err
        assert_fio_verified(fio.finish(timeout=900))
        assert current_server(sock) != before
        rzs(sock, "/dev/ublkb0", "--reset")


@pytest.mark.deadline(900)
def test_kills_while_compacting_and_writing_to_the_backing_swap_lose_nothing(tmp_path, scratch_disk):
    # A backing swap on the scratch disk and a small memlimit: most of fio's writes go to the
    # disk (bd_writes) while rzscontrol --compact runs in a loop; the server is killed twice
    # mid-way. A kill lands inside a compaction round or a forwarded write at some instruction:
    # the new server's recovery check must find every slot pointing at valid data.
    subprocess.run(["mkswap", scratch_disk], check=True, capture_output=True, timeout=300)
    sock = tmp_path / "ctl.sock"
    with running("num_devices=1", "standby", f"socket={sock}") as (pid, _):
        rzs(sock, "/dev/ublkb0", f"--backing_swap={scratch_disk}", "--memlimit_kb=16384", "--init")
        fio = Relay(lambda: fio_verify("192M", "--iodepth=16", "--bsrange=4k-64k"))
        halt = threading.Event()
        compactions = []

        def compact_loop():
            while not halt.is_set():
                r = subprocess.run([PY, "-m", "ublkzswap.cli", "/dev/ublkb0", "--compact",
                                    "--socket", str(sock)], capture_output=True, text=True)
                compactions.append(r.returncode)
                time.sleep(0.2)

        compactor = threading.Thread(target=compact_loop, daemon=True)
        compactor.start()
        try:
            kills, _ = kills_during(fio, sock, 2, every=10)
            runs = fio.finish(timeout=800)
        finally:
            halt.set()
            compactor.join(60)
        assert len(kills) == 2
        assert_fio_verified(runs)
        assert compactions.count(0) >= 2, compactions        # compaction did run meanwhile
        st = stats(sock)
        assert st["bd_writes"] > 0 and st["failed_reads"] == 0, st
        rzs(sock, "/dev/ublkb0", "--reset")
