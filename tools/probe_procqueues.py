"""VM probe (diagnostic, not a test): can a device's queues be served by processes of their
own, and what would that pay? Issue 11's point 3: the GIL serialises a device's queue
threads; processes are the way past it, if the kernel lets them serve one device.

ublk refuses a descriptor-array mmap from a second process (``ub->mm``, set at the first
mmap). This probe maps every queue's array in the parent and forks one child per queue: the
child inherits the mappings and the char device's fd, makes its own ring and FETCHes its own
tags (``ubq_daemon`` is then that child). It compares, with fio 4k QD32 from two jobs:

- ``threads``: the daemon's way, one thread per queue in one process, one shared target;
- ``procs``: one process per queue, each with a target of its OWN (an upper bound for a
  shared store: nothing is shared, so a read may miss what another queue wrote; fio does not
  verify here);
- ``1q``: one queue, the reference.

Targets: ``null`` (nothing stored: the ring and the loop alone) and ``lzo`` (a Store).

Run:  python3 -m tools.vm run --mem 1024 --timeout 1800 -- python3 tools/probe_procqueues.py
"""
from __future__ import annotations

import faulthandler
import mmap
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_fio import disk_requests, fio                    # noqa: E402
from ublkzswap import uapi, ublkctrl                              # noqa: E402
from ublkzswap.memory import set_io_flusher                      # noqa: E402
from ublkzswap.queue import Queue, make_ring, open_cdev           # noqa: E402
from ublkzswap.target import NullTarget                           # noqa: E402
from ublkzswap.ublkdev import UblkDevice                          # noqa: E402

SIZE = 256 << 20
DEPTH, BUF = 64, 32 * 1024
RUNTIME = int(os.environ.get("PROBE_RUNTIME", "8"))
CLK = os.sysconf("SC_CLK_TCK")


def make_target(kind: str):
    if kind == "null":
        return NullTarget(SIZE)
    from ublkzswap.store import Store
    return Store(SIZE, compressor="lzo")


def cpu_ticks(pids) -> int:
    n = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            s = open(f"/proc/{pid}/task/{tid}/stat").read()
            f = s[s.rindex(")") + 2:].split()
            n += int(f[11]) + int(f[12])
    return n


def fio_pair(dev: str, pids) -> list[str]:
    out = []
    for rw in ("randwrite", "randread"):
        c0, n0 = cpu_ticks(pids), disk_requests(dev)
        r = fio(dev, rw, RUNTIME, SIZE >> 20, 32, numjobs=2)
        n = max(disk_requests(dev) - n0, 1)
        us = (cpu_ticks(pids) - c0) / CLK * 1e6 / n
        out.append(f"{rw} {r['iops']:7.0f} IOPS {us:6.0f} us CPU/req")
    return out


def run_threads(ctrl, kind: str, queues: int) -> list[str]:
    dev = UblkDevice(ctrl, 0, nr_queues=queues, depth=DEPTH, buf_bytes=BUF)
    dev.add()
    target = make_target(kind)
    try:
        dev.start(target)
        return fio_pair(dev.bdev, [os.getpid()])
    finally:
        dev.delete()
        target.close()


def note(text: str) -> None:
    sys.stderr.write(f"probe: {text}\n")
    sys.stderr.flush()


def child(cdev: int, iod_map, q_id: int, kind: str, wfd: int) -> None:
    """One queue's process: its own target, ring and buffers; the inherited descriptor map."""
    code = 1
    faulthandler.dump_traceback_later(60, exit=True)     # not armed in a minute: say where
    try:
        set_io_flusher()
        target = make_target(kind)
        q = Queue(0, target, q_id=q_id, depth=DEPTH, buf_bytes=BUF, cdev=cdev)
        iod = np.frombuffer(iod_map, dtype=uapi.IO_DESC_DTYPE, count=DEPTH)
        ring = make_ring(2 * DEPTH, 8 * DEPTH)

        def tell():
            q.armed.wait()
            os.write(wfd, b"E" if q.error else b"A")
            faulthandler.cancel_dump_traceback_later()
            note(f"queue {q_id} process {os.getpid()} armed")
        threading.Thread(target=tell, daemon=True).start()
        q.run(ring, iod, cdev)
        code = 0
    except BaseException as e:
        sys.stderr.write(f"queue {q_id} process: {e!r}\n")
        try:
            os.write(wfd, b"E")
        except OSError:
            pass
    os._exit(code)


def run_procs(ctrl, kind: str, queues: int) -> list[str]:
    info = ctrl.add_dev(0, queues, DEPTH, BUF, 0)
    if info.nr_hw_queues != queues:
        raise RuntimeError(f"the kernel granted {info.nr_hw_queues} queues")
    pids, maps = [], []
    cdev = -1
    try:
        ctrl.set_params(0, ublkctrl.basic_params(SIZE >> 9, BUF, discard=False))
        cdev = open_cdev(0)
        maps += [mmap.mmap(cdev, uapi.ublk_desc_len(DEPTH), flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ, offset=uapi.ublk_desc_offset(q))
                for q in range(queues)]
        r, w = os.pipe()
        for q in range(queues):
            pid = os.fork()
            if pid == 0:
                os.close(r)
                child(cdev, maps[q], q, kind, w)
            pids.append(pid)
        os.close(w)
        for _ in range(queues):
            b = os.read(r, 1)
            if b != b"A":
                raise RuntimeError("a queue process did not arm")
        os.close(r)
        ctrl.start_dev(0)
        return fio_pair("/dev/ublkb0", pids)
    finally:
        try:
            ctrl.stop_dev(0)
        except OSError:
            pass
        for pid in pids:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for m in maps:
            m.close()                 # a mapping holds the char device open: DEL_DEV waits
        if cdev >= 0:
            os.close(cdev)
        ctrl.del_dev(0)


def main() -> int:
    subprocess.run(["modprobe", "ublk_drv"], check=False)
    ctrl = ublkctrl.Control()
    rounds = int(os.environ.get("PROBE_ROUNDS", "2"))
    for rnd in range(rounds):
        for kind in ("null", "lzo"):
            for mode, queues in (("1q", 1), ("threads", 2), ("procs", 2)):
                try:
                    fn = run_procs if mode == "procs" else run_threads
                    res = fn(ctrl, kind, queues)
                    print(f"round {rnd + 1} {kind:4s} {mode:7s} " + "   ".join(res), flush=True)
                except Exception as e:
                    print(f"round {rnd + 1} {kind:4s} {mode:7s} FAILED: {e!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
