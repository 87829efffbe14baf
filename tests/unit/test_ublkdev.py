"""What holds a block device, read without touching it (an O_EXCL probe would make a concurrent
swapon or mount fail with EBUSY)."""
import os
import subprocess

import pytest

from ublkzswap import ublkdev


@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    p = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop devices here: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev])


def test_users_never_open_the_device(loop_device, monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, flags, *a, **kw):
        opened.append((str(path), flags))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", spy)
    assert ublkdev.block_users(loop_device, openers=True) == []
    assert not [p for p, f in opened if p == loop_device]


def test_a_mount_and_an_opener_are_seen(loop_device, tmp_path):
    if subprocess.run(["mkfs.ext4", "-q", "-F", loop_device], capture_output=True).returncode:
        pytest.skip("mkfs.ext4 unavailable")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", loop_device, str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount here")
    try:
        assert ublkdev.block_users(loop_device) == ["mounted"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    holder = subprocess.Popen(["sh", "-c", f"exec 3<{loop_device}; echo open; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert ublkdev.block_users(loop_device) == []            # an opener holds nothing
        assert ublkdev.block_users(loop_device, openers=True) == [f"open by pid {holder.pid}"]
    finally:
        holder.kill()
        holder.wait()
