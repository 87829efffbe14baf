"""ublkzswapd's parameters: compcache's module parameters plus ours, as ``key=value`` words.

Owns: :data:`PARAMETERS` (the one table behind parsing, ``--help`` and ublkzswapd(8)),
:func:`parse_params` (the words) and :func:`configure` (the words over the configuration file
that ``config=`` names, read by :mod:`config`). ``ublkzswapd num_devices=4 disksize_kb=20480``
reads like ``insmod ramzswap.ko num_devices=4 disksize_kb=20480``; ``--key=value`` is accepted
too. A word wins over the file for what it sets: ``compressor=``, ``allocator=``,
``num_devices=``, ``queues=`` and ``standby`` over ``[ublkzswapd]``'s keys, ``disksize_kb=``,
``memlimit_kb=`` and ``backing_swap=`` over ``[ublkb0]``'s (``disksize_kb=`` drops the file's
backing swap of device 0, ``backing_swap=`` its disksize). ``num_devices`` defaults to one past
the highest device configured. The result's ``devices`` maps each device to initialise at
start to its :class:`config.DeviceConfig`.

Still naive: a word can set only device 0 and cannot unset a key of the file.
"""

from __future__ import annotations

import os
from collections import namedtuple
from dataclasses import replace

from . import compress, config
from .control import ENV_SOCKET, default_path
from .uapi import PAGE_SIZE

MAX_NUM_DEVICES = config.MAX_DEVICES
MAX_QUEUES = config.MAX_QUEUES     # queues per device: see queue_count
TARGETS = ("compressed", "ram", "null")
TARGET_ALIASES = {"zswap": "compressed"}      # deprecated: easily read as the kernel's zswap
ALLOCATORS = config.ALLOCATORS

NO_CONFIG = "none"                 # config=none: read no configuration file

Param = namedtuple("Param", "name metavar default help")

PARAMETERS = (
    Param("num_devices", "N", "1, or one past the highest [ublkbN] configured",
          f"number of devices /dev/ublkb0../dev/ublkb(N-1) to reserve (1..{MAX_NUM_DEVICES})"),
    Param("disksize_kb", "KB", "25% of RAM",
          "if given, initialise device 0 at start with this size (page-aligned down; replaces "
          "[ublkb0]'s disksize and backing-swap)"),
    Param("memlimit_kb", "KB", "15% of RAM (with backing_swap)",
          "limit on memory for compressed pages of device 0; with a backing swap, writes beyond it "
          "are forwarded there, without one they fail and the kernel keeps the page"),
    Param("backing_swap", "PATH", "none",
          "if given, initialise device 0 at start with this backing swap (replaces [ublkb0]'s "
          "backing-swap and disksize)"),
    Param("target", "|".join(TARGETS), TARGETS[0],
          "what stores the data: compressed (compcache's compressed store, the default), ram "
          "(plain, for testing) or null (no data, for measuring the I/O round trip); "
          "target=zswap is a deprecated alias of target=compressed"),
    Param("compressor", "NAME", compress.names()[0],
          "compression algorithm of the compressed target, for devices not configured with "
          "their own: " + ", ".join(compress.names())),
    Param("allocator", "|".join(ALLOCATORS), ALLOCATORS[0],
          "how the compressed target places its pages: log (segments, compacted; the "
          "default) or xvmalloc (compcache's allocator, never compacted)"),
    Param("queues", "N", "1",
          f"queues per device (ublk's nr_hw_queues, 1..{MAX_QUEUES}, at most the online CPUs), "
          "each served by a thread of its own, so that compressions overlap on several CPUs; "
          "each queue costs about 3 MiB of locked memory (64 tag buffers of 32 KiB, a 256 KiB "
          "thread stack, heap for a compression running beside the others). The default is "
          "to become the number of CPUs once measurements show that it pays"),
    Param("slot_free", "on|off", "on",
          "on (the default): hear of every swap slot the kernel frees, as zram does, and drop "
          "its copy at once (a kprobe BPF program on the kernel's per-slot free hook; needs "
          "kprobes, BTF and root; where the kernel refuses, the device says why in the log "
          "and goes on as with off). Off: a copy is dropped only when its whole 2 MiB swap "
          "cluster is discarded (swapon --discard), so the device keeps the data of slots "
          "the kernel has freed"),
    Param("config", "PATH", config.DEFAULT_PATH,
          "read the devices to initialise at start and daemon settings from this file and "
          "PATH.d/*.conf (see CONFIGURATION); the default file is read if it exists, a file "
          f"named here must exist; config={NO_CONFIG} reads none"),
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
    Param("stop", None, "off",
          "stop the running daemon (with its socket=) losing nothing, as the unit's ExecStop: "
          "swap off its devices first, then stop it; while systemd restarts the service, "
          "leave its devices held instead, pages and all, for the next ublkzswapd"),
)
_NAMES = {p.name for p in PARAMETERS}
_NUMERIC = {"num_devices", "disksize_kb", "memlimit_kb", "queues"}
_FLAGS = {p.name for p in PARAMETERS if p.metavar is None}

USAGE = "usage: ublkzswapd [--foreground] [--standby] [--version] " + " ".join(
    f"[{p.name}={p.metavar}]" for p in PARAMETERS if p.metavar)


class UsageError(Exception):
    """Bad daemon parameters: printed as one line, exit status 2."""


def parse_params(argv: list[str]) -> dict:
    """``key=value`` words (``--key=value`` too) -> dict of typed values, defaults filled in;
    ``given`` is the set of names the words set. Reads no file (:func:`configure` does).
    Raises UsageError."""
    out: dict = {"num_devices": 1, "queues": 1, "target": TARGETS[0], "compressor": compress.names()[0],
                 "allocator": ALLOCATORS[0], "slot_free": "on", "foreground": False, "restart": False, "stop": False, "standby": False, "version": False,
                 "socket": default_path(), "config": config.DEFAULT_PATH}
    given = set()
    for word in argv:
        if word in ("-h", "--help"):
            raise UsageError("help")
        w = word[2:] if word.startswith("--") else word
        if w in _FLAGS:
            out[w] = True
            given.add(w)
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
        given.add(key)
    out["given"] = frozenset(given)
    if not 1 <= out["num_devices"] <= MAX_NUM_DEVICES:
        raise UsageError(f"num_devices={out['num_devices']}: must be 1..{MAX_NUM_DEVICES}")
    if not 1 <= out["queues"] <= MAX_QUEUES:
        raise UsageError(f"queues={out['queues']}: must be 1..{MAX_QUEUES}")
    out["target"] = TARGET_ALIASES.get(out["target"], out["target"])
    if out["target"] not in TARGETS:
        raise UsageError(f"target={out['target']}: must be {', '.join(TARGETS[:-1])} or {TARGETS[-1]}")
    if out["slot_free"] not in ("on", "off"):
        raise UsageError(f"slot_free={out['slot_free']}: must be on or off")
    if out["allocator"] not in ALLOCATORS:
        raise UsageError(f"allocator={out['allocator']}: must be {' or '.join(ALLOCATORS)}")
    if out["compressor"] not in compress.names():
        raise UsageError(f"compressor={out['compressor']}: must be one of {', '.join(compress.names())}")
    if "disksize_kb" in out and out["disksize_kb"] * 1024 < PAGE_SIZE:
        raise UsageError(f"disksize_kb={out['disksize_kb']}: smaller than one page")
    return out


def configure(cfg: dict, *, ram: int | None = None) -> dict:
    """:func:`parse_params`' result over the configuration ``cfg["config"]`` names (read with
    ``ram`` bytes as what a percentage is of; this machine's by default): see
    :func:`apply_config`. Raises config.ConfigError for the file, UsageError for the words."""
    path = cfg["config"]
    if path == NO_CONFIG:
        conf = config.Config()
    else:
        conf = config.read(path, required="config" in cfg["given"], ram=ram)
    return apply_config(cfg, conf)


def apply_config(cfg: dict, conf: config.Config) -> dict:
    """A copy of ``cfg`` with the file's settings where the words set nothing, ``devices``
    (device number -> DeviceConfig: every device to initialise at start) and ``num_devices``
    derived from them when neither words nor file give it. Raises UsageError (words) or
    config.ConfigError (file) when ``num_devices`` is too small for a configured device."""
    out, given = dict(cfg), cfg["given"]
    for name, value in conf.daemon.items():
        if name not in given:
            out[name] = value
    devices = dict(conf.devices)
    words = {k: cfg[k] for k in ("disksize_kb", "memlimit_kb", "backing_swap") if k in given}
    if words:
        if 0 not in devices and "disksize_kb" not in words and "backing_swap" not in words:
            raise UsageError("memlimit_kb parameter is valid only when backing_swap or disksize_kb "
                             "is also specified (or [ublkb0] is configured)")
        dev0 = devices.get(0) or config.DeviceConfig(0, where="command line")
        if "backing_swap" not in words and "disksize_kb" in words:
            dev0 = replace(dev0, backing_swap="")
        if "disksize_kb" not in words and "backing_swap" in words:
            dev0 = replace(dev0, disksize_kb=0)
        devices[0] = replace(dev0, **words)
    out["devices"] = dict(sorted(devices.items()))
    top = max(devices, default=-1)
    if "num_devices" in given or "num_devices" in conf.daemon:
        n = out["num_devices"]
        if top >= n:
            why = f"too small for [ublkb{top}] ({devices[top].where})"
            if "num_devices" in given:
                raise UsageError(f"num_devices={n}: {why}")
            raise config.ConfigError(conf.where[(config.DAEMON_SECTION, "num-devices")],
                                     f"num-devices = {n} is {why}")
    else:
        out["num_devices"] = max(1, top + 1)
    return out


def online_cpus() -> int:
    """CPUs online now (at least 1)."""
    try:
        return max(1, os.sysconf("SC_NPROCESSORS_ONLN"))
    except (ValueError, OSError):
        return 1


def queue_count(cfg: dict, cpus: int | None = None) -> int:
    """Queues a new device gets: ``queues``, at most ``cpus`` (the online CPUs by default).
    blk-mq maps every CPU to one hardware queue, so a queue beyond the CPUs would mostly sit
    idle; and the GIL serialises all but the compression, so beyond a few queues only the
    locked memory grows (hence MAX_QUEUES). The kernel clamps nr_hw_queues to its possible
    CPUs too; a device taken over keeps the queues its kernel device has."""
    return max(1, min(cfg.get("queues", 1), online_cpus() if cpus is None else cpus))


def compressors(cfg: dict) -> list[str]:
    """The compressors :func:`configure`'s result uses at start: the default's first."""
    names = [cfg["compressor"]]
    for dev in cfg.get("devices", {}).values():
        if dev.compressor and dev.compressor not in names:
            names.append(dev.compressor)
    return names


def help_text() -> str:
    lines = [USAGE]
    for p in PARAMETERS:
        lines.append(f"  {p.name + ('=' + p.metavar if p.metavar else ''):28s} {p.help} "
                     f"(default: {p.default})")
    return "\n".join(lines)
