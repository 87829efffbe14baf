"""Compressor frontend: raw LZO1X-1 streams (no python-lzo header), safe
decompression with the known length, other compressors by name."""

import os
import random

import lzo
import numpy as np
import pytest

from ublkzswap import compress as cz

PAGE = 4096


def pages():
    rng = random.Random(3)
    text = b"".join(rng.choice([b"alpha ", b"beta ", b"gamma ", b"\x00\x00\x00\x00"]) for _ in range(2000))[:PAGE]
    return [bytes(PAGE), text, os.urandom(PAGE), os.urandom(100) + bytes(PAGE - 100)]


def test_names_and_default():
    assert cz.names()[0] == "lzo"
    assert set(cz.names()) >= {"lzo", "lz4"}


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown compressor"):
        cz.get("zstd-9000")


def test_get_passes_compressor_objects_through():
    c = cz.Compressor("x", bytes, lambda s, n: bytes(s))
    assert cz.get(c) is c


def test_lzo_is_raw_lzo1x_1_stream():
    c = cz.get("lzo")
    for p in pages():
        raw = c.compress(p)
        # python-lzo's own header format: 1 byte + 4 byte length, then the same stream
        assert lzo.compress(p, 1, True)[5:] == raw
        assert lzo.decompress(raw, False, PAGE) == p


@pytest.mark.parametrize("name", ["lzo", "lz4", "deflate"])
def test_roundtrip_from_numpy_views(name):
    c = cz.get(name)
    for p in pages():
        arr = np.frombuffer(bytearray(p), dtype=np.uint8)
        s = c.compress(arr)
        assert isinstance(s, bytes)
        back = np.frombuffer(bytearray(s + b"junk"), dtype=np.uint8)[:len(s)]
        assert c.decompress(back, PAGE) == p


@pytest.mark.parametrize("name", ["lzo", "lz4", "deflate"])
def test_corrupt_or_truncated_streams_raise(name):
    c = cz.get(name)
    text = pages()[1]
    s = c.compress(text)
    with pytest.raises(cz.CompressionError):
        c.decompress(s[:len(s) // 2], PAGE)
    with pytest.raises(cz.CompressionError):
        c.decompress(os.urandom(300), PAGE)


def test_lzo_stream_for_a_longer_page_is_refused():
    c = cz.get("lzo")
    s = c.compress(os.urandom(2 * PAGE))
    with pytest.raises(cz.CompressionError):
        c.decompress(s, PAGE)  # output would overrun one page


def test_lzo_stream_for_a_shorter_page_is_refused():
    c = cz.get("lzo")
    s = c.compress(b"abc" * 100)
    with pytest.raises(cz.CompressionError):
        c.decompress(s, PAGE)


def test_zero_and_same_pages_compress_small():
    c = cz.get("lzo")
    assert len(c.compress(bytes(PAGE))) < 64
    assert len(c.compress(b"12345678" * 512)) < 64
