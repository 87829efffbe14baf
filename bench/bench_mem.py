#!/usr/bin/env python3
"""What ublkzswapd's own memory costs, beside zram, in ONE boot of the test VM (or natively
where the kernel has ublk). Printed, not asserted.

Three states of a daemon serving one device, each measured against the machine before it:
  (a) ``ublkzswapd num_devices=1`` loaded, nothing initialised;
  (b) one 1 GiB device initialised, still empty;
  (c) after 256 MiB of 3:1 compressible data written to it (fio, sequential, O_DIRECT);
then (b) again with ``ublkzswapd standby`` (a prepared standby kept: crash survival's cost);
and zram's (b) and (c) in the same boot. For each: the system's ``used`` delta (as free(1):
total - free - buffers - cache, with free including the per-CPU lists' free pages), the drop
of MemAvailable (which, unlike ``used``, also counts locked file pages such as libraries
under mlockall), and for the daemon its RSS split by mapping from /proc/PID/smaps, plus VmLck.
Goal (issue: footprint): (b) <= 32 MiB, and (c) <= 1.05 x compr_data_size + (b). ``used``
counts shared memory as used (free(1) counts it as cache): the daemon keeps its stored pages in
locked shared memory.

Rounds (``--rounds``, default 3) repeat (a), (b), (b) with a standby and zram's (b), each
against the machine just before it, and print medians with their spread: one sample of
``used`` wanders by several MiB within a boot.

    python3 bench/bench_mem.py [--mem 512] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
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
    """/proc/meminfo in bytes, plus ``PcpFree``: free pages held in the per-CPU page lists."""
    out = {}
    for line in open("/proc/meminfo"):
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0]) * 1024
    out["PcpFree"] = pcp_free()
    return out


def pcp_free() -> int:
    """Bytes of free pages sitting in the per-CPU page lists (/proc/zoneinfo's pagesets
    ``count``). MemFree leaves them out, and since 6.7 the lists grow with the traffic of
    frees (up to ``high_max``, tens of MiB here): left in ``used``, they made one sample of
    the same state wander by 20 MiB."""
    pages, in_pagesets = 0, False
    for line in open("/proc/zoneinfo"):
        word = line.split()
        if not word:
            continue
        if word[0] == "pagesets":
            in_pagesets = True
        elif word[0] == "Node":
            in_pagesets = False
        elif in_pagesets and word[0] == "count:":
            pages += int(word[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


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
    daemon's arena and tables live in locked SysV shared memory); and the free pages of the
    per-CPU lists counted as free, as they are."""
    return (m["MemTotal"] - m["MemFree"] - m["PcpFree"] - m["Buffers"] - m["Cached"]
            + m["Shmem"] - m["SReclaimable"])


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


def sample(base: dict[str, int]) -> tuple[int, int, dict[str, int]]:
    """(used delta, MemAvailable drop, meminfo) against ``base``, once the kernel settled."""
    m = settle()
    return used(m) - used(base), avail(base) - avail(m), m


def avail(m: dict[str, int]) -> int:
    """MemAvailable, with the free pages of the per-CPU lists (which it leaves out too)."""
    return m["MemAvailable"] + m["PcpFree"]


def ublk_round(with_fill: bool) -> dict:
    """One daemon through (a), (b) and, ``with_fill``, (c); each state's sample, status and
    smaps groups."""
    from tests.kernel.daemonctl import start, stop, wait_gone
    out: dict = {}
    base = settle()
    pid, _ = start("num_devices=1", f"socket={SOCK}")
    try:
        time.sleep(2)
        out["a"] = sample(base) + (status(pid), smaps(pid))
        rzs("/dev/ublkb0", f"--disksize_kb={DISK_KB}", "--init")
        time.sleep(2)
        out["b"] = sample(base) + (status(pid), smaps(pid))
        out["procs_b"] = processes(pid)
        if with_fill:
            fill("/dev/ublkb0")
            time.sleep(2)
            out["c"] = sample(base) + (status(pid), smaps(pid))
            out["ublk_c"] = json.loads(rzs("/dev/ublkb0", "--json"))
        rzs("/dev/ublkb0", "--reset")
    finally:
        stop(pid)
        wait_gone()
    return out


def standby_round() -> dict:
    """(b) with a standby kept (``ublkzswapd standby``): what crash survival's warm standby
    adds to the fixed cost."""
    from tests.kernel.daemonctl import standby_of, start, stop, wait_gone
    base = settle()
    pid, _ = start("num_devices=1", "standby", f"socket={SOCK}")
    try:
        rzs("/dev/ublkb0", f"--disksize_kb={DISK_KB}", "--init")
        standby_of(pid)
        time.sleep(2)
        out = {"b": sample(base) + (status(pid),), "procs": processes(pid)}
        rzs("/dev/ublkb0", "--reset")
    finally:
        stop(pid)
        wait_gone()
    return out


def zram_round(with_fill: bool) -> dict:
    """zram's (b) and, ``with_fill``, (c), with its mm_stat after the fill."""
    if not os.path.exists("/sys/block/zram0"):
        subprocess.run(["modprobe", "zram", "num_devices=1"], check=True)

    def zw(attr, val):
        with open(f"/sys/block/zram0/{attr}", "w") as f:
            f.write(val)
    base = settle()
    zw("reset", "1")
    zw("comp_algorithm", "lz4")
    zw("disksize", f"{DISK_KB}K")
    out = {"b": sample(base)}
    if with_fill:
        fill("/dev/zram0")
        out["c"] = sample(base)
        out["mm"] = open("/sys/block/zram0/mm_stat").read().split()
    zw("reset", "1")
    return out


def median_cell(values: list[int]) -> str:
    """'median (min-max)' in MiB; the median alone for one value."""
    med = fmt_mib(statistics.median(values))
    if len(values) == 1:
        return f"{med} {'':13s}"
    return f"{med} ({min(values) / MIB:5.1f}-{max(values) / MIB:5.1f})"


def inside(args) -> int:
    # Rounds interleave the daemon, the daemon with a standby and zram, each measured against
    # the machine just before it: a single boot's `used` wanders by several MiB (per-CPU page
    # lists, slab, the runner itself), so one sample can miss the goal either way.
    ublk, stby, zram = [], [], []
    for r in range(args.rounds):
        ublk.append(ublk_round(with_fill=(r == 0)))
        stby.append(standby_round())
        zram.append(zram_round(with_fill=(r == 0)))
        print(f"  round {r + 1}: (a) {ublk[-1]['a'][0] / MIB:.1f}  (b) {ublk[-1]['b'][0] / MIB:.1f}  "
              f"(b)+standby {stby[-1]['b'][0] / MIB:.1f}  zram (b) {zram[-1]['b'][0] / MIB:.1f} "
              "MiB used", flush=True)
    first, last = ublk[0], ublk[-1]
    base_total = meminfo()["MemTotal"]
    print(f"\nguest RAM {base_total // MIB} MiB, kernel {os.uname().release}; MiB; "
          f"used and avail deltas: median (min-max) of {args.rounds} round(s), (c) once; "
          "RSS and the rest from the last round")
    print(f"{'state':18s} {'used d':>21s} {'avail d':>21s} {'RSS':>7s} {'VmLck':>7s} {'anon':>7s} "
          f"{'file':>7s}")
    rows = [("(a) loaded", [u["a"] for u in ublk]), ("(b) 1 GiB empty", [u["b"] for u in ublk]),
            ("(c) +256 MiB 3:1", [first["c"]]), ("(b) + standby", [s["b"] for s in stby])]
    for label, samples in rows:
        st = samples[-1][3]
        print(f"{label:18s} {median_cell([x[0] for x in samples])} "
              f"{median_cell([x[1] for x in samples])} {fmt_mib(st['VmRSS'])} "
              f"{fmt_mib(st['VmLck'])} {fmt_mib(st['RssAnon'])} {fmt_mib(st['RssFile'])}")
    for label, samples in (("zram (b)", [z["b"] for z in zram]), ("zram (c)", [zram[0]["c"]])):
        print(f"{label:18s} {median_cell([x[0] for x in samples])} "
              f"{median_cell([x[1] for x in samples])}")
    ublk_c, mm = first["ublk_c"], zram[0]["mm"]
    print(f"\nublkzswap (c): compr_data_size {ublk_c['compr_data_size'] / MIB:.1f} MiB, "
          f"mem_used_total {ublk_c['mem_used_total'] / MIB:.1f} MiB; "
          f"zram (c): compr {int(mm[1]) / MIB:.1f} MiB, mem_used_total {int(mm[2]) / MIB:.1f} MiB")
    mi_a, mi_b = last["a"][2], last["b"][2]
    print("\nkernel-side deltas (b)-(a) of the last round, MiB: " + ", ".join(
        f"{k} {(mi_b[k] - mi_a[k]) / MIB:.1f}" for k in KERNEL_FIELDS if k in mi_a))
    fixed = statistics.median(u["b"][0] for u in ublk)
    zfixed = statistics.median(z["b"][0] for z in zram)
    grow = first["c"][0] - first["b"][0]
    with_stby = statistics.median(s["b"][0] for s in stby)
    print(f"fixed cost (b) used delta: {fixed / MIB:.1f} MiB = {fixed / max(zfixed, 1):.1f}x zram's "
          f"{zfixed / MIB:.1f} MiB (goal <= 32 MiB)")
    print(f"growth (c)-(b), round 1: {grow / MIB:.1f} MiB = "
          f"{grow / max(ublk_c['compr_data_size'], 1):.3f} x compr_data_size (goal <= 1.05)")
    print(f"with a standby kept: (b) {with_stby / MIB:.1f} MiB, "
          f"+{(with_stby - fixed) / MIB:.1f} MiB (goal: standby adds <= 8 MiB)")
    print("\nprocesses at (b), and at (b) with a standby, last round, MiB (USS: what the process "
          "alone costs, Private_Clean+Dirty):")
    for p, role, roll in last["procs_b"] + stby[-1]["procs"]:
        print(f"  {role:10s} pid {p:6d}  RSS {fmt_mib(roll.get('Rss', 0))}  PSS "
              f"{fmt_mib(roll.get('Pss', 0))}  USS {fmt_mib(roll['USS'])}")
    print("\ndaemon RSS / locked by mapping, MiB (a | b | c), round 1:")
    details = {k: first[k][4] for k in "abc"}
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
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (a), (b), (b) with a standby and zram's (b); (c) in the first")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds: {args.rounds} is not a positive number")
    if args.inside or os.path.exists("/dev/ublk-control"):
        return inside(args)
    from bench.vmrun import in_vm
    return in_vm("bench_mem.py", ["--rounds", str(args.rounds)], timeout=1200 + 600 * args.rounds,
                 mem=args.mem)


if __name__ == "__main__":
    sys.exit(main())
