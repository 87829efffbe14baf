"""ublkzswapd's parameters: compcache's module parameters plus ours, as ``key=value`` words.

Owns: :data:`PARAMETERS` (the one table behind parsing, ``--help`` and ublkzswapd(8)) and
:func:`parse_params`. ``ublkzswapd num_devices=4 disksize_kb=20480`` reads like
``insmod ramzswap.ko num_devices=4 disksize_kb=20480``; ``--key=value`` is accepted too.

Still naive: no config file yet.
"""

from __future__ import annotations

from collections import namedtuple

from . import compress
from .control import ENV_SOCKET, default_path
from .uapi import PAGE_SIZE

MAX_NUM_DEVICES = 32
TARGETS = ("compressed", "ram", "null")
TARGET_ALIASES = {"zswap": "compressed"}      # deprecated: easily read as the kernel's zswap
ALLOCATORS = ("log", "xvmalloc")

Param = namedtuple("Param", "name metavar default help")

PARAMETERS = (
    Param("num_devices", "N", "1", f"number of devices /dev/ublkb0../dev/ublkb(N-1) to reserve (1..{MAX_NUM_DEVICES})"),
    Param("disksize_kb", "KB", "25% of RAM",
          "if given, initialise device 0 at start with this size (page-aligned down)"),
    Param("memlimit_kb", "KB", "15% of RAM (with backing_swap)",
          "limit on memory for compressed pages of device 0; with a backing swap, writes beyond it "
          "are forwarded there, without one they fail and the kernel keeps the page"),
    Param("backing_swap", "PATH", "none",
          "if given (and disksize_kb is not), initialise device 0 with this backing swap"),
    Param("target", "|".join(TARGETS), TARGETS[0],
          "what stores the data: compressed (compcache's compressed store, the default), ram "
          "(plain, for testing) or null (no data, for measuring the I/O round trip); "
          "target=zswap is a deprecated alias of target=compressed"),
    Param("compressor", "NAME", compress.names()[0],
          "compression algorithm of the compressed target: " + ", ".join(compress.names())),
    Param("allocator", "|".join(ALLOCATORS), ALLOCATORS[0],
          "how the compressed target places its pages: log (segments, compacted; the "
          "default) or xvmalloc (compcache's allocator, never compacted)"),
    Param("socket", "PATH", default_path(),
          f"control socket for rzscontrol (environment: {ENV_SOCKET})"),
    Param("foreground", None, "off", "stay in the foreground (default: return once the devices are ready)"),
    Param("standby", None, "off",
          "keep a prepared standby process that takes the devices over at once if the server "
          "dies (it costs about as much locked memory as the server); without one, a dead "
          "server's devices hold their I/O, pages kept, until ublkzswapd is started again"),
    Param("version", None, "off", "print the version and exit"),
    Param("restart", None, "off",
          "hand the running daemon's devices to a fresh one running the installed code, losing "
          "nothing (with the socket= of the daemon to restart), then exit"),
)
_NAMES = {p.name for p in PARAMETERS}
_NUMERIC = {"num_devices", "disksize_kb", "memlimit_kb"}
_FLAGS = {p.name for p in PARAMETERS if p.metavar is None}

USAGE = "usage: ublkzswapd [--foreground] [--standby] [--version] " + " ".join(
    f"[{p.name}={p.metavar}]" for p in PARAMETERS if p.metavar)


class UsageError(Exception):
    """Bad daemon parameters: printed as one line, exit status 2."""


def parse_params(argv: list[str]) -> dict:
    """``key=value`` words (``--key=value`` too) -> dict of typed values. Raises UsageError."""
    out: dict = {"num_devices": 1, "target": TARGETS[0], "compressor": compress.names()[0],
                 "allocator": ALLOCATORS[0], "foreground": False, "restart": False, "standby": False, "version": False,
                 "socket": default_path()}
    for word in argv:
        if word in ("-h", "--help"):
            raise UsageError("help")
        w = word[2:] if word.startswith("--") else word
        if w in _FLAGS:
            out[w] = True
            continue
        key, sep, value = w.partition("=")
        if not sep:
            raise UsageError(f"'{word}' is not key=value")
        if key not in _NAMES or key in _FLAGS:
            raise UsageError(f"unknown parameter '{key}'")
        if key in _NUMERIC:
            if not value.isascii() or not value.isdigit() or len(value) > 19:
                raise UsageError(f"{key}: '{value}' is not a decimal number")
            out[key] = int(value)
        else:
            if not value:
                raise UsageError(f"{key}: empty value")
            out[key] = value
    if not 1 <= out["num_devices"] <= MAX_NUM_DEVICES:
        raise UsageError(f"num_devices={out['num_devices']}: must be 1..{MAX_NUM_DEVICES}")
    out["target"] = TARGET_ALIASES.get(out["target"], out["target"])
    if out["target"] not in TARGETS:
        raise UsageError(f"target={out['target']}: must be {', '.join(TARGETS[:-1])} or {TARGETS[-1]}")
    if out["allocator"] not in ALLOCATORS:
        raise UsageError(f"allocator={out['allocator']}: must be {' or '.join(ALLOCATORS)}")
    if out["compressor"] not in compress.names():
        raise UsageError(f"compressor={out['compressor']}: must be one of {', '.join(compress.names())}")
    if "disksize_kb" in out and out["disksize_kb"] * 1024 < PAGE_SIZE:
        raise UsageError(f"disksize_kb={out['disksize_kb']}: smaller than one page")
    if "memlimit_kb" in out and "backing_swap" not in out and "disksize_kb" not in out:
        raise UsageError("memlimit_kb parameter is valid only when backing_swap or disksize_kb "
                         "is also specified")
    return out


def help_text() -> str:
    lines = [USAGE]
    for p in PARAMETERS:
        lines.append(f"  {p.name + ('=' + p.metavar if p.metavar else ''):28s} {p.help} "
                     f"(default: {p.default})")
    return "\n".join(lines)
