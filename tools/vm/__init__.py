"""tools.vm: the ublkzswap test VM, for hosts whose kernel has no ublk.

Owns: building a cached guest image from Debian's 6.12 kernel (which has ublk_drv) and a busybox
initramfs (image.py), the guest's /init and job script (guest.py), booting it under qemu TCG and
running one command inside with the caller's root, cwd and environment (run.py), and the CLI
(__main__.py)::

    python3 -m tools.vm build [--force]
    python3 -m tools.vm run [--timeout S] [--mem MiB] [--smp N] [--disk MiB] [--results DIR]
                            [--writable] [--systemd] [-v] -- CMD ARGS...
    python3 -m tools.vm selftest

The guest sees the host's / read-only over 9p, with guest-local tmpfs on /tmp, /run, /var/tmp,
/dev/shm; ublk_drv, zram (lz4, num_devices=1), virtio_blk, loop and ext4 preloaded; zswap disabled;
$UBLKZSWAP_VM=1 and $UBLKZSWAP_VM_RESULTS (a writable share) set, and with `--disk`
$UBLKZSWAP_SCRATCH_DISK=/dev/vda, the only disk a job may destroy (guest.py). `run` exits with
the command's status, 124 on timeout (after a sysrq blocked-task dump), 125 if the guest died
without a status (kernel panic, oops=panic, init failure), 130 if interrupted; qemu never
outlives the harness. With `--systemd` the host root's own systemd boots as PID 1 (on the
writable overlay, into a target of sysinit.target and the job) and the command runs as a unit
(~35 s to the job): for tests of what systemd does with the project's units (tests/systemd).

Still naive:
- x86_64 + Debian/apt hosts only (apt-get download of linux-image-6.12.*-amd64-unsigned).
- The shared root is read-only: a job cannot write into the repo (pytest cache, .hypothesis,
  __pycache__, fio verify state in cwd); a cwd under /tmp does not exist in the guest. Point
  writes at /tmp or $UBLKZSWAP_VM_RESULTS, or use `run --writable` (tmpfs overlay on the root,
  discarded at power-off; numpy-heavy start-up measured ~30% slower, so it is not the default).
- Output comes over the emulated serial console: stdout and stderr are merged, kernel warnings are
  interleaved, and it is a tty in the guest (isatty() is true); stdin is /dev/null.
- One command per boot (~7 s); no networking; TCG only (this host's KVM cannot run the kernel).
- A harness killed by SIGKILL leaves its /tmp/ublkzswap-vm-* directories behind (qemu still dies).
- The cache is keyed by the recipe, not by the newest kernel: `build --force` picks up a newer one.
"""
