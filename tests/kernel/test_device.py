"""Real /dev/ublkbN served by ublkzswapd: data integrity with fio, discard, bounds, lifecycle."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from .conftest import register_daemon
from .daemonctl import PY, block_stat, leftovers, running, start_foreground, wait_gone

MiB = 1 << 20
TARGETS = ["ram", "compressed"]


def fio(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(["fio", "--output-format=normal", *args], capture_output=True, text=True,
                       timeout=timeout)
    return p


def assert_fio_ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "verify:" not in p.stderr and "bad magic" not in p.stderr, p.stderr[-3000:]
    assert "err= 0" in p.stdout, p.stdout[-3000:]


@pytest.fixture(autouse=True)
def nothing_left_behind():
    assert leftovers() == [], "a previous test left devices behind"
    yield
    assert wait_gone() == [], "devices left behind after the test"


@pytest.mark.parametrize("target", TARGETS)
def test_compcache_style_start_fio_verify_whole_device(target, tmp_path):
    """ublkzswapd num_devices=2 disksize_kb=65536: device 0 initialised at 64 MiB,
    device 1 reserved but not started; fio verifies every block, O_DIRECT and buffered."""
    with running("num_devices=2", "disksize_kb=65536", f"target={target}",
                 f"socket={tmp_path}/ctl.sock") as (pid, line):
        assert "2 devices reserved" in line
        assert os.path.exists("/dev/ublkc0") and os.path.exists("/dev/ublkc1")
        assert os.path.exists("/dev/ublkb0") and not os.path.exists("/dev/ublkb1")
        assert int(open("/sys/block/ublkb0/size").read()) * 512 == 64 * MiB
        assert open("/sys/block/ublkb0/queue/logical_block_size").read().strip() == "4096"
        common = ["--filename=/dev/ublkb0", "--bs=4k", "--size=64M", "--verify=crc32c",
                  "--do_verify=1", "--verify_fatal=1"]
        assert_fio_ok(fio("--name=direct", "--rw=randwrite", "--ioengine=io_uring",
                          "--iodepth=32", "--direct=1", *common))
        assert_fio_ok(fio("--name=buffered", "--rw=write", "--ioengine=psync", "--direct=0",
                          "--buffer_pattern=0xdeadbeef", "--bs=64k", *common[2:],
                          "--filename=/dev/ublkb0", "--end_fsync=1"))
    assert wait_gone() == []


@pytest.mark.parametrize("target", TARGETS)
def test_discard_reads_back_zeros_and_past_end_is_rejected(target, tmp_path):
    with running("num_devices=1", "disksize_kb=16384", f"target={target}",
                 f"socket={tmp_path}/ctl.sock"):
        dev = "/dev/ublkb0"
        pattern = bytes(range(256)) * 16 * 256          # 1 MiB of non-zero data
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, len(pattern))
            buf[:] = pattern
            assert os.pwritev(fd, [buf], 4 * MiB) == len(pattern)
            subprocess.run(["blkdiscard", "-o", str(4 * MiB + 256 * 1024), "-l", str(512 * 1024), dev],
                           check=True, timeout=60)
            back = mmap.mmap(-1, len(pattern))
            assert os.preadv(fd, [back], 4 * MiB) == len(pattern)
            assert back[:256 * 1024] == pattern[:256 * 1024]
            assert back[256 * 1024:768 * 1024] == bytes(512 * 1024)
            assert back[768 * 1024:] == pattern[768 * 1024:]
            # past the end: the kernel refuses before anything reaches us, nothing changes
            with pytest.raises(OSError):
                os.pwritev(fd, [buf], 16 * MiB)
            assert os.preadv(fd, [back], 16 * MiB) == 0
            p = subprocess.run(["dd", "if=/dev/zero", f"of={dev}", "bs=4096", "seek=4096", "count=1",
                                "oflag=direct"], capture_output=True, text=True, timeout=60)
            assert p.returncode != 0
        finally:
            os.close(fd)


def test_taken_id_is_a_clear_error_and_first_daemon_unharmed(tmp_path):
    with running("num_devices=1", "disksize_kb=8192", "target=ram", f"socket={tmp_path}/a.sock"):
        p = subprocess.run([PY, "-m", "ublkzswap.daemon", "num_devices=1", "target=ram",
                            f"socket={tmp_path}/b.sock"], capture_output=True, text=True, timeout=120)
        assert p.returncode != 0
        assert p.stderr.strip().splitlines() == [
            "ublkzswapd: ublk device id 0 is taken (another ublk server owns /dev/ublkc0)"]
        with open("/dev/ublkb0", "rb") as f:
            assert len(f.read(4096)) == 4096
    assert wait_gone() == []


def _ios_completed(dev: str) -> int:
    """Reads + writes the block layer has completed on ``dev``."""
    f = block_stat(dev)
    return f[0] + f[4]


def test_sigterm_while_io_in_flight_leaves_nothing(tmp_path):
    """SIGTERM while fio's direct I/O runs on device 0. fio holds no exclusive claim, so the
    device is not in use (that refusal is for swapon and mounts): the daemon stops and deletes
    every device and exits 0, saying nothing of errors. fio is neither hung nor killed: the
    requests that meet the stopped device fail, and it ends with an I/O error (exit status 1,
    one job with err != 0)."""
    log = tmp_path / "daemon.log"
    daemon = register_daemon(start_foreground("num_devices=3", "disksize_kb=32768", "target=ram",
                                              f"socket={tmp_path}/c.sock", log=str(log)))
    before = _ios_completed("/dev/ublkb0")
    load = subprocess.Popen(["fio", "--output-format=normal", "--name=bg", "--filename=/dev/ublkb0",
                             "--rw=randrw", "--bs=4k", "--ioengine=io_uring", "--iodepth=16",
                             "--direct=1", "--time_based", "--runtime=60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # signal only once the daemon is really serving fio's I/O
        deadline = time.monotonic() + 60
        while _ios_completed("/dev/ublkb0") - before < 200 and load.poll() is None:
            assert time.monotonic() < deadline, "fio did no I/O on /dev/ublkb0 within 60 s"
            time.sleep(0.2)
        assert load.poll() is None, f"fio ended before the SIGTERM: {load.communicate()}"
        daemon.send_signal(signal.SIGTERM)
        out, err = load.communicate(timeout=120)
        rc = daemon.wait(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    text = log.read_text()
    assert rc == 0, f"ublkzswapd exited {rc}:\n{text[-3000:]}"
    for bad in ("ublkzswapd: fatal", "ublkzswapd: teardown of device", "Traceback"):
        assert bad not in text, text[-3000:]
    assert load.returncode == 1, (load.returncode, out[-3000:], err[-3000:])
    errs = re.findall(r"^bg: \(groupid=\d+, jobs=\d+\): err=\s*(\d+)", out, re.M)
    assert len(errs) == 1 and errs[0] != "0", out[-3000:]
    assert wait_gone() == []
