#!/usr/bin/env python3
"""fio 4k random write / random read (QD32, io_uring, O_DIRECT) on zram and on ublkzswap's
targets, side by side, in ONE boot of the test VM (or natively where the kernel has ublk).

Prints IOPS (median and spread of N repetitions) and the ratio to zram measured in the same
run. Printed, not asserted: absolute numbers under TCG emulation mean nothing, ratios do.

    python3 bench/bench_fio.py                      # null, ram, ublkz-lzo, ublkz-lz4 vs zram
    python3 bench/bench_fio.py --targets null,ram --reps 5 --runtime 20
    python3 bench/bench_fio.py --targets zram,ublkz-lzo --queues 1,2,4 --numjobs 2

``--queues 1,2,4`` runs each ublk target once per queue count (ublkzswapd queues=N, shown as
TARGET/qN). blk-mq sends a CPU's I/O to one hardware queue, so a second queue only sees
requests when more than one CPU submits: give ``--numjobs`` (fio jobs, IOPS summed) as well.

Data: 3:1 compressible buffers (fio --buffer_compress_percentage=67), refilled per I/O, so
zram and the compressed target (ublkz-*) actually compress. Each repetition writes first, then reads the
same area back.
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

PY = os.path.realpath(sys.executable)
SIZE_MB = 256
ALL_TARGETS = ("zram", "null", "ram", "ublkz-lzo", "ublkz-lz4")


def fio_iops(dev: str, rw: str, runtime: int, size_mb: int, numjobs: int = 1) -> float:
    cmd = ["fio", "--name=b", f"--filename={dev}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
           f"--numjobs={numjobs}", "--group_reporting",
           "--ioengine=io_uring", "--direct=1", f"--size={size_mb}M", "--time_based",
           f"--runtime={runtime}", "--ramp_time=2", "--buffer_compress_percentage=67",
           "--buffer_compress_chunk=4096", "--refill_buffers", "--randrepeat=0",
           "--output-format=json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed on {dev}: {p.stderr[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = "write" if "write" in rw else "read"
    return float(job[side]["iops"])


class Zram:
    name = "zram"

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


class Ublk:
    def __init__(self, name: str, queues: int = 1):
        self.name = name
        kind, _, comp = name.partition("-")        # ublkz-ALGO: the compressed target
        kind = "compressed" if kind == "ublkz" else kind
        self.words = ["num_devices=1", f"disksize_kb={SIZE_MB * 1024}", f"target={kind}",
                      f"queues={queues}", "socket=/run/ublkzswap-bench.sock"] + \
            ([f"compressor={comp}"] if comp else [])

    def __enter__(self):
        from tests.kernel.daemonctl import start
        self.pid, _ = start(*self.words)
        return "/dev/ublkb0"

    def __exit__(self, *exc):
        from tests.kernel.daemonctl import stop, wait_gone
        stop(self.pid)
        wait_gone()


def inside(args) -> int:
    results: dict[str, dict[str, list[float]]] = {}
    runs = []
    for name in args.targets:
        if name == "zram":
            runs.append((name, Zram()))
            continue
        for q in args.queues:
            label = name if args.queues == [1] else f"{name}/q{q}"
            runs.append((label, Ublk(name, q)))
    for name, ctx in runs:
        results[name] = {"randwrite": [], "randread": []}
        for rep in range(args.reps):
            with ctx as dev:
                for rw in ("randwrite", "randread"):
                    iops = fio_iops(dev, rw, args.runtime, SIZE_MB, args.numjobs)
                    results[name][rw].append(iops)
                    print(f"  {name:10s} rep {rep + 1} {rw:9s} {iops:10.0f} IOPS", flush=True)
    print()
    print(f"fio 4k QD32 x {args.numjobs} job(s) io_uring direct, 3:1 compressible, {args.reps} "
          f"reps x {args.runtime}s, {os.cpu_count()} CPUs, kernel {os.uname().release}")
    print(f"{'target':14s} {'write IOPS':>20s} {'read IOPS':>20s} {'write/zram':>11s} {'read/zram':>10s}")
    ref = results.get("zram")
    for name, r in results.items():
        cells = []
        for rw in ("randwrite", "randread"):
            v = r[rw]
            spread = f"{min(v):.0f}-{max(v):.0f}"
            cells.append(f"{statistics.median(v):8.0f} ({spread:>10s})")
        ratios = []
        for rw in ("randwrite", "randread"):
            if ref:
                ratios.append(statistics.median(r[rw]) / statistics.median(ref[rw]))
        rs = "".join(f"{x:11.2f}" for x in ratios) if ratios else ""
        print(f"{name:14s} {cells[0]:>20s} {cells[1]:>20s}{rs}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma list of {', '.join(ALL_TARGETS)} (zram is the reference)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=15, help="seconds per fio run")
    ap.add_argument("--queues", default="1",
                    help="comma list of queue counts for the ublk targets (ublkzswapd queues=N)")
    ap.add_argument("--numjobs", type=int, default=1,
                    help="fio jobs (submitting from several CPUs: what reaches several queues)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        args.queues = [int(q) for q in args.queues.split(",") if q]
    except ValueError:
        ap.error(f"--queues: '{args.queues}' is not a comma list of numbers")
    args.targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad:
        ap.error(f"unknown target(s): {', '.join(bad)}")
    if args.inside or os.path.exists("/dev/ublk-control"):
        return inside(args)
    budget = len(args.targets) * len(args.queues) * args.reps * (2 * (args.runtime + 2) + 40) + 300
    from bench.vmrun import in_vm
    return in_vm("bench_fio.py", ["--targets", ",".join(args.targets), "--reps", str(args.reps),
                                  "--runtime", str(args.runtime),
                                  "--queues", ",".join(map(str, args.queues)),
                                  "--numjobs", str(args.numjobs)], timeout=budget)


if __name__ == "__main__":
    sys.exit(main())
