"""io_uring through liburing, natively on this host (io_uring needs no ublk)."""
import errno
import os

import numpy as np
import pytest

from ublkzswap import uapi
from ublkzswap.uring import Ring


def test_nop_round_trips_through_ring_wrap():
    with Ring(8) as r:
        seen = []
        for k in range(40):          # 200 SQEs through an 8-entry ring: wraps many times
            for j in range(5):
                r.prep_nop(k * 10 + j)
            c = r.wait(5)
            seen.extend(c["user_data"].tolist())
            assert (c["res"] == 0).all()
        assert seen == [k * 10 + j for k in range(40) for j in range(5)]


def test_claim_refuses_more_than_free():
    with Ring(4) as r:
        r.claim(4)
        with pytest.raises(OSError) as e:
            r.claim(1)
        assert e.value.errno == errno.EBUSY
        r.submit()
        r.wait(4)
        assert len(r.claim(4)) == 4


def test_claim_zeroes_stale_slots():
    with Ring(4) as r:
        for _ in range(2):
            idx = r.claim(4)
            r.sqes["user_data"][idx] = 0xDEAD
            r.sqes["opcode"][idx] = uapi.IORING_OP_NOP
            r.submit()
            r.wait(4)
        idx = r.claim(4)
        assert (r.sqes["user_data"][idx] == 0).all()


def test_file_write_read_round_trip(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        data = np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8)
        with Ring(16) as r:
            r.prep_rw(uapi.IORING_OP_WRITE, fd, data.ctypes.data, 8192, 4096, 1)
            c = r.wait(1)
            assert c["res"][0] == 8192
            back = np.zeros(8192, dtype=np.uint8)
            r.prep_rw(uapi.IORING_OP_READ, fd, back.ctypes.data, 8192, 4096, 2)
            c = r.wait(1)
            assert c["res"][0] == 8192 and (back == data).all()
            assert os.pread(fd, 8192, 4096) == data.tobytes()
            # a read on a bad fd comes back as -EBADF in the CQE, not as an exception
            r.prep_rw(uapi.IORING_OP_READ, 9999, back.ctypes.data, 10, 0, 3)
            c = r.wait(1)
            assert c["res"][0] == -errno.EBADF
    finally:
        os.close(fd)


def test_sqe128_ring_has_128_byte_slots_and_runs_nops():
    with Ring(4, uapi.IORING_SETUP_SQE128) as r:
        assert r.sqe_size == 128
        assert r.sqe_address(1) - r.sqe_address(0) == 128
        for i in range(10):
            r.prep_nop(i)
            assert r.wait(1)["user_data"][0] == i


def test_batch_reap_returns_everything_ready():
    with Ring(32, cq_entries=64) as r:
        idx = r.claim(32)
        r.sqes["opcode"][idx] = uapi.IORING_OP_NOP
        r.sqes["user_data"][idx] = np.arange(32)
        r.submit_and_wait(32)
        c = r.reap()
        assert sorted(c["user_data"].tolist()) == list(range(32))
        assert len(r.reap()) == 0


def test_reap_pairs_returns_ints_in_order_across_the_cq_wrap():
    r = Ring(8, cq_entries=16)
    try:
        seen = []
        for round_ in range(5):                     # 5 x 7 CQEs through a 16-entry CQ: wraps
            idx = r.claim(7)
            r.sqes["opcode"][idx] = uapi.IORING_OP_NOP
            r.sqes["user_data"][idx] = np.arange(7, dtype=np.uint64) + (round_ << 40)
            r.submit_and_wait(7)
            got = r.reap_pairs()
            assert all(type(u) is int and type(res) is int for u, res in got)
            seen += got
            assert r.reap_pairs() == [] and r.cq_ready() == 0
        assert seen == [((k // 7) << 40 | k % 7, 0) for k in range(35)]
    finally:
        r.close()


def test_reap_pairs_carries_negative_results(tmp_path):
    r = Ring(4)
    try:
        r.prep_rw(uapi.IORING_OP_READ, 1 << 20, 0, 0, 0, user_data=(1 << 63) | 9)   # bad fd
        r.submit_and_wait(1)
        assert r.reap_pairs() == [((1 << 63) | 9, -errno.EBADF)]
    finally:
        r.close()


def test_put_rows_copies_templates_and_patches_one_field():
    r = Ring(8, flags=uapi.IORING_SETUP_SQE128)
    try:
        rows = np.zeros((3, r.sqe_size), dtype=np.uint8)
        t = rows.view(r.sqes.dtype).reshape(3)
        t["opcode"] = uapi.IORING_OP_NOP
        t["user_data"] = [100, 101, 102]
        t["io_tag"] = [0, 1, 2]
        at = r.sqes.dtype.fields["io_result"][1]
        for round_ in range(3):                     # 3 x 3 rows through an 8-entry SQ: wraps
            r.put_rows(memoryview(rows).cast("B"), [(2, -5), (0, 4096), (1, 7)], at)
            r.submit_and_wait(3)
            assert sorted(r.reap_pairs()) == [(100, 0), (101, 0), (102, 0)]
        # the last three slots written hold the rows and the patched results
        last = [(r._ring.sq.sqe_tail - 3 + k) & r.sq_mask for k in range(3)]
        assert r.sqes["user_data"][last].tolist() == [102, 100, 101]
        assert r.sqes["io_result"][last].tolist() == [-5, 4096, 7]
        assert t["io_result"].tolist() == [0, 0, 0]   # templates untouched
        with pytest.raises(OSError) as e:
            r.put_rows(memoryview(rows).cast("B"), [(0, 0)] * 9, at)
        assert e.value.errno == errno.EBUSY
    finally:
        r.close()
