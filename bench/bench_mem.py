#!/usr/bin/env python3
"""What ublkzswapd's own memory costs, beside zram, in ONE boot of the test VM (or natively
where the kernel has ublk). Printed, not asserted.

Three states of a daemon serving one device, each measured against the machine before it:
  (a) ``ublkzswapd num_devices=1`` loaded, nothing initialised;
  (b) one 1 GiB device initialised, still empty;
  (c) after 256 MiB of 3:1 compressible data written to it (fio, sequential, O_DIRECT);
then (b) again with ``ublkzswapd standby`` (a prepared standby kept: crash survival's cost);
and zram's (b) and (c) in the same boot. For each: the system's ``used`` delta (as free(1):
total - free - buffers - cache), the drop of MemAvailable (which, unlike ``used``, also counts
locked file pages such as libraries under mlockall), and for the daemon its RSS split by mapping
from /proc/PID/smaps, plus VmLck. Goal (issue: footprint): (b) <= 32 MiB, and
(c) <= 1.05 x compr_data_size + (b). ``used`` counts shared memory as used (free(1) counts it
as cache): the daemon keeps its stored pages in locked shared memory.

    python3 bench/bench_mem.py [--mem 512]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PY = os.path.realpath(sys.executable)
SOCK = "/run/ublkzswap-benchmem.sock"
DISK_KB = 1 << 20
FILL_MB = 256
MIB = 1 << 20
KERNEL_FIELDS = ("PageTables", "SUnreclaim", "KernelStack", "Shmem", "Unevictable", "Mlocked",
                 "AnonPages", "Cached", "Percpu")


def meminfo() -> dict[str, int]:
    out = {}
    for line in open("/proc/meminfo"):
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0]) * 1024
    return out


def settle() -> dict[str, int]:
    """Drop what the kernel can drop, then read /proc/meminfo."""
    subprocess.run(["sync"])
    for _ in range(2):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        time.sleep(1)
    return meminfo()


def used(m: dict[str, int]) -> int:
    """free(1)'s used, but with shared memory counted as used: it is not cache here (the
    daemon's arena and tables live in locked SysV shared memory)."""
    return (m["MemTotal"] - m["MemFree"] - m["Buffers"] - m["Cached"] + m["Shmem"]
            - m["SReclaimable"])


def group_of(name: str, size: int) -> str:
    """Which part of the daemon a mapping belongs to."""
    if name.startswith("[anon:"):
        return name[6:-1].replace("ublkzswap ", "")
    if name in ("[heap]", "[stack]", "[vdso]", "[vvar]", "[vsyscall]"):
        return name.strip("[]")
    base = os.path.basename(name)
    if "libpython" in base or re.match(r"python3\.\d+$", base):
        return "python"
    if "numpy" in name or "openblas" in base or "gfortran" in base or "quadmath" in base:
        return "numpy+blas"
    if base.startswith(("liblzo2", "liburing", "liblz4", "lzo", "_block")) or "/lz4/" in name:
        return "lzo/lz4/uring"
    if base.startswith(("libc.", "ld-linux", "libm.", "libz.", "libffi", "libexpat", "libcrypto",
                        "libssl", "libbz2", "liblzma", "libuuid", "libmpdec")):
        return "libc & co"
    if name.endswith(".so") or ".so." in name or "/lib-dynload/" in name:
        return "other .so"
    if name == "":
        return f"anon {'>=1MiB' if size >= MIB else '<1MiB'}"
    if name.startswith("/dev/") or "memfd:" in name or "SYSV" in name:
        return "shared"
    return "other"


def smaps(pid: int) -> dict[str, dict[str, int]]:
    """{group: {"rss", "locked", "size"}} from /proc/PID/smaps (bytes)."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in open(f"/proc/{pid}/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
        if m:
            size = int(m.group(2), 16) - int(m.group(1), 16)
            g = group_of(m.group(3).strip(), size)
            cur = out.setdefault(g, {"rss": 0, "locked": 0, "size": 0})
            cur["size"] += size
            continue
        k, _, v = line.partition(":")
        if cur is not None and k in ("Rss", "Locked"):
            cur[k.lower()] += int(v.split()[0]) * 1024
    return out


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmLck", "RssAnon", "RssFile", "RssShmem", "VmSwap"):
            out[k] = int(v.split()[0]) * 1024
    return out


def processes(pid: int) -> list[tuple[int, str, dict[str, int]]]:
    """(pid, role, {Rss, Pss, USS}) for the daemon's server ``pid`` and its standby. USS
    (Private_Clean + Private_Dirty) is what the process alone costs: what its death would free."""
    from tests.kernel.alloctrace import family
    out = []
    for i, p in enumerate(family(pid)):
        roll = {}
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                k, _, v = line.partition(":")
                if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    roll[k] = int(v.split()[0]) * 1024
        except OSError:
            continue
        roll["USS"] = roll.pop("Private_Clean", 0) + roll.pop("Private_Dirty", 0)
        out.append((p, "server" if i == 0 else "standby", roll))
    return out


def rzs(*args) -> str:
    p = subprocess.run([PY, "-m", "ublkzswap.cli", *args, "--socket", SOCK],
                       capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise RuntimeError(f"rzscontrol {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def fill(dev: str) -> None:
    subprocess.run(["fio", "--name=fill", f"--filename={dev}", "--rw=write", "--bs=256k",
                    "--iodepth=8", "--ioengine=io_uring", "--direct=1", f"--size={FILL_MB}M",
                    "--buffer_compress_percentage=67", "--buffer_compress_chunk=4096",
                    "--refill_buffers", "--output-format=terse"],
                   check=True, capture_output=True, timeout=3600)


def fmt_mib(b: int) -> str:
    return f"{b / MIB:7.1f}"


def inside(args) -> int:
    from tests.kernel.daemonctl import start, stop, wait_gone
    rows = []
    base = settle()
    pid, _ = start("num_devices=1", f"socket={SOCK}")
    details = {}

    def server() -> int:
        """The process serving I/O: the server."""
        return pid
    try:
        time.sleep(2)
        m = settle()
        rows.append(("(a) loaded", used(m) - used(base), base["MemAvailable"] - m["MemAvailable"],
                     status(server())))
        mi_a = m
        details["a"] = smaps(server())
        rzs("/dev/ublkb0", f"--disksize_kb={DISK_KB}", "--init")
        time.sleep(2)
        m = settle()
        rows.append(("(b) 1 GiB empty", used(m) - used(base),
                     base["MemAvailable"] - m["MemAvailable"], status(server())))
        mi_b = m
        details["b"] = smaps(server())
        procs_b = processes(pid)
        fill("/dev/ublkb0")
        time.sleep(2)
        m = settle()
        st = json.loads(rzs("/dev/ublkb0", "--json"))
        rows.append(("(c) +256 MiB 3:1", used(m) - used(base),
                     base["MemAvailable"] - m["MemAvailable"], status(server())))
        details["c"] = smaps(server())
        ublk_c = st
        rzs("/dev/ublkb0", "--reset")
    finally:
        stop(pid)
        wait_gone()
    # (b) again with a standby kept (``ublkzswapd standby``): what crash survival's warm
    # standby adds to the fixed cost
    from tests.kernel.daemonctl import standby_of
    base_s = settle()
    pid, _ = start("num_devices=1", "standby", f"socket={SOCK}")
    try:
        rzs("/dev/ublkb0", f"--disksize_kb={DISK_KB}", "--init")
        standby_of(pid)
        time.sleep(2)
        m = settle()
        rows.append(("(b) + standby", used(m) - used(base_s),
                     base_s["MemAvailable"] - m["MemAvailable"], status(pid)))
        procs_bs = processes(pid)
        rzs("/dev/ublkb0", "--reset")
    finally:
        stop(pid)
        wait_gone()
    # zram, same boot
    base = settle()
    if not os.path.exists("/sys/block/zram0"):
        subprocess.run(["modprobe", "zram", "num_devices=1"], check=True)

    def zw(attr, val):
        with open(f"/sys/block/zram0/{attr}", "w") as f:
            f.write(val)
    zw("reset", "1")
    zw("comp_algorithm", "lz4")
    zw("disksize", f"{DISK_KB}K")
    m = settle()
    zrows = [("zram (b)", used(m) - used(base), base["MemAvailable"] - m["MemAvailable"])]
    fill("/dev/zram0")
    m = settle()
    mm = open("/sys/block/zram0/mm_stat").read().split()
    zrows.append(("zram (c)", used(m) - used(base), base["MemAvailable"] - m["MemAvailable"]))
    zw("reset", "1")

    print(f"\nguest RAM {base['MemTotal'] // MIB} MiB, kernel {os.uname().release}; MiB")
    print(f"{'state':18s} {'used d':>7s} {'avail d':>7s} {'RSS':>7s} {'VmLck':>7s} {'anon':>7s} {'file':>7s}")
    for label, u, a, s in rows:
        print(f"{label:18s} {fmt_mib(u)} {fmt_mib(a)} {fmt_mib(s['VmRSS'])} {fmt_mib(s['VmLck'])} "
              f"{fmt_mib(s['RssAnon'])} {fmt_mib(s['RssFile'])}")
    for label, u, a in zrows:
        print(f"{label:18s} {fmt_mib(u)} {fmt_mib(a)}")
    print(f"\nublkzswap (c): compr_data_size {ublk_c['compr_data_size'] / MIB:.1f} MiB, "
          f"mem_used_total {ublk_c['mem_used_total'] / MIB:.1f} MiB; "
          f"zram (c): compr {int(mm[1]) / MIB:.1f} MiB, mem_used_total {int(mm[2]) / MIB:.1f} MiB")
    print("\nkernel-side deltas (b)-(a), MiB: " + ", ".join(
        f"{k} {(mi_b[k] - mi_a[k]) / MIB:.1f}" for k in KERNEL_FIELDS if k in mi_a))
    fixed = rows[1][1]
    grow = rows[2][1] - fixed
    print(f"fixed cost (b) used delta: {fixed / MIB:.1f} MiB = {fixed / max(zrows[0][1], 1):.1f}x zram's "
          f"{zrows[0][1] / MIB:.1f} MiB (goal <= 32 MiB)")
    print(f"growth (c)-(b): {grow / MIB:.1f} MiB = {grow / max(ublk_c['compr_data_size'], 1):.3f} x "
          f"compr_data_size (goal <= 1.05)")
    print(f"with a standby kept: (b) {rows[3][1] / MIB:.1f} MiB, "
          f"+{(rows[3][1] - fixed) / MIB:.1f} MiB (goal: standby adds <= 8 MiB)")
    print("\nprocesses at (b), and at (b) with a standby, MiB (USS: what the process alone "
          "costs, Private_Clean+Dirty):")
    for p, role, roll in procs_b + procs_bs:
        print(f"  {role:10s} pid {p:6d}  RSS {fmt_mib(roll.get('Rss', 0))}  PSS "
              f"{fmt_mib(roll.get('Pss', 0))}  USS {fmt_mib(roll['USS'])}")
    print("\ndaemon RSS / locked by mapping, MiB (a | b | c):")
    groups = sorted(set().union(*details.values()), key=lambda g: -details["c"].get(g, {}).get("rss", 0))
    for g in groups:
        cells = []
        for k in "abc":
            d = details[k].get(g, {"rss": 0, "locked": 0})
            cells.append(f"{fmt_mib(d['rss'])} /{fmt_mib(d['locked'])}")
        print(f"  {g:22s} " + " | ".join(cells))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside or os.path.exists("/dev/ublk-control"):
        return inside(args)
    from bench.vmrun import in_vm
    return in_vm("bench_mem.py", [], timeout=2400, mem=args.mem)


if __name__ == "__main__":
    sys.exit(main())
