#!/usr/bin/env python3
"""The small machine, zram against ublkzswap in ONE boot of the test VM: RAM locked away down to
what a 384 MiB machine has, a 1 GiB swap device, the footprint issue's 512 MiB checksummed
workload (zero 25%, same-filled 10%, text 50%, random 15%; every page verified). Every 3 s it
samples how much the device stores and the memory it uses, so that data kept for swap slots
the kernel has freed (stale slots: ublk is told only when a whole cluster is free) shows
beside zram, which is told of every freed slot (zram with LZO where this kernel offers it,
else its default), and how much of what ublkzswap stores is shared with a stored twin
(dup_data_size: deduplication). Printed, not asserted.

Each sample also reads the kernel's side: the slots it holds on the device (/proc/swaps) and
the pages that are resident again but keep their slot (SwapCached). What the device stores
beyond the slots held is stale (freed slots, not yet discarded); what it stores for swap-cached
pages is a second copy of a resident page. zram has neither: it hears of every freed slot, and
as a synchronous device its swap-ins skip the swap cache and free the slot. The sample of
the most slots held is split that way (an OOM kill frees the victim's slots at once, before
the device hears of them: a later sample would count them all as stale).

With ``--profile`` (needs ``py-spy`` from PyPI on the host: ``pip install py-spy``) the
daemon is sampled through the whole workload, without stopping it (``--nonblocking``: a swap
daemon stopped under this pressure could take the machine with it), and the wall time of each
of its threads is split by the innermost frame of ours it was in.

    python3 bench/bench_small.py [--mib 384] [--targets zram,ublkz-lzo] [--disk-mb 1024] [--profile]
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.bench_swap import SOCK, Ublk, Zram, kernel_used_pages, swapload, swapped_on  # noqa: E402
from ublkzswap.control import Client  # noqa: E402
from tools.swapload import parse_mix  # noqa: E402

WORKLOAD_MIB = 512
MIX = "zero=25,same=10,text=50,random=15"
DISK_MB = 1024
# the workload's pages that are not all zero (the kernel keeps those out of the device)
NONZERO_MIB = WORKLOAD_MIB * (100 - parse_mix(MIX)["zero"]) // 100


def oom_adj(value: int) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


def swap_cached_mib() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("SwapCached:"):
            return int(line.split()[1]) >> 10
    return 0


SPY_OUT = "/tmp/bench_small.spy"
SPY_RATE = 40          # samples a second


def spy_on(pid: int) -> subprocess.Popen:
    """py-spy sampling every thread of ``pid``, idle ones too, until it exits."""
    return subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--nonblocking",
                             "--pid", str(pid), "--rate", str(SPY_RATE), "--threads", "--idle",
                             "--format", "raw", "-o", SPY_OUT], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def spy_report(path: str = SPY_OUT, top: int = 12) -> None:
    """Each thread's share of the samples, and its top innermost frames of ours
    (``ublkzswap/``; a frame elsewhere, e.g. a wait in ``threading``, by its own name)."""
    per = collections.defaultdict(collections.Counter)
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        ours = [f for f in frames[1:] if "ublkzswap/" in f]
        per[frames[0]][ours[-1] if ours else frames[-1]] += int(n)
    for thread, frames in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(frames.values())
        print(f"  {thread}: {total / SPY_RATE:.0f} s sampled")
        for frame, n in frames.most_common(top):
            print(f"    {100 * n / total:5.1f}%  {frame}")


def run_one(t, mib: int, profile: bool = False, disk_mb: int = DISK_MB) -> dict:
    from tests.kernel.test_memory import machine_of
    with swapped_on(t, disk_mb) as dev:
        spy = spy_on(t.pid) if profile and hasattr(t, "pid") else None
        peak = {"stored": 0, "mem": 0}
        most = None                       # the sample of the most slots held
        # ublkzswap's counters through a connection of this process: under this pressure a new
        # rzscontrol process takes tens of seconds to start
        mem = t.mem if t.name == "zram" else functools.partial(Client(SOCK).call, "stats", 0)
        with machine_of(mib):
            t0 = time.monotonic()
            load = swapload(WORKLOAD_MIB, 1, MIX)
            # this driver must outlive the OOM killer's choice to report it; the workload, its
            # child, keeps the adjustment it started with
            oom_adj(-1000)
            while load.poll() is None:
                time.sleep(3)
                try:
                    m = mem()
                except (OSError, subprocess.CalledProcessError):
                    continue
                # pages held, same-filled ones included: both count them in pages_stored
                # (zram since its same-page path joins the write's end, ours as compcache)
                stored = (m["pages_stored"] * 4096) >> 20
                slots = (kernel_used_pages(dev) * 4096) >> 20
                cached = swap_cached_mib()
                if most is None or slots >= most["slots"]:   # (a kill frees slots at once)
                    most = dict(stored=stored, slots=slots, cached=cached,
                                mem=m["mem_used_total"] >> 20)
                peak["stored"] = max(peak["stored"], stored)
                peak["mem"] = max(peak["mem"], m["mem_used_total"] >> 20)
                shared = (f" compr {m['compr_data_size'] >> 20:4d} MiB" if "pool_misses" not in m
                          else f" compr {m['compr_data_size'] >> 20:4d} MiB shared "
                          f"{m['dup_data_size'] >> 20:4d} MiB writes failed "
                          f"{m['failed_writes']}/{m['num_writes']} (pool misses "
                          f"{m['pool_misses']}, growth deferred {m['growth_deferred']})")
                print(f"  {t.name:10s} t={time.monotonic() - t0:5.0f}s stored {stored:4d} MiB "
                      f"mem_used_total {m['mem_used_total'] >> 20:4d} MiB{shared} | kernel: slots "
                      f"{slots:4d} MiB swap-cached {cached:4d} MiB", flush=True)
            out = load.communicate()[0]
            secs = time.monotonic() - t0
            oom_adj(0)
        if spy is not None:
            spy.send_signal(2)          # py-spy writes what it has and exits
            spy.wait(60)
            print(f"  {t.name}: where the daemon's threads were, {SPY_RATE} samples a second:")
            spy_report()
    verdict = ("verified" if load.returncode == 0 and "MISMATCH" not in out
               else "OOM-killed" if load.returncode == -9 else f"failed ({load.returncode})")
    return dict(secs=secs, verdict=verdict, algorithm=getattr(t, "used", ""), most=most, **peak)


def inside(args) -> int:
    res = {}
    for name in args.targets:
        # both with LZO: the same compressor, so the difference is the devices'
        t = Zram(name, algorithm="lzo,lzo-rle") if name == "zram" else Ublk(name)
        res[name] = run_one(t, args.mib, args.profile, args.disk_mb)
    print(f"\n{args.mib} MiB machine, {WORKLOAD_MIB} MiB workload ({MIX}), {args.disk_mb} MiB device:")
    for name, r in res.items():
        label = f"zram/{r['algorithm']}" if name == "zram" else name
        print(f"  {label:10s} {r['verdict']:12s} {r['secs']:6.0f} s  peak stored {r['stored']:4d} MiB  "
              f"peak mem_used_total {r['mem']:4d} MiB")
    z = res.get("zram")
    for name, r in res.items():
        if z is not None and name != "zram" and z["stored"] and z["mem"]:
            print(f"  {name} / zram: peak stored {r['stored'] / z['stored']:.2f}x, peak "
                  f"mem_used_total {r['mem'] / z['mem']:.2f}x (the surplus stored is data of "
                  "slots the kernel freed)")
    print("  the sample of the most slots held, split (MiB of pages; slots count the workload's "
          "all-zero pages, which the device never sees, so stale is a lower bound):")
    for name, r in res.items():
        x = r["most"]
        if not x:
            continue
        stale = max(x["stored"] - x["slots"], 0)
        print(f"    {name:10s} stored {x['stored']:4d} in {x['mem']:4d}: stale >= {stale:4d}, "
              f"for swap-cached pages <= {min(x['cached'], x['stored'] - stale):4d}, "
              f"the rest {max(x['stored'] - stale - x['cached'], 0):4d}")
    print(f"  (the workload has {NONZERO_MIB} MiB of non-zero pages; other processes' pages swap "
          "out too)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="zram,ublkz-lzo")
    ap.add_argument("--mib", type=int, default=384, help="the small machine's RAM in MiB")
    ap.add_argument("--disk-mb", type=int, default=DISK_MB,
                    help="the swap device's size (more than twice the slots the kernel uses keeps "
                    "it below vm_swap_full(), where every swap-in frees its slot)")
    ap.add_argument("--profile", action="store_true",
                    help="sample the daemon with py-spy through the workload (pip install py-spy)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    if args.inside or os.path.exists("/dev/ublk-control"):
        return inside(args)
    from bench.vmrun import in_vm
    return in_vm("bench_small.py", ["--targets", ",".join(args.targets), "--mib", str(args.mib),
                                    "--disk-mb", str(args.disk_mb)]
                 + ["--profile"] * args.profile, timeout=5400, mem=512)


if __name__ == "__main__":
    sys.exit(main())
