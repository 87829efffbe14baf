"""What runs inside the guest: the initramfs ``/init`` script and the per-run job script.

Pure text generation, no I/O, so it is unit tested without booting (tests/unit/test_vm_harness.py).

Guest layout (the contract the job sees)::

    /                     the host's root, read-only over 9p (tag "host", cache=loose)
    /proc /sys /dev       fresh proc, sysfs, devtmpfs (+ /dev/fd, /dev/shm, /dev/pts)
    /tmp /run /var/tmp    guest-local tmpfs (NOT the host's: a cwd under /tmp does not exist here)
    /run/ublkzswap-vm     the writable results share (tag "results"): job.sh, rc, files a test leaves
    /run/ublkzswap-vm-modules   the initramfs' .ko files, for `busybox insmod` of extra modules

With ``run --systemd`` (:data:`SYSTEMD_ENV`) PID 1 execs the host root's systemd instead, on the
writable overlay, booted into :data:`SYSTEMD_TARGET` (sysinit.target and the job); the job is
the unit :data:`SYSTEMD_JOB`, its wrapper printing the same markers and writing the same rc.

The job runs as root, chrooted into the host root, in the caller's cwd with the caller's
environment (see :func:`job_script`), stdin from /dev/null, stdout+stderr on the serial console.
On top of that environment the harness states facts about the guest (:func:`guest_facts`)::

    UBLKZSWAP_VM=1                    always: the job runs inside this VM
    UBLKZSWAP_VM_RESULTS / _MODULES / _KERNEL   the results share, extra .ko files, kernel version
    UBLKZSWAP_SCRATCH_DISK=/dev/vda   exactly when `run --disk MiB` attached a scratch disk: a
                                      fresh image the job may destroy (mkswap, mkfs)

These names belong to the harness: a caller's own value of any of them is never passed in (a
host's UBLKZSWAP_SCRATCH_DISK names a *host* disk, which means nothing, or worse, in the guest).
"""

from __future__ import annotations

import re
import shlex

#: Tag and guest mount point of the writable share that carries job.sh, rc and results.
RESULTS_TAG = "results"
RESULTS_DIR = "/run/ublkzswap-vm"
MODULES_DIR = "/run/ublkzswap-vm-modules"
HOST_TAG = "host"

#: Lines the init script prints on the console; run.py keys its state machine on them.
MARK_START = "ublkzswap-vm: job start"
MARK_EXIT = "ublkzswap-vm: job exit "  # followed by the exit status

#: Modules loaded at boot, in this order (dependencies are inserted ahead by the image builder).
#: (name, insmod parameters)
BOOT_MODULES: tuple[tuple[str, str], ...] = (
    ("netfs", ""),
    ("9pnet", ""),
    ("9pnet_virtio", ""),
    ("9p", ""),
    ("ublk_drv", ""),
    ("lz4_compress", ""),
    ("lz4hc_compress", ""),
    ("zram", "num_devices=1"),
    ("virtio_blk", ""),
    ("loop", ""),
    ("crc32c_generic", ""),  # ext4 asks for crc32c at mount time (request_module: no modprobe here)
    ("ext4", ""),          # a backing swap *file* in the swap tests (mkfs.ext4 on the scratch disk)
)
#: Modules shipped in the image but not loaded (a test loads them: busybox insmod $UBLKZSWAP_VM_MODULES/x.ko).
EXTRA_MODULES: tuple[str, ...] = ("null_blk", "overlay")

#: Kernel command line word (``name=1``) the kernel hands to /init as an environment variable:
#: overlay a guest-local tmpfs on the shared root so the job may write anywhere (run --writable).
WRITABLE_ENV = "ublkzswap_vm_writable"

#: Kernel command line word (``name=1``): PID 1 becomes systemd (the shared root's own, booted
#: into :data:`SYSTEMD_TARGET` on the writable overlay), and the job runs as the unit
#: :data:`SYSTEMD_JOB` (run --systemd): for tests of what systemd does with our units.
SYSTEMD_ENV = "ublkzswap_vm_systemd"
SYSTEMD_TARGET = "ublkzswap-vm.target"
SYSTEMD_JOB = "ublkzswap-vm-job.service"

#: Seconds before the kernel reports a blocked task (the guest is 10-50x slower than the host).
HUNG_TASK_SECS = 60

#: Kernel command line. panic=-1 + qemu -no-reboot: a panic ends the run; oops=panic: an oops
#: too (a half-dead kernel would otherwise only show up as a timeout much later).
#: The kmem allocation events are enabled at boot, before the second CPU runs: enabling a
#: tracepoint later patches kernel text live, and under TCG a vCPU can then trip over the
#: patch's int3 (seen: "Oops: int3" in kmem_cache_alloc_noprof). Tests only set filters and
#: tracing_on (tests/kernel/alloctrace.py), which patch nothing.
TRACE_EVENTS = "kmem:kmalloc,kmem:kmem_cache_alloc,kmem:mm_page_alloc"
KERNEL_CMDLINE = ("console=ttyS0 panic=-1 oops=panic quiet zswap.enabled=0 mitigations=off "
                  f"trace_event={TRACE_EVENTS} trace_buf_size=4M")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Caller variables that describe the caller's shell, not the job; never passed through.
ENV_DROP = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})

#: "The job runs inside the test VM" (value "1"). Kernel tests read it to tell a harness bug
#: (a VM run that lacks something the harness provides) from a host that lacks it.
VM_ENV = "UBLKZSWAP_VM"
#: The block device the job may destroy; set exactly when ``run --disk`` attached one. The
#: kernel tests write to no other disk (tests/kernel/scratch.py).
SCRATCH_DISK_ENV = "UBLKZSWAP_SCRATCH_DISK"
#: Where the ``--disk`` image appears: the guest's only virtio disk (qemu -nodefaults, one -drive).
SCRATCH_DISK = "/dev/vda"
#: Every variable :func:`guest_facts` may set; a caller's value of these is dropped.
FACT_NAMES = frozenset({VM_ENV, "UBLKZSWAP_VM_RESULTS", "UBLKZSWAP_VM_MODULES", "UBLKZSWAP_VM_KERNEL",
                        SCRATCH_DISK_ENV})


def init_script(modules: list[tuple[str, str]]) -> str:
    """The initramfs /init (busybox sh). ``modules``: (name, params) in load order."""
    loads = "\n".join(f"load {name}{' ' + params if params else ''}" for name, params in modules)
    return f"""#!/bin/busybox sh
# ublkzswap test VM init, generated by tools/vm/guest.py. Do not edit the image, edit that.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "ublkzswap-vm: $*" >/dev/console; }}
die() {{ say "init: $*"; echo {MARK_EXIT}125 >/dev/console; poweroff -f; }}
load() {{ m=$1; shift; insmod /lib/modules/$m.ko "$@" || say "insmod $m failed"; }}
{loads}
[ -w /sys/module/zswap/parameters/enabled ] && echo N >/sys/module/zswap/parameters/enabled
echo 1 >/proc/sys/kernel/sysrq
echo {HUNG_TASK_SECS} >/proc/sys/kernel/hung_task_timeout_secs
R=/mnt
ROOTOPTS=trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000
if [ "${{{WRITABLE_ENV}}}" = 1 ]; then
    # writable root: tmpfs upper over the read-only 9p root, discarded at power-off
    load overlay
    mkdir -p /lower /ovl
    mount -t 9p -o $ROOTOPTS {HOST_TAG} /lower || die "mount host root failed"
    mount -t tmpfs -o mode=755 tmpfs /ovl
    mkdir -p /ovl/upper /ovl/work
    mount -t overlay -o lowerdir=/lower,upperdir=/ovl/upper,workdir=/ovl/work overlay $R || die "overlay mount failed"
else
    mount -t 9p -o $ROOTOPTS {HOST_TAG} $R || die "mount host root failed"
fi
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t tracefs tracefs $R/sys/kernel/tracing && echo 0 >$R/sys/kernel/tracing/tracing_on
mount -t devtmpfs devtmpfs $R/dev
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp
mount -t tmpfs -o mode=755 tmpfs $R/run
mkdir -p $R{RESULTS_DIR} $R{MODULES_DIR}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {RESULTS_TAG} $R{RESULTS_DIR} || die "mount results failed"
mount -o bind /lib/modules $R{MODULES_DIR}
[ -r $R{RESULTS_DIR}/job.sh ] || die "no job.sh on the results share"
if [ "${{{SYSTEMD_ENV}}}" = 1 ]; then
    # systemd as PID 1 on the (writable) shared root: sysinit.target (journald, udev, the
    # generators), then the job as a unit; the job's wrapper writes rc and powers off
    [ -x $R/lib/systemd/systemd ] || die "no /lib/systemd/systemd on the shared root"
    # this is a machine, not the container the host root may come from: systemd would take
    # the host's container marker for its own and refuse swap units (overlay: host untouched)
    rm -f $R/.dockerenv $R/run/.containerenv
    mkdir -p $R/run/systemd/system
    cat >$R/run/ublkzswap-vm-job <<'JOB'
#!/bin/sh
echo {MARK_START} >/dev/console
/bin/sh {RESULTS_DIR}/job.sh </dev/null >/dev/console 2>&1
rc=$?
echo $rc >{RESULTS_DIR}/rc
echo {MARK_EXIT}$rc >/dev/console
sync
exec /bin/busybox poweroff -f
JOB
    cat >$R/run/systemd/system/{SYSTEMD_JOB} <<'UNIT'
[Unit]
Description=ublkzswap test VM job
After=sysinit.target basic.target systemd-udev-trigger.service
[Service]
Type=simple
ExecStart=/bin/sh /run/ublkzswap-vm-job
StandardInput=null
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
UNIT
    cat >$R/run/systemd/system/{SYSTEMD_TARGET} <<'UNIT'
[Unit]
Description=ublkzswap test VM (systemd boot)
Requires=sysinit.target basic.target
Wants={SYSTEMD_JOB}
After=sysinit.target basic.target
AllowIsolate=yes
UNIT
    exec chroot $R /lib/systemd/systemd --unit={SYSTEMD_TARGET} --log-target=kmsg
fi
echo {MARK_START} >/dev/console
chroot $R /usr/bin/env -i /bin/sh {RESULTS_DIR}/job.sh </dev/null >/dev/console 2>&1
rc=$?
echo $rc >$R{RESULTS_DIR}/rc
echo {MARK_EXIT}$rc >/dev/console
sync
poweroff -f
"""


def guest_facts(kernel_version: str, scratch_disk: bool) -> dict[str, str]:
    """What the harness tells the job about the guest (module docstring): always UBLKZSWAP_VM=1
    and the share paths, and UBLKZSWAP_SCRATCH_DISK if and only if ``scratch_disk``."""
    facts = {VM_ENV: "1", "UBLKZSWAP_VM_RESULTS": RESULTS_DIR, "UBLKZSWAP_VM_MODULES": MODULES_DIR,
             "UBLKZSWAP_VM_KERNEL": kernel_version}
    if scratch_disk:
        facts[SCRATCH_DISK_ENV] = SCRATCH_DISK
    return facts


def guest_env(host_env: dict[str, str], python_bindir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The job's environment: the caller's, minus shell bookkeeping, names a shell cannot export
    and the harness's own :data:`FACT_NAMES`, with ``python_bindir`` first on PATH (pyenv shims do
    not work in the chroot) and ``extra`` (:func:`guest_facts`, TERM) on top."""
    env = {k: v for k, v in host_env.items()
           if _ENV_NAME.match(k) and k not in ENV_DROP and k not in FACT_NAMES and "\0" not in v}
    path = [p for p in env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":") if p]
    env["PATH"] = ":".join([python_bindir] + [p for p in path if p != python_bindir])
    env.update(extra or {})
    return env


def job_script(env: dict[str, str], cwd: str, argv: list[str]) -> str:
    """job.sh, run by ``env -i /bin/sh`` inside the chroot: export ``env``, cd, exec ``argv``."""
    if not argv:
        raise ValueError("empty command")
    lines = ["# ublkzswap test VM job, generated by tools/vm/guest.py"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(f"cd -- {shlex.quote(cwd)} || {{ echo \"ublkzswap-vm: no such directory in the guest: \"{shlex.quote(cwd)}; exit 125; }}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"
