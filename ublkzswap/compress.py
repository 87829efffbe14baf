"""Compressor frontend: one small interface, compressors selected by name.

Owns: turning a 4 KiB page into a raw compressed stream and back.

- ``lzo`` (default, as compcache 0.6): LZO1X-1 through python-lzo,
  ``lzo.compress(page, 1, False)`` — level 1 is ``lzo1x_1_compress``, and
  ``header=False`` gives the raw stream with no python-lzo length header, the
  same bytes the kernel's ``lzo1x_1_compress`` produces. Decompression is
  ``lzo.decompress(src, False, 4096)``, which runs ``lzo1x_decompress_safe``
  into a buffer of exactly one page (corrupt input raises, never overruns).
- ``lz4``: LZ4 block format via the lz4 package, no size prefix.
- ``deflate``: raw deflate (zlib, wbits=-15), level 1; stdlib only.

A :class:`Compressor` has ``name``, ``compress(src) -> bytes`` and
``decompress(src, size) -> bytes``. ``src`` is anything exposing a read-only
buffer without a release hook: ``bytes`` or a numpy ``uint8`` array (python-lzo
refuses memoryviews; numpy views cost no copy). ``decompress`` must return
exactly ``size`` bytes or raise :class:`CompressionError`. The store accepts a
Compressor object too, which is how tests inject compressors of chosen output
lengths.

Still naive: no compression levels or dictionaries beyond the defaults; one
compressor per store (no recompression).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

from .uapi import PAGE_SIZE



class CompressionError(Exception):
    """A stream could not be (de)compressed."""


@dataclass(frozen=True)
class Compressor:
    """``compress(src) -> bytes``; ``decompress(src, size) -> bytes`` (exactly
    ``size`` bytes or CompressionError).

    ``compress_call`` / ``decompress_call`` are the same operations as
    ``(function, extra positional args)`` for the store's hot path, so that
    python-lzo is called with no Python frame in between
    (``fn(src, *args)``; a decompress call receives no size and may raise
    anything on a corrupt stream or return the wrong length: the store checks
    the length when it copies the page out). They default to the wrappers.
    """

    name: str
    compress: Callable[[object], bytes]
    decompress: Callable[[object, int], bytes]
    compress_call: tuple | None = None
    decompress_call: tuple | None = None

    def __post_init__(self):
        if self.compress_call is None:
            object.__setattr__(self, "compress_call", (self.compress, ()))
        if self.decompress_call is None:
            object.__setattr__(self, "decompress_call", (self.decompress, (PAGE_SIZE,)))


def _make_lzo() -> Compressor:
    import lzo

    c, d, err = lzo.compress, lzo.decompress, lzo.error

    def compress(src):
        return c(src, 1, False)

    def decompress(src, size=PAGE_SIZE):
        try:
            out = d(src, False, size)
        except err as e:
            raise CompressionError(f"lzo: {e}") from None
        if len(out) != size:
            raise CompressionError(f"lzo: stream decompressed to {len(out)} bytes, expected {size}")
        return out

    return Compressor("lzo", compress, decompress, (c, (1, False)), (d, (False, PAGE_SIZE)))


def _make_lz4() -> Compressor:
    import lz4.block

    c, d = lz4.block.compress, lz4.block.decompress

    def compress(src):
        return c(src, store_size=False)

    def decompress(src, size=PAGE_SIZE):
        try:
            out = d(src, uncompressed_size=size)
        except Exception as e:  # lz4.block.LZ4BlockError
            raise CompressionError(f"lz4: {e}") from None
        if len(out) != size:
            raise CompressionError(f"lz4: stream decompressed to {len(out)} bytes, expected {size}")
        return out

    return Compressor("lz4", compress, decompress)


def _make_deflate() -> Compressor:
    def compress(src):
        return zlib.compress(src, 1, -15)

    def decompress(src, size=PAGE_SIZE):
        try:
            z = zlib.decompressobj(-15)
            out = z.decompress(src, size)
        except zlib.error as e:
            raise CompressionError(f"deflate: {e}") from None
        if len(out) != size or z.unconsumed_tail:
            raise CompressionError(f"deflate: stream does not decompress to exactly {size} bytes")
        return out

    return Compressor("deflate", compress, decompress)


_FACTORIES = {"lzo": _make_lzo, "lz4": _make_lz4, "deflate": _make_deflate}
_cache: dict[str, Compressor] = {}


def names() -> list[str]:
    """Names accepted by :func:`get`, default first."""
    return list(_FACTORIES)


def get(name: str | Compressor) -> Compressor:
    """The compressor called ``name`` (a Compressor is returned as is).
    Raises ValueError for an unknown name, ImportError if its package is
    missing."""
    if isinstance(name, Compressor):
        return name
    try:
        factory = _FACTORIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown compressor {name!r}; known: {', '.join(_FACTORIES)}") from None
    comp = _cache.get(name)
    if comp is None:
        comp = _cache[name] = factory()
    return comp
