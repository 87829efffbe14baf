"""The daemon's self-test touches all the library code serving touches: a device's store (on
shared state, with its keeper thread refilling, trimming and compacting) run hard after it
maps no new page of numpy's core library. Code first touched while serving is read from disk,
under memory pressure, by a request (a major fault on the I/O path, seen in the VM)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = textwrap.dedent("""
    import random, sys
    from ublkzswap import daemon, memory, shmstate, store as storemod
    from ublkzswap.uapi import PAGE_SIZE
    memory.set_io_flusher = lambda: None        # needs CAP_SYS_RESOURCE; not what is measured

    def numpy_core_kb():
        kb, name = 0, ""
        for line in open("/proc/self/smaps"):
            head = line.split(None, 5)
            if "-" in head[0] and ":" not in head[0]:
                name = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:" and "_multiarray_umath" in name:
                kb += int(head[1])
        return kb

    if sys.argv[1] == "warm":
        daemon.warm_up(storemod, "lzo", "log")
    disksize = 8192 * PAGE_SIZE
    st = shmstate.DeviceState.create(-1, disksize=disksize,
                                     arena_pages=storemod.arena_pages(disksize, "log"),
                                     unit=storemod.ALLOCATORS["log"].UNIT_PAGES, allocator=0,
                                     compressor="lzo", private=True)
    s = storemod.Store(disksize, state=st, **daemon.keeper_options())
    before = numpy_core_kb()
    rng = random.Random(1)
    text = (b"swap page text " * 300)[:PAGE_SIZE]
    one = bytearray(PAGE_SIZE)
    bufs = [memoryview(bytearray(PAGE_SIZE)) for _ in range(4)]   # as a queue's tag buffers
    serve = s.page_server(bufs, lambda e: -5)
    for i in range(40000):
        slot = rng.randrange(1, 8192)
        data = [bytes(PAGE_SIZE), rng.randbytes(PAGE_SIZE), text, b"\\x11" * PAGE_SIZE][rng.randrange(4)]
        x = rng.random()
        try:
            if x < 0.3:
                s.write_swap(slot * PAGE_SIZE, memoryview(data))
            elif x < 0.6:
                bufs[i & 3][:] = data                  # the queue's fast path
                serve([(i & 3, 1 | 1 << 16, slot, 1)], [])
            elif x < 0.75:
                s.read(slot * PAGE_SIZE, memoryview(one))
            elif x < 0.9:
                serve([(i & 3, 0, slot, 1)], [])
            else:
                s.discard(slot * PAGE_SIZE, PAGE_SIZE)
        except OSError:
            pass
    s.discard(0, disksize)
    s.compact()
    s.pool.step()
    print(numpy_core_kb() - before)
    s.close()
""")


def grown_kb(mode: str) -> int:
    # run as the daemon runs (no site, -OO: the self-test's checks must hold there too)
    from ublkzswap import daemon
    p = subprocess.run([sys.executable, *daemon.DAEMON_FLAGS, "-c", PROBE, mode],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=daemon.daemon_env())
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split()[-1])


def test_serving_after_the_self_test_maps_no_new_numpy_code():
    assert grown_kb("cold") > 0          # the probe sees code being mapped at all
    assert grown_kb("warm") == 0


def test_the_self_test_runs_deduplications_paths(monkeypatch):
    """A swap-out sharing a stored object (general and fast path), a holder leaving its ring
    (overwrite, discard) and compaction moving a shared object: each first run by the
    self-test, not by a request under memory pressure."""
    from ublkzswap import daemon, memory, store as storemod
    monkeypatch.setattr(memory, "set_io_flusher", lambda: None)
    calls = {"share": [], "unlink": [], "ring": []}
    for name, got in calls.items():
        def spy(*a, _real=getattr(storemod, name), _got=got):
            _got.append(a[1])
            return _real(*a)
        monkeypatch.setattr(storemod, name, spy)
    daemon.warm_up(storemod, "lzo", "log")
    assert sorted(calls["share"]) == [13, 14, 15]        # 15: the fast path's
    assert sorted(calls["unlink"]) == [12, 13]           # overwritten, discarded
    assert calls["ring"]                                 # compaction moved a shared object
