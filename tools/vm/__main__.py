"""CLI: ``python3 -m tools.vm {build,run,selftest}`` (run from the repository root)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from . import image, run as runmod


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m tools.vm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the cached guest image if missing or stale")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    for name, helptext in (("run", "boot the guest and run CMD in it (cwd, env and root of the caller)"),
                           ("selftest", "boot once and check python, numpy, lzo, ublk, zram, fio")):
        r = sub.add_parser(name, help=helptext)
        r.add_argument("--timeout", type=float, default=1800.0 if name == "run" else 600.0,
                       help="seconds before the guest is dumped and killed (exit 124)")
        r.add_argument("--mem", type=int, default=2048, metavar="MiB", help="guest RAM (default 2048)")
        r.add_argument("--smp", type=int, default=2, metavar="N", help="guest CPUs (default 2)")
        r.add_argument("--disk", type=int, default=0, metavar="SIZE_MiB",
                       help="attach a fresh sparse raw image as /dev/vda, named to the job as "
                            "$UBLKZSWAP_SCRATCH_DISK")
        r.add_argument("--results", metavar="DIR",
                       help="host dir shared writable as $UBLKZSWAP_VM_RESULTS (kept; default: a temp dir)")
        r.add_argument("--writable", action="store_true",
                       help="overlay a guest tmpfs on the shared root so the job can write anywhere (discarded)")
        r.add_argument("--systemd", action="store_true",
                       help="boot the shared root's systemd as PID 1 (writable overlay) and run the job "
                            "as a unit once sysinit.target is up")
        r.add_argument("-v", "--verbose", action="store_true", help="show the boot console too")
        if name == "run":
            r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="command to run")
    return p


def parse(args: list[str]) -> argparse.Namespace:
    ns = parser().parse_args(args)
    if ns.cmd == "run":
        argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
        if not argv:
            parser().error("run: no command given (python3 -m tools.vm run [options] -- CMD ARGS...)")
        ns.argv = argv
    if ns.cmd != "build":
        if ns.mem < 128:
            parser().error("--mem below 128 MiB will not boot this kernel")
        if ns.smp < 1 or ns.disk < 0 or ns.timeout <= 0:
            parser().error("--smp must be >= 1, --disk >= 0, --timeout > 0")
    return ns


SELFTEST_SCRIPT = r"""
set -e
t0=$(cut -d' ' -f1 /proc/uptime)
echo "guest uptime at job start: ${t0}s"
"$PY" -c 'import numpy, lzo; print(open("/proc/version").read().strip())'
ls -l /dev/ublk-control /dev/zram*
cat /sys/block/zram0/comp_algorithm
fio --version
echo "zswap enabled: $(cat /sys/module/zswap/parameters/enabled)"
echo "whoami: $(id -u) cwd: $(pwd)"
"""


def selftest(ns: argparse.Namespace) -> int:
    py = os.path.realpath(sys.executable)
    t0 = time.monotonic()
    img = image.ensure()
    t1 = time.monotonic()
    env = dict(os.environ, PY=py)
    opts = runmod.RunOptions(argv=["sh", "-c", SELFTEST_SCRIPT], timeout=ns.timeout, mem_mib=ns.mem,
                             smp=ns.smp, disk_mib=ns.disk, env=env, results=ns.results, verbose=ns.verbose,
                             writable=ns.writable, systemd=ns.systemd)
    rc = runmod.run(img, opts)
    t2 = time.monotonic()
    print(f"tools.vm selftest: {'OK' if rc == 0 else f'FAILED (exit {rc})'}; image {t1 - t0:.1f}s, "
          f"boot+run {t2 - t1:.1f}s, kernel {img.kernel_version}", flush=True)
    return rc


def main(args: list[str] | None = None) -> int:
    ns = parse(sys.argv[1:] if args is None else args)
    try:
        if ns.cmd == "build":
            img = image.ensure(force=ns.force)
            print(f"tools.vm: image ready in {img.kernel.parent} (kernel {img.kernel_version}, {img.package})")
            return 0
        if ns.cmd == "selftest":
            return selftest(ns)
        img = image.ensure()
        opts = runmod.RunOptions(argv=ns.argv, timeout=ns.timeout, mem_mib=ns.mem, smp=ns.smp,
                                 disk_mib=ns.disk, results=ns.results, verbose=ns.verbose,
                                 writable=ns.writable, systemd=ns.systemd)
        if ns.verbose:
            print(f"tools.vm: running {shlex.join(ns.argv)} in the guest", file=sys.stderr, flush=True)
        return runmod.run(img, opts)
    except KeyboardInterrupt:
        print("tools.vm: interrupted; guest killed", file=sys.stderr)
        return 130
    except image.BuildError as e:
        print(f"tools.vm: image build failed: {e}", file=sys.stderr)
        return runmod.EXIT_NO_STATUS


if __name__ == "__main__":
    sys.exit(main())
