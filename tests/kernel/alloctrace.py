"""Which kernel allocations the daemon's I/O path makes, seen through the kmem tracepoints.

A swap device served from userspace freezes the machine if serving a request makes the
kernel find a new page: under pressure that allocation enters direct reclaim, which waits for
swap-out, which waits for us. The I/O path (the queue thread: its io_uring_enter, the task
work ublk runs in it, its page faults) must make no allocation that may loop in reclaim.
:func:`trace` records every ``kmalloc``/``kmem_cache_alloc``/``mm_page_alloc`` of the given
threads; :func:`may_reclaim` picks out those whose GFP flags allow direct reclaim without
``__GFP_NORETRY`` (a NORETRY attempt -- mempool's second try, say -- reclaims at most once and
then fails over to the pool, so it cannot wait on us for ever). Counting flags rather than
freezes makes the check deterministic: an allocation that a slab happened to serve from a free
object this time is the one that enters reclaim another time.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import subprocess

TRACEFS = "/sys/kernel/tracing"
EVENTS = ("kmem/kmalloc", "kmem/kmem_cache_alloc", "kmem/mm_page_alloc")
# GFP names (as the kernel prints them) that include __GFP_DIRECT_RECLAIM
RECLAIM_FLAGS = {"GFP_KERNEL", "GFP_KERNEL_ACCOUNT", "GFP_NOIO", "GFP_NOFS", "GFP_USER",
                 "GFP_HIGHUSER", "GFP_HIGHUSER_MOVABLE", "GFP_TRANSHUGE", "__GFP_DIRECT_RECLAIM",
                 "__GFP_RECLAIM"}


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (the daemon's server and its standby)."""
    out = [pid]
    for d in glob.glob("/proc/[0-9]*/stat"):
        try:
            if int(open(d).read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.split("/")[2]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def threads(pid: int, prefix: str) -> list[int]:
    """Thread ids of ``pid`` or its children whose kernel name starts with ``prefix``."""
    out = []
    for p in family(pid):
        for d in glob.glob(f"/proc/{p}/task/*"):
            try:
                if open(f"{d}/comm").read().startswith(prefix):
                    out.append(int(os.path.basename(d)))
            except OSError:
                pass
    return sorted(out)


def major_faults(pid: int, tids: list[int]) -> dict[int, int]:
    """{tid: major page faults so far} (``majflt``, field 12 of /proc/PID/task/TID/stat): a
    major fault on the I/O path reads a file page back under pressure -- the same wait on
    reclaim as an allocation, invisible to the kmem events."""
    out = {}
    for tid in tids:
        try:
            fields = open(f"/proc/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = int(fields[9])
    return out


def rss_by_mapping(pid: int) -> dict[str, int]:
    """{mapping name: resident kB} of ``pid`` (/proc/PID/smaps, mappings of one name summed):
    compared before and after a block, where the I/O path's page faults brought pages in."""
    out: dict[str, int] = {}
    name = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if "-" in head[0] and ":" not in head[0]:
                    name = head[5].strip() if len(head) > 5 else "[anon]"
                elif head[0] == "Rss:" and name is not None:
                    out[name] = out.get(name, 0) + int(head[1])
    except OSError:
        pass
    return out


def file_pages(pid: int) -> set[tuple[str, int]]:
    """(file, offset in it) of every page of a file mapping of ``pid`` that is in its page
    tables now (/proc/PID/pagemap): compared before and after a block, the pages a fault
    brought in -- the 64 KiB window fault-around maps around the faulting address."""
    out: set[tuple[str, int]] = set()
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        with open(f"/proc/{pid}/pagemap", "rb") as pm:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) < 6 or not parts[5].startswith("/") or "SYSV" in parts[5]:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                off = int(parts[2], 16)
                pm.seek(lo // 4096 * 8)
                words = memoryview(pm.read((hi - lo) // 4096 * 8)).cast("Q")
                for i, w in enumerate(words):
                    if w >> 63:
                        out.add((parts[5].strip(), off + i * 4096))
    except OSError:
        pass
    return out


def new_pages(before: set[tuple[str, int]], after: set[tuple[str, int]]) -> str:
    """The file pages mapped since ``before``, as "file: offset ranges" (a failure message:
    ``nm``/``objdump`` of the file tell what code lies there)."""
    by_file: dict[str, list[int]] = {}
    for f, o in sorted(after - before):
        by_file.setdefault(f, []).append(o)
    out = []
    for f, offs in by_file.items():
        runs, start, prev = [], offs[0], offs[0]
        for o in offs[1:] + [None]:
            if o is None or o != prev + 4096:
                runs.append(f"{start:#x}-{prev + 4096:#x}")
                if o is not None:
                    start = o
            if o is not None:
                prev = o
        out.append(f"{f}: {' '.join(runs[:20])}")
    return "; ".join(out) or "none"


def grown(before: dict[str, int], after: dict[str, int]) -> str:
    """The mappings whose resident size grew, largest first (for a failure message)."""
    d = sorted(((after[k] - before.get(k, 0), k) for k in after if after[k] > before.get(k, 0)),
               reverse=True)
    return ", ".join(f"{k} +{n} kB" for n, k in d[:12]) or "none"


def heap_size(pid: int) -> int:
    """Bytes of the [heap] mappings of the server ``pid``: if they grow while serving, the
    pre-grown headroom was too small and the I/O path may have taken new pages (brk). (Its
    standby is a process of its own, whose heap grows while it prepares.)"""
    total = 0
    for p in (pid,):
        try:
            for line in open(f"/proc/{p}/maps"):
                if line.rstrip().endswith("[heap]"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    total += hi - lo
        except OSError:
            pass
    return total


def available() -> bool:
    if not os.path.exists(f"{TRACEFS}/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True)
    return all(os.path.exists(f"{TRACEFS}/events/{e}/enable") for e in EVENTS)


def _write(path: str, text: str) -> None:
    with open(f"{TRACEFS}/{path}", "w") as f:
        f.write(text)


def _enabled(event: str) -> bool:
    return open(f"{TRACEFS}/events/{event}/enable").read().strip() == "1"


@contextlib.contextmanager
def trace(tids: list[int]):
    """Record the allocations of ``tids`` while the block runs; yields a list that holds the
    trace lines (``(event, gfp flags, call site)`` tuples) once the block has ended.

    Only event *filters* and ``tracing_on`` change here where the events are already on (the
    test VM enables them on the kernel command line): turning a tracepoint on or off patches
    kernel text, which under qemu's TCG can oops the guest. Elsewhere they are turned on for
    the block and off after it. Threads the given ones create later (io-wq workers) are not
    followed (``set_event_pid``'s fork tracking would patch the sched tracepoints).
    With ``UBLKZSWAP_TRACE_STACKS=1`` the kernel and user stacks of the allocations
    :func:`may_reclaim` picks are printed too (trace options only, no tracepoint toggled)."""
    assert tids
    flt = " || ".join(f"common_pid == {t}" for t in tids)
    _write("tracing_on", "0")
    _write("trace", "")
    switched = [e for e in EVENTS if not _enabled(e)]
    for e in EVENTS:
        _write(f"events/{e}/filter", flt)
    for e in switched:
        _write(f"events/{e}/enable", "1")
    stacks = os.environ.get("UBLKZSWAP_TRACE_STACKS") == "1"
    if stacks:                                    # options only: no tracepoint is toggled
        _write("options/stacktrace", "1")
        _write("options/userstacktrace", "1")
        _write("options/sym-userobj", "1")
    _write("tracing_on", "1")
    found: list[tuple[str, str, str]] = []
    try:
        yield found
    finally:
        _write("tracing_on", "0")
        for e in switched:
            _write(f"events/{e}/enable", "0")
        text = open(f"{TRACEFS}/trace").read()
        found.extend(parse(text))
        if stacks:
            for opt in ("stacktrace", "userstacktrace", "sym-userobj"):
                _write(f"options/{opt}", "0")
            print("\n".join(_with_stacks(text)[:200]))
        for e in EVENTS:
            _write(f"events/{e}/filter", "0")
        _write("trace", "")


def _with_stacks(text: str) -> list[str]:
    """The trace lines of the allocations :func:`may_reclaim` picks, each with the stack lines
    after it."""
    out, keep = [], False
    for line in text.splitlines():
        m = LINE.search(line)
        if m:
            keep = bool(may_reclaim(parse(line)))
        if keep:
            out.append(line)
    return out


LINE = re.compile(r"\s(kmalloc|kmem_cache_alloc|mm_page_alloc):\s(.*)$")


def parse(text: str) -> list[tuple[str, str, str]]:
    out = []
    for line in text.splitlines():
        m = LINE.search(line)
        if not m:
            continue
        fields = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
        out.append((m.group(1), fields.get("gfp_flags", ""), fields.get("call_site", "")))
    return out


def may_reclaim(events) -> list[tuple[str, str, str]]:
    out = []
    for e in events:
        flags = set(e[1].split("|"))
        if RECLAIM_FLAGS & flags and "__GFP_NORETRY" not in flags:
            out.append(e)
    return out


def summary(events, limit: int = 20) -> str:
    top = collections.Counter(events).most_common(limit)
    return "\n".join(f"{n:7d}  {ev} {site} {gfp}" for (ev, gfp, site), n in top)
