"""The queue's serving loop (Queue.run, the code that serves /dev/ublkbN) against a kernel
played by the test (fakering.FakeRing): requests in as completions plus descriptors,
COMMIT_AND_FETCH results and backing reads/writes out."""
import errno
import logging

import numpy as np
import pytest

from fakering import FakeRing
from ublkzswap import uapi
from ublkzswap.queue import BACKING_IO, Queue
from ublkzswap.target import OP_WRITE, BackingIO, RamTarget

R, W, F, D = (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_OP_FLUSH,
              uapi.UBLK_IO_OP_DISCARD)
PAGE = 4096
ENODEV = uapi.UBLK_IO_RES_ABORT


def serve(target, steps, depth=4, buf_bytes=16 * PAGE, **kw):
    """Run a queue of ``depth`` tags on ``target`` through ``steps``, then STOP_DEV."""
    q = Queue(7, target, depth=depth, buf_bytes=buf_bytes, **kw)
    ring = FakeRing(depth, list(steps) + [FakeRing.stop])
    try:
        q.run(ring, ring.iod, cdev=-1)
    finally:
        ring.close()
        q.close()
    assert ring.armed == set() and ring.inflight == []
    return q, ring


@pytest.fixture
def ram():
    t = RamTarget(1 << 20)
    yield t
    t.close()


def test_fetch_serve_commit_and_stop(ram):
    data = bytes(range(256)) * (2 * PAGE // 256)
    q, ring = serve(ram, [
        lambda k: [k.request(2, W | uapi.UBLK_IO_F_SWAP, 16, 16, data=data)],
        lambda k: [k.request(2, R, 16, 16), k.request(0, F, 0, 0), k.request(3, D, 16, 8)],
        lambda k: [k.request(1, R, 16, 16)],
    ])
    assert q.armed.is_set() and ring.fetches == [0, 1, 2, 3]
    assert ring.commits == [(2, 2 * PAGE), (2, 2 * PAGE), (0, 0), (3, 0), (1, 2 * PAGE)]
    assert ring.read_data == [(2, data), (1, bytes(PAGE) + data[PAGE:])]   # the discarded page reads 0
    c = q.counters
    assert (c.reads, c.writes, c.flushes, c.discards) == (2, 1, 1, 1)
    assert (c.requests, c.batches, c.errors, c.invalid_io, c.faults) == (5, 3, 0, 0, 0)
    assert ring.addrs == {t: int(q.buf_addrs[t]) for t in range(4)}   # each tag its own buffer


def test_bad_shapes_are_answered_by_the_queue_and_counted(ram):
    q, ring = serve(ram, [
        lambda k: [k.request(0, W, 3, 8), k.request(1, R, (1 << 20) >> 9, 8),
                   k.request(2, W, 0, 8 * 17)],      # 17 pages into a 16-page buffer
    ])
    assert ring.commits == [(0, -errno.EINVAL), (1, -errno.EIO), (2, -errno.EINVAL)]
    assert q.counters.invalid_io == 3 and q.counters.errors == 3


class Buggy(RamTarget):
    """Writes to page 0 hit a bug inside the target."""

    def write(self, offset, buf):
        if offset == 0:
            return self.no_such_table[offset]
        return super().write(offset, buf)


def test_a_bug_in_the_target_fails_its_request_only(caplog):
    t = Buggy(1 << 20)
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        q, ring = serve(t, [
            lambda k: [k.request(0, W, 0, 8, data=b"x" * PAGE)],
            lambda k: [k.request(0, W, 8, 8, data=b"y" * PAGE), k.request(1, R, 8, 8)],
        ])
    t.close()
    assert ring.commits == [(0, -errno.EIO), (0, PAGE), (1, PAGE)]
    assert ring.read_data == [(1, b"y" * PAGE)]
    assert q.counters.faults == 1 and q.counters.errors == 1
    [rec] = caplog.records
    assert rec.getMessage().startswith("queue 0 of device 7: AttributeError:")


class Forwarding:
    """Every write needs backing I/O first: one op per page at file offset 1 MiB + offset; done
    records what it was given and fails as ``failure`` says."""
    size = 1 << 20

    def __init__(self, failure=None):
        self.failure = failure
        self.done = []

    def read(self, offset, buf):
        return None

    def write(self, offset, buf):
        ops = [(OP_WRITE, 5, k, PAGE, (1 << 20) + offset + k) for k in range(0, len(buf), PAGE)]

        def done(results):
            self.done.append((offset, results))
            if self.failure is not None and offset == 0:
                raise self.failure
        return BackingIO(ops, done)


def test_backing_ops_run_bounded_in_order_and_complete_their_request():
    t = Forwarding()
    q, ring = serve(t, [
        lambda k: [k.request(0, W, 0, 24), k.request(1, W, 80, 16)],   # 3 + 2 backing writes
        lambda k: k.complete_backing(1),
        lambda k: k.complete_backing(1) + [k.request(2, R, 0, 8)],
        lambda k: k.complete_backing(2, res=-errno.EIO)[:1] + k.complete_backing(2)[1:],
        lambda k: k.complete_backing(),
    ], backing_inflight=2)
    base = [int(a) for a in q.buf_addrs]
    tagged = lambda tag, i: BACKING_IO | tag << 16 | i  # noqa: E731
    assert [(o.user_data, o.opcode, o.fd, o.addr, o.len, o.off) for o in ring.backing] == [
        (tagged(0, 0), uapi.IORING_OP_WRITE, 5, base[0], PAGE, 1 << 20),
        (tagged(0, 1), uapi.IORING_OP_WRITE, 5, base[0] + PAGE, PAGE, (1 << 20) + PAGE),
        (tagged(0, 2), uapi.IORING_OP_WRITE, 5, base[0] + 2 * PAGE, PAGE, (1 << 20) + 2 * PAGE),
        (tagged(1, 0), uapi.IORING_OP_WRITE, 5, base[1], PAGE, (1 << 20) + (80 << 9)),
        (tagged(1, 1), uapi.IORING_OP_WRITE, 5, base[1] + PAGE, PAGE, (1 << 20) + (80 << 9) + PAGE),
    ]
    assert ring.most_inflight == 2
    # tag 2's request is served while tag 0 and 1 wait on their backing ops
    assert ring.commits == [(2, PAGE), (0, 3 * PAGE), (1, 2 * PAGE)]
    assert t.done == [(0, [PAGE, PAGE, -errno.EIO]), (80 << 9, [PAGE, PAGE])]


def test_a_failing_completion_callback_fails_its_request_and_serving_goes_on(caplog):
    t = Forwarding(failure=ValueError("bug in done"))
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        q, ring = serve(t, [
            lambda k: [k.request(0, W, 0, 8)],
            lambda k: k.complete_backing(),
            lambda k: [k.request(0, W, 8, 8)],
            lambda k: k.complete_backing(),
        ])
    assert ring.commits == [(0, -errno.EIO), (0, PAGE)]
    assert q.counters.faults == 1 and q.counters.errors == 1
    assert "ValueError: bug in done" in caplog.records[0].getMessage()


def test_an_oserror_from_a_completion_callback_keeps_its_errno():
    t = Forwarding(failure=OSError(errno.ENOSPC, "full"))
    q, ring = serve(t, [lambda k: [k.request(0, W, 0, 8)], lambda k: k.complete_backing()])
    assert ring.commits == [(0, -errno.ENOSPC)] and q.counters.faults == 0


def test_a_rejected_command_ends_its_tag_and_counts_as_an_error(ram):
    q, ring = serve(ram, [[(1, -errno.EINVAL)], lambda k: [k.request(0, R, 0, 8)]], depth=2)
    assert ring.commits == [(0, PAGE)] and q.counters.errors == 1


def test_commits_wait_for_sq_room_instead_of_failing():
    # an 8-slot SQ: six backing writes claimed in the same wake-up leave room for two of the
    # five commits, so the loop must submit before claiming the rest
    q = Queue(0, Forwarding(), depth=8, buf_bytes=4 * PAGE)
    ring = FakeRing(8, [lambda k: [k.request(t, W, 16 * t, 16) for t in range(3)]
                        + [k.request(t, R, 0, 8) for t in range(3, 8)],
                        lambda k: k.complete_backing(), FakeRing.stop], entries=8)
    try:
        q.run(ring, ring.iod, -1)
    finally:
        ring.close()
        q.close()
    assert len(ring.backing) == 6 and ring.most_inflight == 6
    assert ring.commits == [(t, PAGE) for t in range(3, 8)] + [(t, 2 * PAGE) for t in range(3)]


def test_many_wake_ups_wrap_both_rings(ram):
    # 2 tags on a 4-slot SQ and an 16-slot CQ: 300 requests wrap each many times
    steps = [lambda k, i=i: [k.request(i % 2, R if i % 3 else W, 8 * (i % 5), 8)] for i in range(300)]
    q, ring = serve(ram, steps, depth=2)
    assert [t for t, _ in ring.commits] == [i % 2 for i in range(300)]
    assert all(r == PAGE for _, r in ring.commits)
    assert q.counters.requests == 300 and q.counters.batches == 300


def test_buffers_made_ahead_are_what_a_later_queue_takes():
    # a standby makes its queues' buffers before it waits: a takeover takes no new memory
    from ublkzswap import queue as qmod
    qmod.prepare_buffers(2, 8 * 4 * PAGE)
    made = list(qmod._spare[-2:])
    addrs = [np.frombuffer(m, dtype=np.uint8).ctypes.data for m in made]
    try:
        q = Queue(0, RamTarget(64 * PAGE), depth=8, buf_bytes=4 * PAGE)
        assert int(q.buf_addrs[0]) in addrs
        other = Queue(1, RamTarget(64 * PAGE), depth=4, buf_bytes=4 * PAGE)   # another size
        assert int(other.buf_addrs[0]) not in addrs
        q.close()
        other.close()
    finally:
        for m in made:
            if m in qmod._spare:
                qmod._spare.remove(m)
