"""The request handler: descriptor fields + buffer + target -> bytes or -errno, the request
shape check in front of the target and the exception -> errno boundary behind it."""
import errno
import logging

import pytest

from ublkzswap import uapi
from ublkzswap.handler import Boundary, QueueCounters, finish_backing, request_handler
from ublkzswap.target import OP_READ, OP_WRITE, BackingIO, NullTarget, RamTarget, features


def handle_request(op_flags, nr_sectors, start_sector, buf, target, counters=None):
    """One request through a handler built for it (a queue builds one per run)."""
    return request_handler(target, len(buf), counters)(op_flags, nr_sectors, start_sector, buf)

R, W, F, D, WZ = (uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_OP_FLUSH,
                  uapi.UBLK_IO_OP_DISCARD, uapi.UBLK_IO_OP_WRITE_ZEROES)


@pytest.fixture
def ram():
    t = RamTarget(1 << 20)
    yield t
    t.close()


def test_write_then_read_round_trip(ram):
    buf = bytearray(64 * 1024)
    buf[:8192] = bytes(range(256)) * 32
    assert handle_request(W | uapi.UBLK_IO_F_SWAP, 16, 8, memoryview(buf), ram) == 8192
    out = bytearray(64 * 1024)
    assert handle_request(R, 16, 8, memoryview(out), ram) == 8192
    assert out[:8192] == buf[:8192]
    assert out[8192:] == bytes(len(out) - 8192)   # nothing beyond the request touched


def test_past_end_is_rejected_and_nothing_written(ram):
    buf = memoryview(bytearray(8192))
    last = (1 << 20) // 512
    c = QueueCounters()
    assert handle_request(W, 16, last - 8, buf, ram, c) == -errno.EIO
    assert handle_request(R, 8, last, buf, ram, c) == -errno.EIO
    assert c.invalid_io == 2
    out = bytearray(4096)
    handle_request(R, 8, last - 8, memoryview(out), ram)
    assert out == bytes(4096)


def test_request_larger_than_buffer_is_einval(ram):
    assert handle_request(W, 16, 0, memoryview(bytearray(4096)), ram) == -errno.EINVAL


def test_discard_and_write_zeroes_read_back_zeros(ram):
    buf = memoryview(bytearray(b"\xff" * 16384))
    handle_request(W, 32, 0, buf, ram)
    assert handle_request(D, 8, 0, buf, ram) == 0
    assert handle_request(WZ, 8, 8, buf, ram) == 0
    out = bytearray(16384)
    handle_request(R, 32, 0, memoryview(out), ram)
    assert out[:8192] == bytes(8192) and out[8192:] == b"\xff" * 8192


def test_flush_and_unknown_op(ram):
    buf = memoryview(bytearray(4096))
    assert handle_request(F, 0, 0, buf, ram) == 0
    assert handle_request(uapi.UBLK_IO_OP_WRITE_SAME, 8, 0, buf, ram) == -errno.EOPNOTSUPP


class Exploding:
    size = 1 << 20

    def __init__(self, exc):
        self.exc = exc

    def read(self, offset, buf):
        raise self.exc

    write = read


def test_exceptions_become_errno_at_the_one_boundary():
    buf = memoryview(bytearray(4096))
    assert handle_request(W, 8, 0, buf, Exploding(OSError(errno.ENOSPC, "full"))) == -errno.ENOSPC
    assert handle_request(R, 8, 0, buf, Exploding(ValueError("bug"))) == -errno.EIO
    # a target without discard: the op is refused, not crashed on
    assert handle_request(D, 8, 0, buf, Exploding(None)) == -errno.EOPNOTSUPP


def test_features_follow_implemented_methods(ram):
    assert features(ram) == {"discard", "write_zeroes", "flush"}
    assert features(Exploding(None)) == set()
    assert features(NullTarget(4096)) == {"discard", "write_zeroes", "flush"}


class Reads:
    """A target that records its reads and writes."""
    size = 1 << 20

    def __init__(self):
        self.calls = []

    def read(self, offset, buf):
        self.calls.append(("read", offset, len(buf)))

    def write(self, offset, buf):
        self.calls.append(("write", offset, len(buf)))


class Recording(Reads):
    """... and its swap writes."""

    def write_swap(self, offset, buf):
        self.calls.append(("write_swap", offset, len(buf)))


def test_swap_writes_go_to_write_swap_when_the_target_has_it():
    t = Recording()
    buf = memoryview(bytearray(8192))
    assert handle_request(W | uapi.UBLK_IO_F_SWAP, 16, 8, buf, t) == 8192
    assert handle_request(W, 8, 0, buf, t) == 4096
    assert t.calls == [("write_swap", 4096, 8192), ("write", 0, 4096)]
    # a target without write_swap gets swap writes through write()
    ram = RamTarget(1 << 20)
    assert handle_request(W | uapi.UBLK_IO_F_SWAP, 8, 0, buf, ram) == 4096
    ram.close()


def test_describe_names_type_message_and_innermost_line():
    from ublkzswap.handler import describe

    def inner():
        raise KeyError("tag 7")
    try:
        inner()
    except KeyError as e:
        text = describe(e)
    assert text.startswith("KeyError: 'tag 7' (test_queue.py:") and text.endswith(")")
    assert describe(ValueError("x")) == "ValueError: x"


class Calls(Reads):
    """A target that records what reaches it (and has every optional method but write_swap)."""

    def discard(self, offset, length):
        self.calls.append(("discard", offset, length))

    def write_zeroes(self, offset, length):
        self.calls.append(("write_zeroes", offset, length))


@pytest.mark.parametrize("op,nr,start,answer", [
    (R, 8, 1, -errno.EINVAL),          # start not on a 4 KiB boundary
    (W, 1, 0, -errno.EINVAL),          # length not a whole page
    (W, 0, 0, -errno.EINVAL),          # empty
    (R, 40, 0, -errno.EINVAL),         # longer than the tag buffer (16 KiB here)
    (W, 8, (1 << 20) >> 9, -errno.EIO),        # starts at the end
    (R, 16, ((1 << 20) >> 9) - 8, -errno.EIO),  # runs past the end
    (D, 4, 0, -errno.EINVAL),          # half a page
    (D, 0, 8, -errno.EINVAL),
    (WZ, 8, 12, -errno.EINVAL),
    (D, 16, ((1 << 20) >> 9) - 8, -errno.EIO),
    (WZ, 8, (1 << 20) >> 9, -errno.EIO),
])
def test_a_bad_request_shape_is_refused_before_the_target_and_counted(op, nr, start, answer):
    t, c = Calls(), QueueCounters()
    assert handle_request(op, nr, start, memoryview(bytearray(16384)), t, c) == answer
    assert t.calls == [] and c.invalid_io == 1 and c.faults == 0


def test_good_shapes_reach_the_target_in_bytes():
    t, c = Calls(), QueueCounters()
    buf = memoryview(bytearray(16384))
    last = ((1 << 20) >> 9) - 32
    assert handle_request(R, 32, last, buf, t, c) == 16384            # the last 16 KiB, whole buffer
    assert handle_request(W | uapi.UBLK_IO_F_SWAP, 8, 8, buf, t, c) == 4096
    assert handle_request(D, 2048, 0, buf, t, c) == 0                 # no buffer bound for discard
    assert handle_request(WZ, 8, 16, buf, t, c) == 0
    assert t.calls == [("read", last << 9, 16384), ("write", 4096, 4096), ("discard", 0, 1 << 20),
                       ("write_zeroes", 8192, 4096)]
    assert c.invalid_io == 0


class NoOptional:
    size = 1 << 20
    discard = None                      # present but not callable: not an operation

    def read(self, offset, buf):
        pass

    def write(self, offset, buf):
        pass


def test_missing_optional_ops_are_answered_by_the_queue():
    t, c = NoOptional(), QueueCounters()
    buf = memoryview(bytearray(4096))
    assert handle_request(F, 0, 0, buf, t, c) == 0
    assert handle_request(D, 8, 0, buf, t, c) == -errno.EOPNOTSUPP
    assert handle_request(WZ, 8, 0, buf, t, c) == -errno.EOPNOTSUPP
    assert c.faults == 0 and c.invalid_io == 0


class Buggy:
    """A target with a bug inside: an attribute that is not there."""
    size = 1 << 20

    def read(self, offset, buf):
        pass

    def write(self, offset, buf):
        return self.no_such_table[offset]


def test_attribute_error_inside_a_target_is_a_fault_not_eopnotsupp(caplog):
    c = QueueCounters()
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        assert handle_request(W, 8, 0, memoryview(bytearray(4096)), Buggy(), c) == -errno.EIO
    assert c.faults == 1
    [rec] = caplog.records
    assert rec.name == "ublkzswap.queue"
    assert ("AttributeError: 'Buggy' object has no attribute 'no_such_table' (test_queue.py:"
            in rec.getMessage())


def test_oserror_keeps_its_errno_unlogged_and_a_bogus_errno_is_a_fault(caplog):
    c = QueueCounters()
    b = Boundary(c)
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        assert b(OSError(errno.ENOSPC, "full")) == -errno.ENOSPC
        assert b(OSError("no errno")) == -errno.EIO
        assert not caplog.records and c.faults == 0
        assert b(OSError(-5, "negative")) == -errno.EIO      # would read as 5 bytes done
        assert b(OSError(1 << 20, "huge")) == -errno.EIO
    assert c.faults == 2 and len(caplog.records) == 1


def test_fault_records_are_rate_limited_and_count_what_they_left_out(caplog, monkeypatch):
    from ublkzswap import queue
    now = [1000.0]
    monkeypatch.setattr(queue.time, "monotonic", lambda: now[0])
    c = QueueCounters()
    b = Boundary(c, "queue 0 of device 3", interval=10.0)
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        for k in range(5):
            assert b(KeyError(k)) == -errno.EIO
            now[0] += 1.0
        now[0] += 10.0
        assert b(ValueError("later")) == -errno.EIO
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and c.faults == 6
    assert msgs[0].startswith("queue 0 of device 3: KeyError: 0") and "more since" not in msgs[0]
    assert msgs[1].startswith("queue 0 of device 3: ValueError: later")
    assert msgs[1].endswith("(4 more since the last record)")


class Pending:
    """A target whose writes need backing I/O: what ``io`` says."""
    size = 1 << 20

    def __init__(self, io):
        self.io = io

    def read(self, offset, buf):
        return self.io

    write = read


def test_a_target_returning_backing_io_gets_it_checked(caplog):
    buf = memoryview(bytearray(16384))
    ok = BackingIO([(OP_WRITE, 9, 0, 4096, 0), (OP_READ, 9, 4096, 4096, 1 << 33)])
    assert handle_request(W, 16, 0, buf, Pending(ok)) is ok
    seen = []
    empty = BackingIO([], seen.append)
    assert handle_request(R, 8, 0, buf, Pending(empty)) == 4096 and seen == [[]]
    c = QueueCounters()
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        outside = BackingIO([(OP_READ, 9, 4096, 4096, 0)])          # past an 8-sector request
        assert handle_request(R, 8, 0, buf, Pending(outside), c) == -errno.EIO
        assert handle_request(R, 8, 0, buf, Pending(5), c) == -errno.EIO
    assert c.faults == 2


def test_finish_backing_goes_through_the_same_boundary(caplog):
    c = QueueCounters()
    b = Boundary(c)

    def fails(exc):
        def done(results):
            raise exc
        return BackingIO([(OP_READ, 3, 0, 4096, 0)], done)

    assert finish_backing(BackingIO([(OP_READ, 3, 0, 4096, 0)]), [4096], 4096, b) == 4096
    assert finish_backing(fails(OSError(errno.EIO, "short")), [-5], 4096, b) == -errno.EIO
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        assert finish_backing(fails(ValueError("bug")), [4096], 4096, b) == -errno.EIO
    assert c.faults == 1 and "ValueError: bug" in caplog.records[0].getMessage()


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")


def test_an_exception_that_cannot_be_described_is_still_logged(caplog):
    c = QueueCounters()
    with caplog.at_level(logging.ERROR, logger="ublkzswap.queue"):
        assert Boundary(c)(Unprintable()) == -errno.EIO
    assert "Unprintable" in caplog.records[0].getMessage() and c.faults == 1
