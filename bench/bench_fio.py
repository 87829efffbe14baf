#!/usr/bin/env python3
"""fio 4k random write / random read on zram and on ublkzswap's targets, side by side, in ONE
boot of the test VM (or natively where the kernel has ublk).

Prints, per target, the median (and spread) of N interleaved rounds: IOPS at QD32, mean
completion latency at QD1, their ratios to zram measured in the same run, and for ublkzswap's
targets what the daemon spends: its queue threads' CPU time per request (utime + stime from
/proc/PID/task/TID/stat) and requests per wake-up (requests over the queue threads' voluntary
context switches, each wait in io_uring_enter being one; GIL waits count too, so it is a lower
bound). Printed, not asserted: absolute numbers under TCG emulation mean nothing, ratios do.

    python3 bench/bench_fio.py                      # every target, zram the reference
    python3 bench/bench_fio.py --targets zram,ublkz-lzo --reps 3
    python3 bench/bench_fio.py --targets zram,ublkz-lzo --queues 1,2 --numjobs 2 --depths 32

Targets: ``zram`` (lz4: this kernel's zram has no lzo), ``null_blk`` (the kernel's own no-op
block device: what any block device costs), ublkzswapd's ``null`` and ``ram`` targets (what
ublk and the daemon's loop cost without compression) and ``ublkz-lzo`` / ``ublkz-lz4`` (the
compressed target with that compressor).

``--queues 1,2,4`` runs each ublk target once per queue count (ublkzswapd queues=N, shown as
TARGET/qN). blk-mq sends a CPU's I/O to one hardware queue, so a second queue only sees
requests when more than one CPU submits: give ``--numjobs`` (fio jobs, IOPS summed) as well.

Data: 3:1 compressible buffers (fio --buffer_compress_percentage=67), refilled per I/O, so
zram and the compressed target actually compress. Each round starts every target afresh,
writes first, then reads the same area back; rounds interleave the targets, so a slow spell
of the host falls on all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.kernel.daemonctl import block_stat  # noqa: E402

PY = os.path.realpath(sys.executable)
SIZE_MB = 256
ALL_TARGETS = ("zram", "null_blk", "null", "ram", "ublkz-lzo", "ublkz-lz4")
RWS = ("randwrite", "randread")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def fio(dev: str, rw: str, runtime: int, size_mb: int, depth: int, numjobs: int = 1) -> dict:
    """One fio run; {"iops", "lat_us" (mean completion latency)}."""
    cmd = ["fio", "--name=b", f"--filename={dev}", f"--rw={rw}", "--bs=4k",
           f"--iodepth={depth}", f"--numjobs={numjobs}", "--group_reporting",
           "--ioengine=io_uring", "--direct=1", f"--size={size_mb}M", "--time_based",
           f"--runtime={runtime}", "--ramp_time=2", "--buffer_compress_percentage=67",
           "--buffer_compress_chunk=4096", "--refill_buffers", "--randrepeat=0",
           "--output-format=json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed on {dev}: {p.stderr[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"iops": float(side["iops"]), "lat_us": float(side["clat_ns"]["mean"]) / 1000}


def disk_requests(dev: str) -> int:
    """Reads + writes the block layer completed on ``dev``."""
    f = block_stat(dev)
    return f[0] + f[4]


def cpu_ticks(stat_path: str) -> int:
    """utime + stime of a /proc/PID/stat or /proc/PID/task/TID/stat file, in clock ticks."""
    stat = open(stat_path).read()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def queue_threads(pid: int) -> dict[str, int]:
    """The daemon's queue threads (comm ublkqD:Q), summed: CPU ticks and voluntary switches."""
    out = {"ticks": 0, "waits": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if not open(f"/proc/{pid}/task/{tid}/comm").read().startswith("ublkq"):
                continue
            out["ticks"] += cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
            for line in open(f"/proc/{pid}/task/{tid}/status"):
                if line.startswith("voluntary_ctxt_switches:"):
                    out["waits"] += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


class Zram:
    name = "zram"
    pid = None

    def __enter__(self):
        if not os.path.exists("/sys/block/zram0"):
            if os.path.exists("/sys/class/zram-control/hot_add"):
                open("/sys/class/zram-control/hot_add").read()
            else:
                subprocess.run(["modprobe", "zram", "num_devices=1"], check=True)
        with open("/sys/block/zram0/reset", "w") as f:
            f.write("1")
        with open("/sys/block/zram0/comp_algorithm", "w") as f:
            f.write("lz4")
        with open("/sys/block/zram0/disksize", "w") as f:
            f.write(f"{SIZE_MB}M")
        return "/dev/zram0"

    def __exit__(self, *exc):
        with open("/sys/block/zram0/reset", "w") as f:
            f.write("1")


class NullBlk:
    """The kernel's null_blk: blk-mq, no interrupt emulation, nothing stored."""
    name = "null_blk"
    pid = None

    def __enter__(self):
        if not os.path.exists("/dev/nullb0"):
            args = ["nr_devices=1", "queue_mode=2", "irqmode=0", f"gb={max(1, SIZE_MB // 1024)}",
                    "bs=4096"]
            mods = os.environ.get("UBLKZSWAP_VM_MODULES")
            if mods and os.path.exists(f"{mods}/null_blk.ko"):
                if not os.path.isdir("/sys/module/configfs"):        # null_blk's dependency
                    subprocess.run(["busybox", "insmod", f"{mods}/configfs.ko"], check=True)
                subprocess.run(["busybox", "insmod", f"{mods}/null_blk.ko", *args], check=True)
            else:
                subprocess.run(["modprobe", "null_blk", *args], check=True)
        return "/dev/nullb0"

    def __exit__(self, *exc):
        pass


class Ublk:
    def __init__(self, name: str, queues: int = 1):
        self.name = name
        kind, _, comp = name.partition("-")        # ublkz-ALGO: the compressed target
        kind = "compressed" if kind == "ublkz" else kind
        self.words = ["num_devices=1", f"disksize_kb={SIZE_MB * 1024}", f"target={kind}",
                      f"queues={queues}", "socket=/run/ublkzswap-bench.sock"] + \
            ([f"compressor={comp}"] if comp else [])
        self.pid = None

    def __enter__(self):
        from tests.kernel.daemonctl import start
        self.pid, _ = start(*self.words)
        return "/dev/ublkb0"

    def __exit__(self, *exc):
        from tests.kernel.daemonctl import stop, wait_gone
        stop(self.pid)
        wait_gone()
        self.pid = None


def measure(ctx, dev: str, rw: str, depth: int, args) -> dict:
    """fio on ``dev`` with, for a ublk target, the queue threads' CPU and wake-ups per request."""
    before = queue_threads(ctx.pid) if ctx.pid else None
    n0 = disk_requests(dev)
    r = fio(dev, rw, args.runtime, SIZE_MB, depth, args.numjobs)
    if before is not None:
        after = queue_threads(ctx.pid)
        n = max(disk_requests(dev) - n0, 1)
        r["cpu_us"] = (after["ticks"] - before["ticks"]) / CLK_TCK * 1e6 / n
        r["per_wake"] = n / max(after["waits"] - before["waits"], 1)
    return r


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def inside(args) -> int:
    runs = []
    for name in args.targets:
        if name == "zram":
            runs.append((name, Zram()))
        elif name == "null_blk":
            runs.append((name, NullBlk()))
        else:
            for q in args.queues:
                label = name if args.queues == [1] else f"{name}/q{q}"
                runs.append((label, Ublk(name, q)))
    # results[target][(depth, rw)] = [{"iops", "lat_us", ...}, ...]
    results: dict[str, dict[tuple[int, str], list[dict]]] = {n: {} for n, _ in runs}
    for rnd in range(args.reps):
        for name, ctx in runs:
            with ctx as dev:
                for depth in args.depths:
                    for rw in RWS:
                        r = measure(ctx, dev, rw, depth, args)
                        results[name].setdefault((depth, rw), []).append(r)
                        extra = (f"  daemon {r['cpu_us']:7.1f} us CPU/req, {r['per_wake']:5.2f} "
                                 "req/wake-up" if "cpu_us" in r else "")
                        print(f"  round {rnd + 1} {name:12s} QD{depth:<3d}{rw:9s} "
                              f"{r['iops']:9.0f} IOPS {r['lat_us']:9.1f} us{extra}", flush=True)
    print()
    print(f"fio 4k x {args.numjobs} job(s), io_uring, O_DIRECT, 3:1 compressible, {args.reps} "
          f"interleaved rounds x {args.runtime}s, {os.cpu_count()} CPUs, kernel "
          f"{os.uname().release}; medians (spread); ratios to zram in the same run")
    ref = results.get("zram")
    for depth in args.depths:
        key = "iops" if depth > 1 else "lat_us"
        unit = "IOPS" if depth > 1 else "mean latency us"
        print(f"\nQD{depth}: {unit}" + ("  (lower is better)" if depth == 1 else ""))
        print(f"{'target':14s} {'write':>22s} {'read':>22s} {'w/zram':>7s} {'r/zram':>7s}"
              f" {'CPU us/req w':>13s} {'r':>6s} {'req/wake w':>11s} {'r':>5s}")
        for name, res in results.items():
            cells, ratios, cpu, wake = [], [], [], []
            for rw in RWS:
                rs = res.get((depth, rw), [])
                v = [r[key] for r in rs]
                cells.append(f"{med(v):9.1f} ({min(v):.0f}-{max(v):.0f})" if v else "-")
                if ref and v:
                    ratios.append(med(v) / med([r[key] for r in ref[(depth, rw)]]))
                cpu.append(med([r["cpu_us"] for r in rs if "cpu_us" in r]))
                wake.append(med([r["per_wake"] for r in rs if "per_wake" in r]))
            rt = "".join(f"{x:8.2f}" for x in ratios)
            daemon = (f" {cpu[0]:13.1f} {cpu[1]:6.1f} {wake[0]:11.2f} {wake[1]:5.2f}"
                      if cpu[0] == cpu[0] else "")
            print(f"{name:14s} {cells[0]:>22s} {cells[1]:>22s}{rt}{daemon}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma list of {', '.join(ALL_TARGETS)} (zram is the reference)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=15, help="seconds per fio run")
    ap.add_argument("--queues", default="1",
                    help="comma list of queue counts for the ublk targets (ublkzswapd queues=N)")
    ap.add_argument("--depths", default="32,1",
                    help="comma list of fio queue depths (QD1 reports mean latency)")
    ap.add_argument("--numjobs", type=int, default=1,
                    help="fio jobs (submitting from several CPUs: what reaches several queues)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for opt in ("queues", "depths"):
        text = getattr(args, opt)
        try:
            setattr(args, opt, [int(q) for q in text.split(",") if q])
        except ValueError:
            ap.error(f"--{opt}: '{text}' is not a comma list of numbers")
        if not getattr(args, opt) or min(getattr(args, opt)) < 1:
            ap.error(f"--{opt}: '{text}' names no positive number")
    args.targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad:
        ap.error(f"unknown target(s): {', '.join(bad)}")
    if args.inside or os.path.exists("/dev/ublk-control"):
        return inside(args)
    budget = (len(args.targets) * len(args.queues) * args.reps
              * (2 * len(args.depths) * (args.runtime + 2) + 40) + 300)
    from bench.vmrun import in_vm
    return in_vm("bench_fio.py", ["--targets", ",".join(args.targets), "--reps", str(args.reps),
                                  "--runtime", str(args.runtime),
                                  "--queues", ",".join(map(str, args.queues)),
                                  "--depths", ",".join(map(str, args.depths)),
                                  "--numjobs", str(args.numjobs)], timeout=budget)


if __name__ == "__main__":
    sys.exit(main())
