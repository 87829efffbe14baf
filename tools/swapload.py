#!/usr/bin/env python3
"""A swap workload that checks every page it gets back.

Allocates ``--mib`` MiB of anonymous memory (meant to be several times RAM, so the kernel must
swap), fills it with a mix of page kinds (zero, same-filled, text-like, random), then makes
``--passes`` passes over it in random order: each pass verifies every 256 KiB chunk against
what was last written there; every pass but the last also rewrites a random half of the
chunks with new contents. Exit status 0 only if every page read back exactly.

Text-like pages are real text (this Python's standard library sources); random pages are
incompressible; same-filled pages repeat one 8-byte word; zero pages are all zeros (Linux 6.12
keeps those out of swap I/O entirely). Contents are a pure function of (page, version), so
nothing but a version byte per chunk is kept aside.

    python3 tools/swapload.py --mib 768 --passes 2 --mix zero=30,same=10,text=40,random=20
"""
from __future__ import annotations

import argparse
import glob
import mmap
import os
import sys
import time

import numpy as np

PAGE = 4096
WORDS = PAGE // 8
CHUNK_PAGES = 64
KINDS = ("zero", "same", "text", "random")


def text_corpus(npages: int = 512) -> np.ndarray:
    """``npages`` pages of real text, as uint64 rows."""
    src = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    buf = bytearray()
    for path in src:
        with open(path, "rb") as f:
            buf += f.read()
        if len(buf) >= npages * PAGE:
            break
    buf = bytes(buf[:npages * PAGE]).ljust(npages * PAGE, b" ")
    return np.frombuffer(buf, dtype=np.uint64).reshape(npages, WORDS).copy()


class Pattern:
    def __init__(self, npages: int, mix: dict[str, int], seed: int):
        total = sum(mix.values())
        p = np.array([mix.get(k, 0) / total for k in KINDS])
        rng = np.random.default_rng(seed)
        self.kind = rng.choice(len(KINDS), size=npages, p=p).astype(np.uint8)
        self.corpus = text_corpus()
        self.seed = seed

    def chunk(self, c: int, version: int) -> np.ndarray:
        """Contents of chunk ``c`` at ``version`` as (CHUNK_PAGES, WORDS) uint64."""
        first = c * CHUNK_PAGES
        idx = np.arange(first, first + CHUNK_PAGES, dtype=np.uint64)
        kind = self.kind[first:first + CHUNK_PAGES]
        out = np.zeros((CHUNK_PAGES, WORDS), dtype=np.uint64)
        v = np.uint64(version)
        same = kind == 1
        if same.any():
            with np.errstate(over="ignore"):
                word = (idx[same] * np.uint64(0x9E3779B97F4A7C15)) ^ (v * np.uint64(0xBF58476D1CE4E5B9))
            out[same] = word[:, None]
        text = kind == 2
        if text.any():
            rows = (idx[text] + v * np.uint64(7)) % np.uint64(len(self.corpus))
            out[text] = self.corpus[rows.astype(np.int64)]
            out[text, 0] = idx[text] ^ (v << np.uint64(48))
        rnd = kind == 3
        if rnd.any():
            rng = np.random.default_rng([self.seed, c, version])
            out[rnd] = rng.integers(0, 2**63, size=(int(rnd.sum()), WORDS), dtype=np.uint64)
        return out


def check_chunk(mem: np.ndarray, pat: Pattern, c: int, version: int) -> int:
    """Compare chunk ``c`` of ``mem`` with what ``version`` of it holds; print the first bad
    pages; return how many pages differ."""
    got = mem[c]
    want = pat.chunk(c, version)
    if np.array_equal(got, want):
        return 0
    badrows = np.flatnonzero((got != want).any(axis=1))
    for r in badrows[:4].tolist():
        page = c * CHUNK_PAGES + r
        print(f"swapload: MISMATCH page {page} (kind {KINDS[pat.kind[page]]}, version {version})",
              flush=True)
    return len(badrows)


def parse_mix(text: str) -> dict[str, int]:
    mix = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k not in KINDS or not v.isdigit():
            raise argparse.ArgumentTypeError(f"bad mix item '{part}' (kinds: {', '.join(KINDS)})")
        mix[k] = int(v)
    if not sum(mix.values()):
        raise argparse.ArgumentTypeError("mix adds up to 0")
    return mix


def progress(label: str, done: int, total: int, t0: float, tty: bool, last: list) -> None:
    now = time.monotonic()
    if done != total and now - last[0] < (0.5 if tty else 10):
        return
    last[0] = now
    mib = done * CHUNK_PAGES * PAGE / 2**20
    rate = mib / max(now - t0, 1e-6)
    line = f"{label}: {100 * done / total:5.1f}%  {mib:8.0f} MiB  {rate:7.1f} MiB/s"
    if tty:
        sys.stdout.write("\r" + line + ("\n" if done == total else ""))
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def mem_total_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def enter_cgroup(limit_mib: int) -> str:
    """Move this process into a new cgroup v2 group limited to ``limit_mib`` MiB of RAM (swap
    unlimited), so that a host with plenty of RAM still swaps. Returns the group's path."""
    root = "/sys/fs/cgroup"
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        os.makedirs(root, exist_ok=True)
        if os.system(f"mount -t cgroup2 none {root}") != 0:
            raise RuntimeError("cgroup v2 is not available")
    with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
        f.write("+memory")
    path = os.path.join(root, f"swapload-{os.getpid()}")
    os.mkdir(path)
    with open(os.path.join(path, "memory.max"), "w") as f:
        f.write(f"{limit_mib}M")
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    return path


def remove_cgroups() -> None:
    """Remove the (by then empty) groups that :func:`enter_cgroup` left behind."""
    root = "/sys/fs/cgroup"
    for d in os.listdir(root) if os.path.isdir(root) else []:
        if d.startswith("swapload-"):
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, required=True, help="memory to allocate and verify")
    ap.add_argument("--passes", type=int, default=2,
                    help="passes in random order, each verifying every page; all but the last "
                         "also rewrite a random half of the chunks (default 2)")
    ap.add_argument("--mix", type=parse_mix, default=parse_mix("zero=25,same=10,text=50,random=15"),
                    help="page kind proportions (default zero=25,same=10,text=50,random=15)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cgroup-limit", type=int, metavar="MIB",
                    help="run inside a new cgroup v2 limited to MIB of RAM (for hosts with lots of RAM)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.passes < 1 or args.mib < 1:
        ap.error("--passes and --mib must be at least 1")
    if args.cgroup_limit:
        print(f"swapload: in cgroup {enter_cgroup(args.cgroup_limit)} (memory.max {args.cgroup_limit} MiB)")
    nchunks = args.mib * 2**20 // (CHUNK_PAGES * PAGE)
    npages = nchunks * CHUNK_PAGES
    pat = Pattern(npages, args.mix, args.seed)
    counts = np.bincount(pat.kind, minlength=4)
    print(f"swapload: {npages * PAGE >> 20} MiB = {npages} pages: "
          + ", ".join(f"{k} {n}" for k, n in zip(KINDS, counts.tolist())), flush=True)
    region = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem = np.frombuffer(region, dtype=np.uint64).reshape(nchunks, CHUNK_PAGES, WORDS)
    version = np.zeros(nchunks, dtype=np.uint32)
    rng = np.random.default_rng(args.seed + 1)
    tty = sys.stdout.isatty() and not args.quiet
    bad_pages = 0
    t_all = time.monotonic()

    t0, last = time.monotonic(), [0.0]
    for c in range(nchunks):
        mem[c] = pat.chunk(c, 0)
        if not args.quiet:
            progress("fill  ", c + 1, nchunks, t0, tty, last)

    def verify(c: int) -> int:
        return check_chunk(mem, pat, c, int(version[c]))

    for p in range(args.passes):
        last_pass = p == args.passes - 1
        order = rng.permutation(nchunks)
        rewrite = rng.random(nchunks) < 0.5
        t0, last = time.monotonic(), [0.0]
        for n, c in enumerate(order.tolist()):
            bad_pages += verify(c)
            if rewrite[c] and not last_pass:
                version[c] += 1
                mem[c] = pat.chunk(c, int(version[c]))
            if not args.quiet:
                progress(f"pass {p + 1}", n + 1, nchunks, t0, tty, last)
    secs = time.monotonic() - t_all
    verdict = "OK" if bad_pages == 0 else "FAILED"
    print(f"swapload: {verdict}: {npages} pages checked after {args.passes} passes, "
          f"{bad_pages} bad, {secs:.1f}s", flush=True)
    return 0 if bad_pages == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
