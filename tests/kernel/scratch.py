"""The scratch disk: the one block device the kernel tests may destroy (mkswap, mkfs.ext4 -F).

Contract: a test writes only to the device named by ``$UBLKZSWAP_SCRATCH_DISK`` and never
guesses one (inside the test VM /dev/vda is a fresh image; on a native host it may well be the
root disk). ``tools/vm run --disk MiB`` sets the variable in the guest (tools/vm/guest.py); on a
native host its owner sets it to a disk they are happy to lose.

Without the variable a test that needs the disk skips, saying so -- except inside the test VM
(``$UBLKZSWAP_VM=1``, which the harness sets on every run) with ``UBLKZSWAP_REQUIRE_KERNEL=1``:
tools/test boots the VM with ``--disk``, so a missing variable there is a harness bug and the test
fails. A native host never fails for want of a disk, required or not: only its owner can name one.

A named device that is not a block device or is in use (mounted, an active swap, a mounted
partition of it: an exclusive open fails) fails the test wherever it runs, before anything is
written: naming it was a mistake that must be seen, not skipped.
"""
from __future__ import annotations

import errno
import os
import stat

import pytest

from tools.vm.guest import SCRATCH_DISK_ENV, VM_ENV

REQUIRE_ENV = "UBLKZSWAP_REQUIRE_KERNEL"


def in_vm(env) -> bool:
    """True inside the test VM (the harness exports UBLKZSWAP_VM=1 to every job)."""
    return env.get(VM_ENV) == "1"


def decide(env) -> tuple[str, str]:
    """From the environment alone: ("use", device), ("skip", reason) or ("fail", reason)."""
    dev = env.get(SCRATCH_DISK_ENV, "")
    if dev:
        return "use", dev
    if in_vm(env):
        reason = (f"${SCRATCH_DISK_ENV} is not set inside the test VM (the harness sets it when "
                  "`tools/vm run --disk MiB` attaches a scratch disk)")
        if env.get(REQUIRE_ENV) == "1":
            return "fail", f"{REQUIRE_ENV}=1 but {reason}"
        return "skip", reason
    return "skip", (f"no scratch disk named: this test destroys a block device (mkswap, mkfs.ext4); "
                    f"set {SCRATCH_DISK_ENV}=/dev/... to a disk whose contents may be lost, or run "
                    "it in the test VM (tools/vm run --disk MiB)")


def unusable(dev: str) -> str | None:
    """Why ``dev`` must not be written to, or None if it is an unused block device."""
    try:
        st = os.stat(dev)
    except OSError as e:
        return f"{dev}: {e.strerror}"
    if not stat.S_ISBLK(st.st_mode):
        return f"{dev} is not a block device"
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return f"{dev} is in use (mounted, an active swap, or a partition of it is)"
        return f"{dev}: {e.strerror}"
    os.close(fd)
    return None


def require(env=None) -> str:
    """The scratch disk for the calling test; skips or fails it as the module docstring says."""
    verdict, what = decide(os.environ if env is None else env)
    if verdict == "skip":
        pytest.skip(what)
    if verdict == "fail":
        pytest.fail(what, pytrace=False)
    why = unusable(what)
    if why:
        pytest.fail(f"${SCRATCH_DISK_ENV}={what} cannot be used, nothing was written to it: {why}",
                    pytrace=False)
    return what


def size_bytes(dev: str) -> int:
    """Size of the block device ``dev`` in bytes."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
