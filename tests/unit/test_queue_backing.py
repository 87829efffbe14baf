"""The queue's backing-I/O plumbing on a real io_uring (no ublk needed): the start-up prewarm
reads and the bound on backing ops in flight."""
import os

import numpy as np
import pytest

from ublkzswap import queue
from ublkzswap.target import OP_READ, OP_WRITE
from ublkzswap.uring import Ring

PAGE = 4096


@pytest.fixture
def backing(tmp_path):
    path = tmp_path / "backing"
    data = bytes(range(256)) * (64 * PAGE // 256)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    yield fd, data
    os.close(fd)


def test_prewarm_reads_page_zero_into_each_of_n_buffers(backing):
    fd, data = backing
    q = queue.Queue(0, None, depth=8, buf_bytes=64 * 1024, backing_fd=fd, backing_inflight=5)
    ring = Ring(16)
    try:
        q._prewarm(ring, fd, q.backing_inflight)
        for t in range(5):
            assert bytes(q.bufs[t][:PAGE]) == data[:PAGE]
        assert bytes(q.bufs[5][:PAGE]) == bytes(PAGE)      # only n buffers used
        assert len(ring.reap()) == 0                        # every CQE consumed
    finally:
        ring.close()
        q.close()


def test_prewarm_error_is_raised(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)                     # a directory: read gives -EISDIR
    q = queue.Queue(0, None, depth=4, buf_bytes=64 * 1024)
    ring = Ring(8)
    try:
        with pytest.raises(OSError, match="prewarm"):
            q._prewarm(ring, fd, 2)
    finally:
        ring.close()
        q.close()
        os.close(fd)


def test_backing_ops_beyond_the_bound_wait_their_turn(backing):
    fd, data = backing
    cap = 3
    q = queue.Queue(0, None, depth=4, buf_bytes=64 * 1024, backing_fd=fd, backing_inflight=cap)
    ring = Ring(16)
    try:
        # tag 1 writes 6 single pages (pages 10..15 of the file), tag 2 reads pages 0..3 at once
        q.bufs[1][:6 * PAGE] = bytes([0xA5]) * (6 * PAGE)
        q._submit_backing(ring, 1, [(OP_WRITE, fd, k * PAGE, PAGE, (10 + k) * PAGE) for k in range(6)])
        q._submit_backing(ring, 2, [(OP_READ, fd, 0, 4 * PAGE, 0)])
        assert q._inflight == cap and len(q._waiting) == 4
        done, most = [], 0
        while len(done) < 7:
            ring.submit_and_wait(1)
            cqes = ring.reap()
            assert (cqes["user_data"] & np.uint64(queue.BACKING_IO)).all()
            q._inflight -= len(cqes)
            done += list(zip(cqes["user_data"].tolist(), cqes["res"].tolist()))
            q._submit_waiting(ring)
            most = max(most, q._inflight)
        assert most <= cap and q._inflight == 0 and not q._waiting
        by_ud = dict(done)
        for k in range(6):
            assert by_ud[queue.BACKING_IO | (1 << 16) | k] == PAGE
        assert by_ud[queue.BACKING_IO | (2 << 16)] == 4 * PAGE
        assert os.pread(fd, 6 * PAGE, 10 * PAGE) == bytes([0xA5]) * (6 * PAGE)
        assert bytes(q.bufs[2][:4 * PAGE]) == data[:4 * PAGE]
    finally:
        ring.close()
        q.close()


def test_prewarm_refuses_a_command_completing_before_start(backing):
    fd, _ = backing
    q = queue.Queue(0, None, depth=4, buf_bytes=64 * 1024)
    ring = Ring(8)
    try:
        i = ring.claim(1)
        ring.sqes["opcode"][i] = 0          # IORING_OP_NOP standing in for a FETCH that came back
        ring.sqes["user_data"][i] = 3
        with pytest.raises(OSError, match="tag 3 completed before the device started"):
            q._prewarm(ring, fd, 2)
    finally:
        ring.close()
        q.close()


def test_a_queue_ring_made_in_its_thread_serves_reads_there(backing):
    # the queue's ring flags (task work deferred to the queue thread's waits): a read
    # submitted and reaped by the thread that made the ring completes as on a plain ring
    import threading
    fd, data = backing
    got = {}

    def body():
        ring = queue.make_ring(16, 64)
        try:
            got["flags"] = ring.flags
            idx = ring.claim(1)
            buf = np.zeros(PAGE, dtype=np.uint8)
            s = ring.sqes
            s["opcode"][idx] = queue.uapi.IORING_OP_READ
            s["fd"][idx] = fd
            s["addr"][idx] = buf.ctypes.data
            s["len"][idx] = PAGE
            s["cmd_op"][idx] = 3 * PAGE            # the offset's low word (as _submit_waiting)
            s["user_data"][idx] = 77
            ring.submit_and_wait(1)
            got["cqes"] = ring.reap_pairs()
            got["data"] = buf.tobytes()
        finally:
            ring.close()

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert got["flags"] & queue.RING_FLAGS == queue.RING_FLAGS     # this kernel takes them
    assert got["cqes"] == [(77, PAGE)]
    assert got["data"] == data[3 * PAGE:4 * PAGE]
