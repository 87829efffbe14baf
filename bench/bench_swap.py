#!/usr/bin/env python3
"""zram against ublkzswap as swap, in ONE boot of the test VM (or natively where the kernel has
ublk): the same fio jobs and the same swap workload on each, printed side by side and as ratios
to zram. Printed, not asserted.

- fio: 4k random write then random read, QD32, io_uring, O_DIRECT, on a 256 MiB device,
  with 3:1 compressible data and with zero data;
- swap: ``tools/swapload.py`` pushing about 1.5x the guest's RAM through the swap device
  (mixed zero / same-filled / text / random pages, every page verified), wall time;
- memory: mem_used_total / orig_data_size after the swap fill (zram: mm_stat), and
  mem_used_total / compr_data_size after an fio fill of the 256 MiB device.

    python3 bench/bench_swap.py [--reps 2] [--runtime 10] [--targets zram,ublkz-lzo,ublkz-lz4]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.bench_fio import CLK_TCK, cpu_ticks, queue_threads  # noqa: E402
from tests.kernel.daemonctl import block_stat  # noqa: E402

PY = os.path.realpath(sys.executable)
SOCK = "/run/ublkzswap-bench.sock"
FIO_MB = 256
TARGETS = ("zram", "ublkz-lzo", "ublkz-lz4")
MIX = "zero=50,same=15,text=32,random=3"


def fill(dev: str) -> None:
    """The whole device written once with 3:1 data, sequentially."""
    subprocess.run(["fio", "--name=fill", f"--filename={dev}", "--rw=write", "--bs=256k",
                    "--iodepth=8", "--ioengine=io_uring", "--direct=1", f"--size={FIO_MB}M",
                    "--buffer_compress_percentage=67", "--buffer_compress_chunk=4096",
                    "--refill_buffers", "--output-format=terse"],
                   check=True, capture_output=True, timeout=3600)


def fio(dev: str, rw: str, runtime: int, data: str, partial: bool = False) -> float:
    """IOPS of a 4k QD32 run; ``partial``: random overwrites of about half the device with
    repeats (no random map), which leaves holes everywhere, unlike one full pass."""
    extra = (["--buffer_compress_percentage=67", "--buffer_compress_chunk=4096", "--refill_buffers"]
             if data == "3:1" else ["--zero_buffers"])
    cmd = ["fio", "--name=b", f"--filename={dev}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
           "--ioengine=io_uring", "--direct=1", f"--size={FIO_MB}M", "--randrepeat=0",
           "--output-format=json", *extra]
    if partial:
        cmd += ["--norandommap", f"--io_size={FIO_MB // 2}M"]
    cmd += ["--time_based", f"--runtime={runtime}"] if rw == "randread" else []
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 20 + 600)
    if p.returncode != 0:
        raise RuntimeError(f"fio {rw} on {dev}: {p.stderr[-400:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    return float(job["write" if "write" in rw else "read"]["iops"])


class Zram:
    def __init__(self, name, algorithm: str = "lz4"):
        """``algorithm``: zram's compressor, or a comma-separated preference list (the first
        this kernel offers wins; none offered: its default). :attr:`used` says which."""
        self.name = name
        self.algorithm = algorithm
        self.used = ""

    def up(self, size_mb: int) -> str:
        if not os.path.exists("/sys/block/zram0"):
            if os.path.exists("/sys/class/zram-control/hot_add"):
                open("/sys/class/zram-control/hot_add").read()
            else:
                subprocess.run(["modprobe", "zram", "num_devices=1"], check=True)
        self._w("reset", "1")
        text = open("/sys/block/zram0/comp_algorithm").read()
        offered = text.replace("[", " ").replace("]", " ").split()
        pick = next((a for a in self.algorithm.split(",") if a in offered), None)
        if pick:
            self._w("comp_algorithm", pick)
        self.used = pick or text[text.index("[") + 1:text.index("]")]
        self._w("disksize", f"{size_mb}M")
        return "/dev/zram0"

    def _w(self, attr, val):
        with open(f"/sys/block/zram0/{attr}", "w") as f:
            f.write(val)

    def mem(self) -> dict:
        f = open("/sys/block/zram0/mm_stat").read().split()
        return {"orig_data_size": int(f[0]), "compr_data_size": int(f[1]),
                "mem_used_total": int(f[2]), "same_pages": int(f[5]),
                "pages_stored": int(f[0]) // 4096}

    def compact(self):
        self._w("compact", "1")

    def down(self):
        self._w("reset", "1")


class Ublk:
    """ublkzswapd as a target named ``ublkz-COMPRESSOR[:param=value...]`` (the daemon's own
    parameters after the colons, e.g. ``ublkz-lzo:slot_free=on``)."""

    def __init__(self, name):
        self.name = name
        kind, *self.params = name.split(":")
        self.comp = kind.partition("-")[2]

    def up(self, size_mb: int) -> str:
        from tests.kernel.daemonctl import start
        self.pid, _ = start("num_devices=1", f"disksize_kb={size_mb * 1024}",
                            f"compressor={self.comp}", f"socket={SOCK}", *self.params)
        return "/dev/ublkb0"

    def mem(self) -> dict:
        p = subprocess.run([PY, "-m", "ublkzswap.cli", "/dev/ublkb0", "--json", "--socket", SOCK],
                           capture_output=True, text=True, check=True)
        return json.loads(p.stdout)

    def compact(self):
        subprocess.run([PY, "-m", "ublkzswap.cli", "/dev/ublkb0", "--compact", "--socket", SOCK],
                       capture_output=True, text=True, check=True)

    def down(self):
        from tests.kernel.daemonctl import stop, wait_gone
        stop(self.pid)
        wait_gone()


def mem_total_mib() -> int:
    from tools.swapload import mem_total_mib as m
    return m()


def kernel_used_pages(dev: str) -> int:
    """Swap slots the kernel holds on ``dev`` (/proc/swaps Used, in pages)."""
    for line in open("/proc/swaps").read().splitlines()[1:]:
        f = line.split()
        if os.path.realpath(f[0]) == os.path.realpath(dev):
            return int(f[3]) // 4
    return 0


@contextlib.contextmanager
def swapped_on(t, size_mb: int):
    """Target ``t``'s device of ``size_mb`` MiB up and swapped on (with discard); swapped off
    and taken down again after, whatever happened."""
    dev = t.up(size_mb)
    try:
        if t.name == "zram":
            subprocess.run(["mkswap", dev], check=True, capture_output=True)
        subprocess.run(["swapon", "--discard", dev], check=True)
        yield dev
    finally:
        if dev in open("/proc/swaps").read():
            subprocess.run(["swapoff", dev], timeout=1800)
        t.down()


def swapload(mib: int, passes: int, mix: str) -> subprocess.Popen:
    """tools/swapload.py started quietly (every page it reads back is verified)."""
    return subprocess.Popen([PY, os.path.join(ROOT, "tools", "swapload.py"), "--mib", str(mib),
                             "--passes", str(passes), "--mix", mix, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def swap_run(t, mib: int) -> tuple[float, dict, bool, float]:
    """(wall s, memory stats, verified, stale share): the stale share is the largest fraction
    of what the device stores that belongs to slots the kernel has already freed, sampled
    while the workload runs (a lower bound: slots of zero pages hold no data)."""
    with swapped_on(t, 3 * mib) as dev:
        t0 = time.monotonic()
        load = swapload(mib, 2, MIX)
        stale = 0.0
        while load.poll() is None:
            time.sleep(5)
            m = t.mem()
            stored = m["pages_stored"] + m.get("zero_pages", 0)
            if stored > 1000:
                stale = max(stale, (stored - kernel_used_pages(dev)) / stored)
        load.communicate(timeout=3600)
        secs = time.monotonic() - t0
        m = t.mem()
        m.update(request_pages(dev))
        if hasattr(t, "pid"):
            m["daemon_cpu_s"] = cpu_ticks(f"/proc/{t.pid}/stat") / CLK_TCK   # all its threads
            m["queue_cpu_s"] = queue_threads(t.pid)["ticks"] / CLK_TCK         # its queues'
        subprocess.run(["swapoff", dev], check=True, timeout=1800)
        return secs, m, load.returncode == 0, stale


def request_pages(dev: str) -> dict:
    """The block layer's mean request size on ``dev`` in pages, reads and writes."""
    f = block_stat(dev)
    return {"read_req_pages": f[2] / 8 / max(f[0], 1), "write_req_pages": f[6] / 8 / max(f[4], 1)}


def fio_runs(t, r: dict, args) -> None:
    """The fio part of one rep on target ``t``: 3:1 data (random overwrites, compaction) and
    zero data, each on a fresh device; results appended to ``r``."""
    dev = t.up(FIO_MB)
    try:
        fill(dev)
        r["w31"].append(fio(dev, "randwrite", args.runtime, "3:1"))
        fio(dev, "randwrite", args.runtime, "3:1", partial=True)
        m = t.mem()
        if m["compr_data_size"]:
            r["fio_mem"].append(m["mem_used_total"] / m["compr_data_size"])
        t.compact()
        m = t.mem()
        if m["compr_data_size"]:
            r["fio_mem_c"].append(m["mem_used_total"] / m["compr_data_size"])
        r["r31"].append(fio(dev, "randread", args.runtime, "3:1"))
    finally:
        t.down()
    dev = t.up(FIO_MB)
    try:
        r["w0"].append(fio(dev, "randwrite", args.runtime, "zero"))
        r["r0"].append(fio(dev, "randread", args.runtime, "zero"))
    finally:
        t.down()


def inside(args) -> int:
    mib = int(mem_total_mib() * 1.5)
    res: dict[str, dict] = {}
    for name in args.targets:
        t = Zram(name) if name == "zram" else Ublk(name)
        r = res[name] = {"w31": [], "r31": [], "w0": [], "r0": [], "swap_s": [], "swap_mem": [],
                         "fio_mem": [], "fio_mem_c": [], "stale": [], "failed": [], "ok": True}
        for rep in range(args.reps):
            if args.swap_only:
                for k in ("w31", "r31", "w0", "r0"):
                    r[k].append(float("nan"))
            else:
                fio_runs(t, r, args)
            secs, m, ok, stale = swap_run(t, mib)
            r["swap_s"].append(secs)
            r["stale"].append(stale)
            r["swap_mem"].append(m["mem_used_total"] / max(m["orig_data_size"], 1))
            r["ok"] &= ok
            if "num_writes" in m:           # ublkzswap: swap-outs that found no memory ready
                r["failed"].append(m.get("failed_writes", 0) / max(m["num_writes"], 1))
            print(f"  {name:10s} rep {rep + 1}: fio3:1 w {r['w31'][-1]:.0f} r {r['r31'][-1]:.0f}  "
                  f"zero w {r['w0'][-1]:.0f} r {r['r0'][-1]:.0f} IOPS; swap {secs:.0f}s "
                  f"({'verified' if ok else 'FAILED'}), mem/orig {r['swap_mem'][-1]:.3f}, "
                  f"stale {stale:.3f}; fio overwritten mem/compr "
                  f"{r['fio_mem'][-1] if r['fio_mem'] else float('nan'):.3f} -> "
                  f"{r['fio_mem_c'][-1] if r['fio_mem_c'] else float('nan'):.3f} compacted"
                  + (f"; failed writes {r['failed'][-1]:.4f} of all" if r["failed"] else "")
                  + (f" (pool misses {m['pool_misses']}, growth deferred {m['growth_deferred']})"
                     if "pool_misses" in m else "")
                  + f"; pages a request: read {m['read_req_pages']:.2f} write "
                    f"{m['write_req_pages']:.2f}"
                  + (f"; daemon CPU {m['daemon_cpu_s']:.0f} s (queues {m['queue_cpu_s']:.0f} s), "
                     f"{m['daemon_cpu_s'] * 1e6 / max(m['num_reads'] + m['num_writes'], 1):.0f} us "
                     f"a page ({m['num_reads']} read, {m['num_writes']} written)"
                     if "daemon_cpu_s" in m else ""),
                  flush=True)

    def med(v):
        return statistics.median(v) if v else float("nan")

    def cell(v, fmt="{:.0f}"):
        if not v:
            return "-"
        return f"{fmt.format(med(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"

    print()
    print(f"guest RAM {mem_total_mib()} MiB, swap workload {mib} MiB ({MIX}), fio {FIO_MB} MiB, "
          f"{args.reps} reps, kernel {os.uname().release}; median (min-max)")
    cols = [("w31", "4k randwrite 3:1"), ("r31", "4k randread 3:1"), ("w0", "4k randwrite zero"),
            ("r0", "4k randread zero"), ("swap_s", "swap wall s"), ("swap_mem", "swap mem/orig"),
            ("stale", "stale share"), ("fio_mem", "overwritten mem/compr"),
            ("fio_mem_c", "  after compaction")]
    ref = res.get("zram")
    for key, label in cols:
        fmt = "{:.3f}" if "mem" in key or key == "stale" else "{:.0f}"
        line = f"{label:18s}"
        for name in res:
            line += f" {name}: {cell(res[name][key], fmt):>24s}"
            if ref and name != "zram" and res[name][key] and ref[key] and med(ref[key]):
                line += f" [{med(res[name][key]) / med(ref[key]):.2f}x]"
        print(line)
    print("all swap runs verified" if all(r["ok"] for r in res.values()) else "SOME SWAP RUN FAILED")
    return 0 if all(r["ok"] for r in res.values()) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio read run")
    ap.add_argument("--mem", type=int, default=512, help="guest RAM in MiB")
    ap.add_argument("--swap-only", action="store_true", help="the swap workload alone, no fio")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    if any(t not in TARGETS for t in args.targets):
        ap.error(f"targets are {', '.join(TARGETS)}")
    if args.inside or os.path.exists("/dev/ublk-control"):
        return inside(args)
    from bench.vmrun import in_vm
    return in_vm("bench_swap.py", ["--targets", ",".join(args.targets), "--reps", str(args.reps),
                                   "--runtime", str(args.runtime)]
                 + (["--swap-only"] if args.swap_only else []), timeout=10800, mem=args.mem)


if __name__ == "__main__":
    sys.exit(main())
