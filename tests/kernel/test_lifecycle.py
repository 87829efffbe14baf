"""compcache's "Using" sequence on real devices, with our tools: load with num_devices, init
with rzscontrol, swapon (no mkswap), stats while active, reset refused while active, swapoff,
reset, re-init with another size, unload."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from .daemonctl import PY, exited, leftovers, running, start, stop, wait_gone

MiB = 1 << 20


def rzs(sock, *args, check_rc=None):
    p = subprocess.run([PY, "-m", "ublkzswap.cli", *args, "--socket", str(sock)],
                       capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert p.returncode == check_rc, (args, p.returncode, p.stdout, p.stderr)
    return p


def swaps() -> str:
    return open("/proc/swaps").read()


@pytest.fixture(autouse=True)
def nothing_left_behind():
    assert leftovers() == []
    yield
    for dev in ("/dev/ublkb0", "/dev/ublkb1"):
        if dev in swaps():
            subprocess.run(["swapoff", dev], timeout=300)
    assert wait_gone() == []


PF_MEMALLOC_NOIO = 0x00080000     # what PR_SET_IO_FLUSHER sets (with PF_LOCAL_THROTTLE)


def not_io_flushers(pid: int) -> list[str]:
    """The threads of ``pid`` (as "tid name") without PF_MEMALLOC_NOIO in their task flags."""
    out = []
    for t in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            stat = open(f"/proc/{pid}/task/{t}/stat").read()
        except OSError:
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        if not int(rest.split()[6]) & PF_MEMALLOC_NOIO:      # field 9: flags
            out.append(f"{t} {name}")
    return out


def test_compcache_using_sequence(tmp_path):
    sock = tmp_path / "ctl.sock"
    with running("num_devices=2", f"socket={sock}") as (pid, _):
        assert os.path.exists("/dev/ublkc0") and os.path.exists("/dev/ublkc1")
        assert not os.path.exists("/dev/ublkb0") and not os.path.exists("/dev/ublkb1")
        assert oct(os.stat(sock).st_mode & 0o777) == "0o660"

        # uninitialised: stats -> ENOTTY, reset -> success
        p = rzs(sock, "/dev/ublkb1", "--stats", check_rc=1)
        assert p.stderr.strip() == "stats: Inappropriate ioctl for device"
        rzs(sock, "/dev/ublkb1", "--reset", check_rc=0)

        # init (options in any order are applied disksize -> init)
        rzs(sock, "/dev/ublkb1", "--init", "--disksize_kb=32768", check_rc=0)
        assert int(open("/sys/block/ublkb1/size").read()) * 512 == 32 * MiB
        # every thread of the daemon (queue, keeper, control, main) is PR_SET_IO_FLUSHER: its
        # reclaim never writes pages out to a device it serves
        assert not_io_flushers(pid) == []
        # ps and pidof see ublkzswapd (README's unload command: kill $(pidof ublkzswapd))
        argv0 = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
        assert argv0 == b"ublkzswapd" and open(f"/proc/{pid}/comm").read().strip() == "ublkzswapd"
        p = rzs(sock, "/dev/ublkb1", "--init", check_rc=1)
        assert p.stderr.strip() == "init: Device or resource busy"
        p = rzs(sock, "/dev/ublkb1", "--disksize_kb=1024", check_rc=1)
        assert p.stderr.strip() == "disksize_kb: Device or resource busy"

        # swapon without mkswap: the header was written by --init
        subprocess.run(["swapon", "/dev/ublkb1"], check=True, timeout=300)
        assert "/dev/ublkb1" in swaps()
        p = rzs(sock, "/dev/ublkb1", "--stats", check_rc=0)
        lines = p.stdout.splitlines()
        assert lines[0] == "DiskSize:\t   32768 kB"
        assert [ln.split(":")[0] for ln in lines] == [
            "DiskSize", "NumReads", "NumWrites", "FailedReads", "FailedWrites", "InvalidIO",
            "NotifyFree", "ZeroPages", "GoodCompress", "NoCompress", "PagesStored", "PagesUsed",
            "OrigDataSize", "ComprDataSize", "MemUsedTotal"]
        listing = rzs(sock, "--list", check_rc=0).stdout
        assert "/dev/ublkb1" in listing and "active" in listing

        # reset while swapped on: EBUSY, nothing lost
        p = rzs(sock, "/dev/ublkb1", "--reset", check_rc=1)
        assert p.stderr.strip() == "reset: Device or resource busy"
        assert "/dev/ublkb1" in swaps()

        subprocess.run(["swapoff", "/dev/ublkb1"], check=True, timeout=300)
        rzs(sock, "/dev/ublkb1", "--reset", check_rc=0)
        assert not os.path.exists("/dev/ublkb1") and os.path.exists("/dev/ublkc1")
        p = rzs(sock, "/dev/ublkb1", "--stats", check_rc=1)
        assert p.stderr.strip() == "stats: Inappropriate ioctl for device"

        # re-init with another size works after reset
        rzs(sock, "/dev/ublkb1", "--disksize_kb=16384", "--init", check_rc=0)
        assert int(open("/sys/block/ublkb1/size").read()) * 512 == 16 * MiB
        subprocess.run(["swapon", "/dev/ublkb1"], check=True, timeout=300)
        subprocess.run(["swapoff", "/dev/ublkb1"], check=True, timeout=300)

        # device 0 was never touched and is still just reserved
        assert not os.path.exists("/dev/ublkb0")
        p = rzs(sock, "/dev/ublkb7", "--stats", check_rc=1)
        assert "No such device" in p.stderr
    assert wait_gone() == []


def test_memlimit_changes_at_runtime(tmp_path):
    sock = tmp_path / "ctl.sock"
    with running("num_devices=1", f"socket={sock}"):
        rzs(sock, "/dev/ublkb0", "--disksize_kb=16384", "--init", check_rc=0)
        rzs(sock, "/dev/ublkb0", "--memlimit_kb=8192", check_rc=0)
        import json
        st = json.loads(rzs(sock, "/dev/ublkb0", "--json", check_rc=0).stdout)
        assert st["mem_limit"] == 8192 * 1024
        rzs(sock, "/dev/ublkb0", "--reset", check_rc=0)


def test_sigterm_is_refused_while_swapped_on_and_logged(tmp_path):
    """Stopping would fail every swap-in from the device: the daemon says why (kernel log)
    and keeps serving until swapoff; then SIGTERM stops it, and it logs no error doing so."""
    sock = tmp_path / "ctl.sock"
    pid, _ = start("num_devices=1", f"socket={sock}", "disksize_kb=65536")
    try:
        subprocess.run(["swapon", "/dev/ublkb0"], check=True, timeout=300)
        os.kill(pid, signal.SIGTERM)
        time.sleep(5)
        assert os.path.exists(f"/proc/{pid}") and "/dev/ublkb0" in swaps()
        st = rzs(sock, "/dev/ublkb0", "--stats", check_rc=0).stdout
        assert "DiskSize:" in st
        # a kernel log record of its own, named and numbered as a driver's, at warning level
        refused = f"ublkzswapd[{pid}]: not stopping: /dev/ublkb0 in use (swapoff first)"
        warnings = subprocess.run(["dmesg", "--level=warn"], capture_output=True,
                                  text=True).stdout
        assert refused in warnings, warnings[-3000:]
        subprocess.run(["swapoff", "/dev/ublkb0"], check=True, timeout=300)
        os.kill(pid, signal.SIGTERM)
        assert exited(pid, 30), "ublkzswapd did not stop on SIGTERM after swapoff"
        assert wait_gone() == []
        # a background daemon's stderr is the kernel log: its teardown reported no error
        after = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.rsplit(refused, 1)[1]
        for bad in (": fatal", "teardown of device", "Traceback"):
            assert bad not in after, after[-3000:]
    finally:
        if "/dev/ublkb0" in swaps():
            subprocess.run(["swapoff", "/dev/ublkb0"], timeout=300)
        stop(pid)


def _block(i: int, version: int) -> bytes:
    """4 KiB that compress about 3:1 and say which block and version they are."""
    text = f"block {i} version {version}: ublkzswap moves pages together. ".encode()
    return (text * (4096 // len(text) + 1))[:4096]


def test_compact_gives_memory_back_and_loses_nothing(tmp_path):
    """Random overwrites of half the blocks leave holes; compaction (in the background, and
    --compact, zram's) moves pages together: at most 10% of the memory held is unused after,
    pages_compacted counts what went back, and every block reads back."""
    import json
    import mmap
    import random
    sock = tmp_path / "ctl.sock"
    n = 16384                                              # 64 MiB
    with running("num_devices=1", f"socket={sock}"):
        rzs(sock, "/dev/ublkb0", "--disksize_kb=65536", "--init", check_rc=0)
        version = [0] * n
        buf = mmap.mmap(-1, 1 << 20)
        fd = os.open("/dev/ublkb0", os.O_RDWR | os.O_DIRECT)
        try:
            for first in range(0, n, 256):
                buf[:] = b"".join(_block(i, 0) for i in range(first, first + 256))
                os.pwritev(fd, [buf], first * 4096)
            one = mmap.mmap(-1, 4096)
            for i in random.Random(3).sample(range(n), n // 2):
                version[i] = 1
                one[:] = _block(i, 1)
                os.pwritev(fd, [one], i * 4096)
            before = json.loads(rzs(sock, "/dev/ublkb0", "--json", check_rc=0).stdout)
            p = rzs(sock, "/dev/ublkb0", "--compact", "-v", check_rc=0)
            after = json.loads(rzs(sock, "/dev/ublkb0", "--json", check_rc=0).stdout)
            freed = int(p.stdout.split("compact: ")[1].split()[0])
            # the keeper may have compacted some in the background already: together they did
            assert after["pages_compacted"] >= freed and after["pages_compacted"] > 0, after
            assert after["mem_used_total"] <= before["mem_used_total"], (before, after)
            assert after["mem_used_total"] / after["compr_data_size"] <= 1.10, after
            bad = []
            for first in range(0, n, 256):
                os.preadv(fd, [buf], first * 4096)
                for i in range(first, first + 256):
                    o = (i - first) * 4096
                    if buf[o:o + 4096] != _block(i, version[i]):
                        bad.append(i)
            assert not bad, f"{len(bad)} blocks differ, first {bad[:5]}"
        finally:
            os.close(fd)
        rzs(sock, "/dev/ublkb0", "--reset", check_rc=0)
