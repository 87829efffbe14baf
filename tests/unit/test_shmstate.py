"""State that outlives the process: a store over SysV shared memory, taken over after a crash
with every page, every counter and the allocator's bookkeeping rebuilt from the table."""
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ublkzswap import shmstate
from ublkzswap.store import Store, arena_pages
from ublkzswap.logalloc import SEGMENT_PAGES

from invariants import check

PAGE = 4096
DEV = 900          # a device id no real daemon here uses


def page(rng, kind):
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return rng.randbytes(PAGE)
    if kind == 2:
        return rng.getrandbits(64).to_bytes(8, "little") * 512
    text = b" ".join(rng.choice([b"swap", b"page", b"segment", b"takeover", b"shm"])
                     for _ in range(rng.randint(100, 1200)))
    return (text * (PAGE // len(text) + 2))[:PAGE]


@pytest.fixture
def state():
    shmstate.remove(DEV)
    n = 2048
    st = shmstate.DeviceState.create(DEV, disksize=n * PAGE, arena_pages=arena_pages(n * PAGE),
                                     unit=SEGMENT_PAGES, allocator=0, compressor="lzo",
                                     memlimit=0, backing="")
    yield st
    shmstate.remove(DEV)
    st.detach()


def store_on(st, adopt=False):
    return Store(st.disksize, state=st, adopt=adopt, keeper=False, inline_refill=True,
                 low=16, high=64)


def test_a_store_taken_over_reads_every_page_and_counts_as_before(state):
    rng = random.Random(1)
    s = store_on(state)
    s.preformat(b"\x42" * (PAGE - 10) + b"SWAPSPACE2")
    pages = {}
    for i in rng.sample(range(1, 2048), 1500):
        pages[i] = page(rng, rng.randrange(4))
        s.write(i * PAGE, memoryview(pages[i]))
    for i in rng.sample(sorted(pages), 300):            # holes, as a workload leaves them
        s.discard(i * PAGE, PAGE)
        del pages[i]
    before = s.stats()
    check(s)
    del s                                                # "kill -9": nothing cleaned up
    again = shmstate.DeviceState.attach(DEV)
    try:
        assert (again.disksize, again.compressor) == (state.disksize, "lzo")
        s2 = store_on(again, adopt=True)
        after = s2.stats()
        # the pool's own counts are the serving process's (they start again at 0)
        mine = ("mem_used_max", "pool_misses", "growth_deferred")
        assert {k: after[k] for k in before if k not in mine} == \
            {k: before[k] for k in before if k not in mine}
        assert before["pool_misses"] > 0 and after["pool_misses"] == 0
        check(s2)
        out = bytearray(PAGE)
        s2.read(0, memoryview(out))
        assert out[-10:] == b"SWAPSPACE2"
        for i, p in pages.items():
            s2.read(i * PAGE, memoryview(out))
            assert out == p, i
        # and it goes on working: overwrite, compact, read back
        for i in list(pages)[:200]:
            pages[i] = page(rng, 3)
            s2.write(i * PAGE, memoryview(pages[i]))
        s2.compact()
        check(s2)
        for i, p in pages.items():
            s2.read(i * PAGE, memoryview(out))
            assert out == p, i
    finally:
        again.detach()


CRASH = textwrap.dedent("""
    import os, random, sys
    from ublkzswap import shmstate
    from ublkzswap.store import Store
    st = shmstate.DeviceState.attach(int(sys.argv[1]))
    s = Store(st.disksize, state=st, keeper=False, inline_refill=True, low=16, high=64)
    rng = random.Random(2)
    for i in range(1, 2048):
        text = (b"page %d of the process that dies " % i) * 200
        s.write(i * 4096, memoryview(text[:4096]))
    # a write cut short after its data was placed, before its entry was stored: a leak
    s.allocator.malloc(1500, 0.0)
    os._exit(0)                           # no clean-up of any kind
""")


def test_the_first_writes_after_a_takeover_go_into_the_dead_servers_segments(state):
    """A server that takes a device over serves the kernel's requests a moment before its
    keeper starts (no new memory while the device is held), with whatever ready units the
    dead server left -- perhaps none. Its log heads are the old segments with the most room
    after their last object, so the first writes take no unit: an ordinary write failing
    with ENOSPC is an I/O error (fio failed so across a takeover)."""
    from ublkzswap.logalloc import SEGMENT
    rng = random.Random(4)
    s = Store(state.disksize, state=state, keeper=False, inline_refill=False, low=16, high=64)
    pages = {}
    for i in range(1, 40):                     # compressible: part of a segment or two
        pages[i] = page(rng, 3)
        s.write(i * PAGE, memoryview(pages[i]))
    pages[40] = rng.randbytes(PAGE)            # and a whole page: the other head
    s.write(40 * PAGE, memoryview(pages[40]))
    before = {s.slot(i)[1] // SEGMENT for i in pages}
    del s                                      # "kill -9"
    again = shmstate.DeviceState.attach(DEV)
    s2 = Store(again.disksize, state=again, adopt=True, keeper=False, inline_refill=False,
               low=16, high=64)
    try:
        ready = s2.pool.ready
        for i in (41, 42):
            pages[i] = page(rng, 3)
            s2.write(i * PAGE, memoryview(pages[i]))
            assert s2.slot(i)[1] // SEGMENT in before, i
        assert s2.pool.ready == ready                     # no unit taken
        check(s2)
        out = bytearray(PAGE)
        for i, p in pages.items():
            s2.read(i * PAGE, memoryview(out))
            assert out == p, i
    finally:
        s2.close()
        again.detach()


def test_a_process_that_dies_leaves_everything_for_the_next(state):
    s = store_on(state)
    s.write(PAGE, memoryview(b"x" * PAGE))                 # give the pool something first
    del s
    p = subprocess.run([sys.executable, "-c", CRASH, str(DEV)], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stderr
    again = shmstate.DeviceState.attach(DEV)
    try:
        s2 = store_on(again, adopt=True)
        check(s2)                                          # the leaked object is not counted
        out = bytearray(PAGE)
        for i in range(1, 2048):
            s2.read(i * PAGE, memoryview(out))
            assert out == ((b"page %d of the process that dies " % i) * 200)[:PAGE], i
        assert s2.stats()["num_writes"] == 2048 and s2.stats()["pages_stored"] == 2047
    finally:
        again.detach()


def test_no_state_is_enoent_and_foreign_state_is_refused():
    shmstate.remove(DEV + 1)
    with pytest.raises(OSError) as e:
        shmstate.DeviceState.attach(DEV + 1)
    assert e.value.errno == 2
    seg = shmstate.Segment(shmstate.keys(DEV + 1)[0], 8192, create=True)
    try:
        with pytest.raises(OSError) as e:
            shmstate.DeviceState.attach(DEV + 1)
        assert e.value.errno == 22
    finally:
        seg.remove()
        seg.detach()


def _shm_mode(key: int) -> int:
    """shm_perm.mode of the segment with ``key`` (SHM_LOCKED = 0o2000 when locked)."""
    import ctypes as C
    import struct
    shmid = shmstate.libc.shmget(key, 0, 0)
    assert shmid >= 0
    ds = (C.c_uint8 * 128)()
    assert shmstate.libc.shmctl(shmid, shmstate.IPC_STAT, ds) == 0
    return struct.unpack_from("<H", bytes(ds), 20)[0]     # struct ipc64_perm.mode


def test_the_claim_of_an_id_is_locked_like_the_state():
    # a standby reads the claim while the kernel holds the device's I/O: swapped out to that
    # very device, it would never come back (seen in the VM: the takeover hung in shmem_fault)
    shmstate.claim(DEV, os.getpid())
    try:
        assert shmstate.claimant(DEV) == os.getpid()
        assert _shm_mode(shmstate.CLAIM_BASE + DEV) & 0o2000
    finally:
        shmstate.unclaim(DEV)
    assert shmstate.claimant(DEV) is None


def _resident_pages(addr: int, size: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        words = memoryview(f.read(size // PAGE * 8)).cast("Q")
    return sum(1 for w in words if w >> 63)


def test_the_tables_are_resident_from_creation(state):
    # SHM_LOCK keeps pages but does not make them: an untouched slot table page would be
    # allocated by the queue thread's first write to it (seen in the VM's allocation trace)
    seg = state.tables
    assert _resident_pages(seg.addr, seg.size) == seg.size // PAGE


def test_a_private_state_is_gone_once_detached():
    def ours():
        out = subprocess.run(["ipcs", "-m", "-p"], capture_output=True, text=True).stdout
        return sum(1 for line in out.splitlines()
                   if line.split()[2:3] == [str(os.getpid())])      # created by us
    before = ours()
    st = shmstate.DeviceState.create(-1, disksize=64 * PAGE, arena_pages=arena_pages(64 * PAGE),
                                     unit=SEGMENT_PAGES, allocator=0, compressor="lzo",
                                     private=True)
    s = store_on(st)
    s.write(PAGE, memoryview(b"x" * PAGE))
    assert ours() == before + 2
    s.close()
    assert ours() == before


def test_shared_objects_are_taken_over_and_a_cut_ring_is_relinked(state):
    """Swap-outs sharing objects survive a takeover: rings are rebuilt from the entries'
    addresses, so a crash between a ring's links and an entry (here: a link cut, a stale link
    on a slot that holds its object alone) costs at most a leak, never a page."""
    from ublkzswap.slots import LINK
    rng = random.Random(7)
    s = store_on(state)
    pages = {}
    contents = [page(rng, 3) for _ in range(5)]
    for i in rng.sample(range(8, 2048), 300):
        pages[i] = rng.choice(contents)
        s.write_swap(i * PAGE, memoryview(pages[i]))
    pages[6] = b"unique " * 585 + b"x"
    s.write_swap(6 * PAGE, memoryview(pages[6]))
    before = s.stats()
    assert before["dup_data_size"] > 0
    check(s)
    t = state.table
    shared = [i for i in pages if t[2 * i + 1] & LINK]
    t[2 * shared[0] + 1] &= ~LINK & (2**64 - 1)           # a ring cut
    t[2 * 6 + 1] |= 1234                                  # a stale link on a lone object
    del s                                                 # "kill -9"
    again = shmstate.DeviceState.attach(DEV)
    try:
        s2 = store_on(again, adopt=True)
        # the slot cut out of its ring holds the object on its own account now: counted
        # twice (a leak until compaction moves it), never freed under the others
        assert s2.stats()["dup_data_size"] < before["dup_data_size"]
        assert s2.allocator.live_bytes() > before["compr_data_size"] - before["dup_data_size"]
        for i, p in pages.items():
            assert s_read(s2, i) == p, i
        for i in list(pages)[:150]:                       # and it goes on: holders leave
            s2.discard(i * PAGE, PAGE)
            del pages[i]
        s2.compact()
        for i, p in pages.items():
            assert s_read(s2, i) == p, i
        s2.discard(0, 2048 * PAGE)
        assert s2.allocator.live_bytes() == 0 and s2.stats()["dup_data_size"] == 0
        check(s2)
    finally:
        again.detach()


def s_read(s, i):
    out = bytearray(PAGE)
    s.read(i * PAGE, memoryview(out))
    return out


def _segment_rss(key: int) -> int:
    """Bytes of the SysV segment ``key`` in memory (/proc/sysvipc/shm's rss)."""
    with open("/proc/sysvipc/shm") as f:
        head = f.readline().split()
        for line in f:
            w = line.split()
            if int(w[0]) == key:
                return int(w[head.index("rss")])
    raise AssertionError(f"no segment {key:#x}")


def test_a_takeover_makes_no_page_until_resumed(state):
    """A takeover runs while the kernel holds the device's I/O: a page found for it then
    might have to be swapped out to that very device (the VM froze so, the taker's populate
    in reclaim). The store is rebuilt without a new page of the arena -- a unit the dead
    keeper had half populated stays unbacked -- nor of its own; the dedup index comes with
    resume(), and the keeper's next pass maps what was adopted."""
    from ublkzswap.arena import UNBACKED
    rng = random.Random(3)
    s = store_on(state)
    pages = {i: page(rng, 3) for i in range(1, 600)}
    for i, p in pages.items():
        s.write_swap(i * PAGE, memoryview(p))
    pool = s.pool
    half = int(np.flatnonzero(pool.state == UNBACKED)[-1])
    pool.mem[half * pool.unit_bytes] = 1                # its first page only
    del s, pool                                         # "kill -9"
    key = shmstate.keys(DEV)[1]
    rss = _segment_rss(key)
    again = shmstate.DeviceState.attach(DEV)
    try:
        s2 = store_on(again, adopt=True)
        assert _segment_rss(key) == rss
        assert s2.pool.state[half] == UNBACKED
        assert _resident_pages(s2.pool.base, s2.pool.size) == 0      # nothing mapped yet
        used = s2.stats()["mem_used_total"] // PAGE
        s2.pool.step()                                  # the keeper's pass maps it
        assert _resident_pages(s2.pool.base, s2.pool.size) >= used > 0
        dup = s2.stats()["dup_data_size"]
        s2.write_swap(700 * PAGE, memoryview(pages[1]))
        s2.write_swap(701 * PAGE, memoryview(pages[1]))
        assert s2.stats()["dup_data_size"] == dup       # no index yet: nothing shared
        s2.resume()
        s2.write_swap(702 * PAGE, memoryview(pages[1]))
        s2.write_swap(703 * PAGE, memoryview(pages[1]))
        assert s2.stats()["dup_data_size"] > dup
        for i in (1, 700, 703):
            assert s_read(s2, i) == pages[1]
        check(s2)
        s2.close()
    finally:
        again.detach()


def test_a_standby_keeps_heap_for_the_rebuild_of_every_initialised_device(state):
    # the rebuild's numpy temporaries come from the heap; grown while the kernel holds the
    # I/O, it took 1.3 MiB of new pages in the VM
    from ublkzswap import daemon, memory
    units = state.arena_pages // state.unit
    below = daemon.takeover_heap({"num_devices": DEV})     # ids below ours: none, as a rule
    assert below >= memory.HEAP_HEADROOM
    assert daemon.takeover_heap({"num_devices": DEV + 1}) == \
        below + daemon.TAKEOVER_HEAP_PER_UNIT * units


def test_the_rebuild_stays_within_the_heap_a_standby_keeps(state):
    rng = random.Random(5)
    s = store_on(state)
    for i in rng.sample(range(1, 2048), 1500):
        s.write_swap(i * PAGE, memoryview(page(rng, rng.randrange(4))))
    del s
    import tracemalloc
    from ublkzswap import daemon, memory
    again = shmstate.DeviceState.attach(DEV)
    tracemalloc.start()
    try:
        s2 = store_on(again, adopt=True)
        _, peak = tracemalloc.get_traced_memory()
        s2.close()
    finally:
        tracemalloc.stop()
        again.detach()
    assert peak <= daemon.takeover_heap({"num_devices": DEV + 1}) - memory.HEAP_HEADROOM // 2
