"""The request handler: descriptor fields + buffer + target -> bytes or -errno."""
import errno

import pytest

from ublkzswap import uapi
from ublkzswap.queue import handle_request
from ublkzswap.target import NullTarget, RamTarget, features

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
    assert handle_request(W, 16, last - 8, buf, ram) == -errno.EIO
    assert handle_request(R, 8, last, buf, ram) == -errno.EIO
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


class Recording:
    size = 1 << 20

    def __init__(self):
        self.calls = []

    def write(self, offset, buf):
        self.calls.append(("write", offset, len(buf)))

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
    from ublkzswap.queue import describe

    def inner():
        raise KeyError("tag 7")
    try:
        inner()
    except KeyError as e:
        text = describe(e)
    assert text.startswith("KeyError: 'tag 7' (test_queue.py:") and text.endswith(")")
    assert describe(ValueError("x")) == "ValueError: x"
