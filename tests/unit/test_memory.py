"""The memory discipline's building blocks, checked against the kernel (no ublk needed)."""
import os
import subprocess
import sys
import textwrap

import pytest

from ublkzswap import memory

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
    libc.mprotect.argtypes = [C.c_void_p, C.c_size_t, C.c_int]

    def region(npages):
        # an anonymous mapping fenced by a PROT_NONE page, so that it merges with no neighbour
        m = mmap.mmap(-1, (npages + 1) * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        a = np.frombuffer(m, dtype=np.uint8)
        assert libc.mprotect(C.c_void_p(a.ctypes.data + npages * 4096), 4096, 0) == 0
        return m, a[:npages * 4096]

    def resident(a):
        n = len(a) // 4096
        vec = (C.c_ubyte * n)()
        assert libc.mincore(C.c_void_p(a.ctypes.data), n * 4096, vec) == 0
        return sum(v & 1 for v in vec)

    m1, big = region(8192)        # 32 MiB nobody touched: a library's reserved buffer
    m2, used = region(2048)       # 8 MiB of which one page was used
    used[0] = 1
    m3, small = region(256)       # 1 MiB untouched
    memory.lock_process(heap_headroom=1 << 20, oom_protect=False)
    print("big", resident(big), "used", resident(used), "small", resident(small))
    big[100 * 4096] = 1           # touched after: locked on fault
    print("big after touch", resident(big))
    locked = 0
    cur = False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            lo = int(line.split("-")[0], 16)
            cur = big.ctypes.data <= lo < big.ctypes.data + len(big)
        elif cur and line.startswith("Locked:"):
            locked += int(line.split()[1])
    print("big locked kB", locked)
""")


@needs_root
def test_lock_touched_locks_what_was_touched_not_what_is_mapped():
    p = subprocess.run([sys.executable, "-c", LOCK_TOUCHED], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    # every private writable page is resident (copy-on-write broken up front) but for a big
    # reservation nothing had used
    assert lines[0] == "big 0 used 2048 small 256"
    assert lines[1] == "big after touch 1"
    assert lines[2] == "big locked kB 4"            # locked as it came in


def test_set_thread_name_names_the_calling_thread_for_ps_and_the_tests():
    import threading
    from ublkzswap import memory
    seen = []

    def t():
        memory.set_thread_name("ublkq7:0-and-too-long")
        seen.append(open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip())

    th = threading.Thread(target=t)
    th.start()
    th.join()
    assert seen == ["ublkq7:0-and-t"[:15]] or seen == ["ublkq7:0-and-to"]


HEAP_TAIL = textwrap.dedent("""
    import ctypes as C
    from ublkzswap import memory
    libc = C.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [C.c_void_p, C.c_size_t, C.c_void_p]
    libc.sbrk.restype, libc.sbrk.argtypes = C.c_void_p, [C.c_ssize_t]
    libc.malloc.restype, libc.malloc.argtypes = C.c_void_p, [C.c_size_t]

    def absent():
        start, end = memory.heap_start(), libc.sbrk(0)
        n = (end - start) // 4096
        vec = (C.c_ubyte * n)()
        assert libc.mincore(C.c_void_p(start), n * 4096, vec) == 0
        return sum(1 for v in vec if not v & 1)

    memory.lock_process(heap_headroom=1 << 20, oom_protect=False)
    print("after lock", absent())
    libc.malloc(3 << 20)        # set-up grows the heap (by more than it asked: the top pad) ...
    print("grown, untouched", absent() > 0)
    memory.lock_heap_tail()     # what the arena keeper runs after every pass
    print("after keeper", absent())
    libc.malloc(3 << 20)
    memory.ensure_heap_headroom(1 << 20)
    print("after headroom", absent())
""")


@needs_root
def test_heap_is_resident_up_to_the_break_after_headroom_is_restored():
    # an untouched heap tail is a new page for whichever allocation first reaches it: the I/O
    # path's, under memory pressure
    p = subprocess.run([sys.executable, "-c", HEAP_TAIL], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["after lock 0", "grown, untouched True", "after keeper 0",
                                     "after headroom 0"]


def test_touched_runs_are_the_pages_used_so_far():
    # pagemap, not mincore: a page swapped out counts as touched too (a standby prepared under
    # memory pressure must lock its swapped-out pages back, or fault on them mid-takeover)
    import mmap
    import numpy as np
    from ublkzswap import memory
    m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(m, dtype=np.uint8).ctypes.data
    for i in (3, 4, 5, 40):
        m[i * 4096] = 1
    runs = list(memory._touched_runs(base, base + 64 * 4096))
    assert runs == [(base + 3 * 4096, 3 * 4096), (base + 40 * 4096, 4096)]
    m.close()


def test_set_command_line_is_what_ps_and_pidof_see():
    code = ("import os, subprocess, sys; from ublkzswap import memory; "
            "memory.set_command_line(['ublkzswapd-test', 'num_devices=1', 'x' * 100000]); "
            "print(open('/proc/self/cmdline', 'rb').read().split(b'\\0')[:2]); "
            "import shutil; print(not shutil.which('pidof') or subprocess.run(['pidof', "
            "'ublkzswapd-test'], capture_output=True, text=True).stdout.split() == "
            "[str(os.getpid())]); print(sys.argv[0])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert p.returncode == 0, p.stderr
    first, pidof, argv0 = p.stdout.splitlines()
    assert first == "[b'ublkzswapd-test', b'num_devices=1']" and pidof == "True"
    assert argv0 == "-c"                       # Python's own copy untouched


def test_windows_widen_touched_runs_to_fault_around_windows_within_the_mapping():
    from ublkzswap.memory import FAULT_AROUND as W, _windows
    start, end = 0x100000 + 0x3000, 0x100000 + 5 * W
    runs = [(start + 0x1000, 0x1000), (0x100000 + W + 0x2000, 0x1000),   # same window twice
            (0x100000 + W + 0x8000, 0x1000), (0x100000 + 3 * W + 0xF000, 0x2000)]
    assert _windows(start, end, runs) == [
        (start, 2 * W - 0x3000),    # clipped to the mapping's start, merged with the next
        (0x100000 + 3 * W, 2 * W)]  # (two runs in one window) -- a run across a boundary: both


STACKS = textwrap.dedent("""
    import sys, threading, time
    from ublkzswap import memory
    memory.lock_process(oom_protect=False)
    reserved, started = int(sys.argv[1]), int(sys.argv[2])
    memory.reserve_thread_stacks(reserved)
    time.sleep(0.2)                      # (an ended thread's stack is reusable once it is gone)
    before = memory.new_memory_bytes()
    go = threading.Event()
    def run():
        memory.daemon_thread_init()      # what every thread of the daemon does first
        go.wait()
    threads = [threading.Thread(target=run) for _ in range(started)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    print((memory.new_memory_bytes() - before) // 1024)
    go.set()
""")


@needs_root
@pytest.mark.parametrize("reserved", [0, 4])
def test_threads_started_after_their_stacks_were_reserved_need_no_new_memory(reserved):
    # a takeover starts its threads while the kernel holds the I/O of the devices it takes
    # over: a stack page found then might have to be swapped out to one of them first
    p = subprocess.run([sys.executable, "-c", STACKS, str(reserved), "4"], capture_output=True,
                       text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stderr
    kib = int(p.stdout)
    stacks = 4 * memory.THREAD_STACK // 1024
    if reserved:
        assert kib < stacks // 8, kib           # a few pages of thread state, no stacks
    else:
        assert kib >= stacks * 3 // 4, kib      # the control: each locked stack is new memory


def test_a_reserve_is_resident_until_released():
    before = memory.new_memory_bytes()
    r = memory.Reserve(2 << 20)
    held = memory.new_memory_bytes() - before
    r.release()
    r.release()                                 # idempotent
    assert held >= 2 << 20
    assert memory.new_memory_bytes() - before < 1 << 20
