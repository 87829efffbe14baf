"""Several queues of one device (issue 11): each queue's thread sets itself up (name,
PR_SET_IO_FLUSHER, locked stack), maps its own descriptor array at its own offset and commands
only its own queue's tags; several queues on rings the tests play serve one store at once,
each seeing only its own requests, and the store stays consistent."""
import mmap
import random
import sys
import threading

import pytest

import invariants
from fakering import FakeRing
from fakeublk import small_store
from ublkzswap import queue as qmod, uapi
from ublkzswap.queue import Queue

R, W, D = uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_OP_DISCARD
SWAP = uapi.UBLK_IO_F_SWAP
PAGE = 4096


def test_descriptor_arrays_lie_a_max_depth_array_apart():
    # the kernel finds the queue as (offset - UBLKSRV_CMD_BUF_OFFSET) / ublk_max_cmd_buf_size():
    # round_up(UBLK_MAX_QUEUE_DEPTH * 24, PAGE_SIZE), whatever the device's depth
    assert uapi.ublk_desc_offset(0) == uapi.UBLKSRV_CMD_BUF_OFFSET
    assert [uapi.ublk_desc_offset(q) - uapi.ublk_desc_offset(0) for q in range(4)] == \
        [0, 98304, 2 * 98304, 3 * 98304]
    assert uapi.ublk_desc_len(64) == 4096 and uapi.ublk_desc_len(512) == 12288


def test_each_queue_thread_sets_itself_up_and_maps_its_own_descriptors(monkeypatch):
    """Queue.serve in two threads, the kernel's part played: the cdev, its mmap and the ring."""
    calls: list = []
    lock = threading.Lock()
    real_mmap = mmap.mmap

    def note(*what):
        with lock:
            calls.append((threading.current_thread().q_id,) + what)

    def fake_mmap(fd, length, *a, **kw):
        if fd == -1:
            return real_mmap(fd, length, *a, **kw)
        note("mmap", fd, length, kw.get("offset"), kw.get("prot"))
        return real_mmap(-1, length)

    rings = {}

    def make_ring(entries, cq_entries):
        q_id = threading.current_thread().q_id
        rings[q_id] = FakeRing(DEPTH, [FakeRing.stop], entries=entries, cq_entries=cq_entries,
                               q_id=q_id)
        return rings[q_id]

    DEPTH = 64
    monkeypatch.setattr(qmod.mmap, "mmap", fake_mmap)
    monkeypatch.setattr(qmod, "make_ring", make_ring)
    monkeypatch.setattr(qmod, "set_thread_name", lambda name: note("name", name))
    monkeypatch.setattr(qmod, "set_io_flusher", lambda: note("io_flusher"))
    monkeypatch.setattr(qmod, "lock_thread_stack", lambda: note("lock_stack"))
    monkeypatch.setattr(Queue, "_open_cdev", lambda self: 1000 + self.q_id)
    monkeypatch.setattr(qmod.os, "close", lambda fd: note("close", fd))
    target = small_store(0, 64 * PAGE)
    queues = [Queue(7, target, q_id=q, depth=DEPTH, buf_bytes=PAGE) for q in range(2)]
    threads = []
    for q in queues:
        t = threading.Thread(target=q.serve)
        t.q_id = q.q_id
        threads.append(t)
        t.start()
    for t in threads:
        t.join(10)
    try:
        for q, t in zip(queues, threads):
            assert q.error is None and q.armed.is_set()
            mine = [c[1:] for c in calls if c[0] == q.q_id]
            assert mine[:3] == [("name", f"ublkq7:{q.q_id}"), ("io_flusher",), ("lock_stack",)]
            assert ("mmap", 1000 + q.q_id, 4096, uapi.ublk_desc_offset(q.q_id),
                    mmap.PROT_READ) in mine
            assert mine[-1] == ("close", 1000 + q.q_id)
            ring = rings[q.q_id]
            assert sorted(ring.fetches) == list(range(DEPTH)) and ring.armed == set()
            assert ring.addrs == {tag: int(q.buf_addrs[tag]) for tag in range(DEPTH)}
        a, b = (set(int(x) for x in q.buf_addrs) for q in queues)
        assert not a & b                                  # tag buffers of their own
    finally:
        for q in queues:
            q.close()
        target.close()


# ---------------------------------------------------------------- several queues, one store
PAGES = 96
QDEPTH = 8


def pattern(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(PAGE)
    if kind == 1:
        return rng.randbytes(8) * 512
    if kind == 2:
        return rng.randbytes(PAGE)                       # raw
    if kind == 3:
        return bytes(2730) + rng.randbytes(PAGE - 2730)  # fio-like 3:1
    text = b"queue page %d " % rng.randrange(10000)
    return (text * (PAGE // len(text) + 1))[:PAGE]


def queue_script(q_id: int, nq: int, seed: int, steps: int):
    """Wake-ups for queue ``q_id``: single- and multi-page writes, reads, discards on the pages
    it owns (page % nq == q_id), so that what each read must return is known; returns the
    wake-ups and the expected (tag, data) of every read in order."""
    rng = random.Random(seed * 31 + q_id)
    mine = [p for p in range(PAGES) if p % nq == q_id]
    content = {}
    wakeups, reads = [], []
    for _ in range(steps):
        pages = rng.sample(mine, min(len(mine), rng.randrange(1, QDEPTH + 1)))
        reqs = []
        for tag, p in enumerate(pages):
            x = rng.random()
            if x < 0.45:
                data = pattern(rng)
                content[p] = data
                reqs.append((tag, W | (SWAP if rng.random() < 0.7 else 0), p * 8, 8, data))
            elif x < 0.85:
                reads.append((tag, content.get(p, bytes(PAGE))))
                reqs.append((tag, R, p * 8, 8, None))
            else:
                content.pop(p, None)
                reqs.append((tag, D, p * 8, 8, None))
        wakeups.append(reqs)
    return wakeups, reads, content


@pytest.fixture
def often_switching():
    """Threads interleave between bytecodes often, not every 5 ms."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


@pytest.mark.parametrize("nq", [2, 4])
@pytest.mark.parametrize("seed", range(2))
def test_queues_serve_their_own_tags_on_one_store_at_once(nq, seed, often_switching):
    store = small_store(0, PAGES * PAGE)
    scripts = [queue_script(q, nq, seed, 60) for q in range(nq)]
    queues, rings, errors = [], [], []
    for q in range(nq):
        wakeups = scripts[q][0]
        steps = [lambda k, reqs=reqs: [k.request(t, op, s, n, data=d) for t, op, s, n, d in reqs]
                 for reqs in wakeups]
        queues.append(Queue(7, store, q_id=q, depth=QDEPTH, buf_bytes=4 * PAGE))
        rings.append(FakeRing(QDEPTH, steps + [FakeRing.stop], q_id=q))
    start = threading.Barrier(nq)

    def serve(q, ring):
        try:
            start.wait()
            q.run(ring, ring.iod, cdev=-1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(q, r)) for q, r in zip(queues, rings)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        writes = 0
        for q, ring, (wakeups, reads, content) in zip(queues, rings, scripts):
            assert ring.armed == set()
            assert all(r >= 0 for _, r in ring.commits), ring.commits
            assert [d for _, d in ring.read_data] == [d for _, d in reads]
            assert [t for t, _ in ring.read_data] == [t for t, _ in reads]
            c = q.counters
            n = sum(len(w) for w in wakeups)
            assert c.requests == n and c.errors == 0
            writes += c.writes
        # the store after all of them: every page holds its owner's last write
        st = store.stats()
        assert st["num_writes"] == writes and st["failed_writes"] == 0
        invariants.check(store)
        out = memoryview(bytearray(PAGE))
        for q in range(nq):
            for p in range(q, PAGES, nq):
                store.read(p * PAGE, out)
                assert bytes(out) == scripts[q][2].get(p, bytes(PAGE)), f"page {p}"
    finally:
        for q, r in zip(queues, rings):
            r.close()
            q.close()
        store.close()
