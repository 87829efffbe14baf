"""The memory discipline's building blocks, checked against the kernel (no ublk needed)."""
import os
import subprocess
import sys
import textwrap

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mlockall needs root or a large RLIMIT_MEMLOCK")

PROBE = textwrap.dedent("""
    import ctypes as C, mmap, threading
    import numpy as np
    from ublkzswap import memory, queue
    libc = C.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [C.c_void_p, C.c_size_t, C.c_void_p]

    def resident(m):
        addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
        vec = (C.c_ubyte * (len(m) // 4096))()
        assert libc.mincore(C.c_void_p(addr), len(m), vec) == 0
        return sum(v & 1 for v in vec)

    memory.lock_process(heap_headroom=4 << 20, oom_protect=False)
    m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    print("after MAP_POPULATE", resident(m))
    memory.populate(np.frombuffer(m, dtype=np.uint8).ctypes.data, len(m))
    print("after populate", resident(m))
    q = queue.Queue(0, None, depth=4, buf_bytes=64 * 1024)
    print("queue buffers", resident(q._bufmap), len(q._bufmap) // 4096)
    def t():
        memory.lock_thread_stack()
        print("thread stack locked")
    th = threading.Thread(target=t); th.start(); th.join()
    print("VmLck", int([l for l in open("/proc/self/status") if l.startswith("VmLck")][0].split()[1]) > 0)
""")


@needs_root
def test_onfault_makes_map_populate_a_noop_and_populate_fixes_it():
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    # the pitfall that froze the swap VM: under MCL_ONFAULT, MAP_POPULATE leaves pages out
    assert lines[0] == "after MAP_POPULATE 0"
    assert lines[1] == "after populate 64"
    n, total = lines[2].split()[2:]
    assert n == total == "64"
    assert lines[3] == "thread stack locked"
    assert lines[4] == "VmLck True"


LOCK_TOUCHED = textwrap.dedent("""
    import ctypes as C, mmap
    import numpy as np
    from ublkzswap import memory
    libc = C.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [C.c_void_p, C.c_size_t, C.c_void_p]
    n = 8192                                   # 32 MiB, like a library's untouched buffer
    big = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(big, dtype=np.uint8)
    a[:16 * 4096] = 7                           # touched before locking: 16 pages
    base = a.ctypes.data
    small = mmap.mmap(-1, 256 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    sbase = np.frombuffer(small, dtype=np.uint8).ctypes.data

    def locked_kb():
        for line in open("/proc/self/smaps"):
            pass
        out, cur = 0, False
        for line in open("/proc/self/smaps"):
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                lo = int(line.split("-")[0], 16)
                cur = base <= lo < base + n * 4096
            elif cur and line.startswith("Locked:"):
                out += int(line.split()[1])
        return out

    memory.lock_process(heap_headroom=1 << 20, oom_protect=False)
    print("locked after lock", locked_kb())
    a[100 * 4096] = 1                           # touched after: locked on fault
    print("locked after touch", locked_kb())
    vec = (C.c_ubyte * n)()
    libc.mincore(C.c_void_p(base), n * 4096, vec)
    print("resident", sum(v & 1 for v in vec))
    svec = (C.c_ubyte * 256)()
    libc.mincore(C.c_void_p(sbase), 256 * 4096, svec)
    print("small resident", sum(v & 1 for v in svec))
""")


@needs_root
def test_lock_touched_locks_what_was_touched_not_what_is_mapped():
    p = subprocess.run([sys.executable, "-c", LOCK_TOUCHED], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "locked after lock 64"      # the 16 touched pages, not the 32 MiB
    assert lines[1] == "locked after touch 68"     # one more page, locked as it came in
    assert lines[2] == "resident 17"
    # a small private writable mapping is populated whole (copy-on-write broken up front)
    assert lines[3] == "small resident 256"
