"""The configuration file: ``/etc/ublkzswap.conf`` and its drop-ins, zram-generator style.

Owns: reading ``PATH`` and then ``PATH.d/*.conf`` (sorted by file name; a later file's key
replaces an earlier one's, as systemd drop-ins do) into a :class:`Config`: the daemon-wide
settings of ``[ublkzswapd]`` and one :class:`DeviceConfig` per ``[ublkbN]`` section; and
writing one (:func:`text`, :func:`write`) for tests and tools. What the words on ublkzswapd's
command line change in it is :mod:`params`' business; the swap units are :mod:`generator`'s.

    # comment          ; comment too (whole lines only)
    [ublkzswapd]       num-devices, compression-algorithm, allocator, standby, queues
    [ublkb0]           disksize, memlimit, backing-swap, compression-algorithm,
                       swap-priority, options

A size is a number of kB (as compcache's ``disksize_kb``), a number with a binary suffix
``K``, ``M``, ``G`` or ``T`` (``512M``), or a percentage of RAM (``25%``). An empty value
sets a key back to its default (a drop-in can undo a setting), except ``options``, where it
means no options at all. ``disksize`` and ``backing-swap`` are two ways of sizing a device:
both in one file is an error, and a later file's one replaces an earlier file's other.

Every problem -- a syntax error, an unknown section or key, a bad value, a section or key
given twice in one file -- is one :class:`ConfigError` whose text is one line,
``PATH:LINE: message`` (``PATH: message`` for a file that cannot be read at all); a
configuration with a problem is not used at all.

Still naive: only /etc is read (no /run or /usr/lib layers as systemd has); sizes are whole
numbers; a percentage is of the RAM of the machine that reads the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import compress
from .devices import total_ram_bytes
from .uapi import PAGE_SIZE as PAGE

DEFAULT_PATH = "/etc/ublkzswap.conf"
DAEMON_SECTION = "ublkzswapd"
MAX_DEVICES = 32                       # params.MAX_NUM_DEVICES is this
MAX_QUEUES = 8                         # queues per device (params.MAX_QUEUES is this)
DEFAULT_PRIORITY = 100                 # zram-generator's
DEFAULT_OPTIONS = "discard"            # zram-generator's
ALLOCATORS = ("log", "xvmalloc")       # params.ALLOCATORS is this (the store's names)

_SECTION = re.compile(r"ublkb(0|[1-9][0-9]{0,2})")
_SIZE = re.compile(r"([0-9]{1,20})\s*([KMGT%]?)", re.IGNORECASE)
_SHIFT = {"": 10, "K": 10, "M": 20, "G": 30, "T": 40}
_EXCLUSIVE = {"disksize": "backing-swap", "backing-swap": "disksize"}
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is one line, ``PATH:LINE: message``."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[ublkbN]`` section. 0 and "" mean the default: compcache's sizes (25% of RAM;
    the memory limit 15% of RAM with a backing swap, none without), no backing swap, the
    daemon's compressor. ``swap_priority`` -1 is the kernel's choice."""

    index: int
    disksize_kb: int = 0
    memlimit_kb: int = 0
    backing_swap: str = ""
    compressor: str = ""
    swap_priority: int = DEFAULT_PRIORITY
    options: str = DEFAULT_OPTIONS
    where: str = ""                    # PATH:LINE of its section header (the first one read)

    @property
    def bdev(self) -> str:
        return f"/dev/ublkb{self.index}"


@dataclass(frozen=True)
class Config:
    """What the files said. ``daemon`` holds only the ``[ublkzswapd]`` keys that were set,
    under ublkzswapd's parameter names (num_devices, compressor, allocator, standby, queues);
    ``where`` maps ``(section, key)`` to the ``PATH:LINE`` that set it."""

    files: tuple = ()
    daemon: dict = field(default_factory=dict)
    devices: dict = field(default_factory=dict)
    where: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- values
def _size_kb(value: str, ram: int) -> int:
    m = _SIZE.fullmatch(value)
    if m is None:
        raise ValueError(f"'{value}' is not a size (kB, or a number with K, M, G, T or %)")
    n, unit = int(m.group(1)), m.group(2).upper()
    if unit == "%":
        return n * (ram // 100) // 1024
    kb = (n << _SHIFT[unit]) // 1024
    if kb >= 1 << 53:
        raise ValueError(f"'{value}' is too large")
    return kb


def _disksize(value, ram):
    kb = _size_kb(value, ram)
    if kb * 1024 < 2 * PAGE:
        raise ValueError(f"'{value}' is smaller than two pages (8K)")
    return kb


def _priority(value, ram):
    try:
        p = int(value, 10)
    except ValueError:
        p = None
    if p is None or not -1 <= p <= 32767:
        raise ValueError(f"'{value}' is not a swap priority (-1..32767)")
    return p


def _options(value, ram):
    items = value.split(",")
    for item in items:
        if not item or any(c.isspace() for c in item):
            raise ValueError(f"'{value}' is not a comma-separated list of swap options")
        if item.partition("=")[0] == "pri":
            raise ValueError("give the priority as swap-priority, not pri= in options")
    return value


def _path(value, ram):
    if not value.startswith("/"):
        raise ValueError(f"'{value}' is not an absolute path")
    return value


def _compressor(value, ram):
    if value not in compress.names():
        raise ValueError(f"'{value}' is not one of {', '.join(compress.names())}")
    return value


def _num_devices(value, ram):
    if not value.isdigit() or not 1 <= int(value) <= MAX_DEVICES:
        raise ValueError(f"'{value}' is not a number of devices (1..{MAX_DEVICES})")
    return int(value)


def _queues(value, ram):
    if not value.isdigit() or not 1 <= int(value) <= MAX_QUEUES:
        raise ValueError(f"'{value}' is not a number of queues (1..{MAX_QUEUES})")
    return int(value)


def _allocator(value, ram):
    if value not in ALLOCATORS:
        raise ValueError(f"'{value}' is not one of {', '.join(ALLOCATORS)}")
    return value


def _boolean(value, ram):
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"'{value}' is not yes or no")


# key -> (field or parameter name, parser, metavar, what it is: the man page's text)
DEVICE_KEYS = {
    "disksize": ("disksize_kb", _disksize, "SIZE",
                 "Size of the device, the most uncompressed data it holds (rounded down to a "
                 "page). Not together with backing-swap. Default: 25% of RAM."),
    "memlimit": ("memlimit_kb", _size_kb, "SIZE",
                 "Limit on the memory holding the device's compressed pages. Writes beyond it go "
                 "to the backing swap; without one they fail and the kernel keeps the page in "
                 "RAM. Default: none; with a backing swap 15% of RAM, at most its size."),
    "backing-swap": ("backing_swap", _path, "PATH",
                     "A swap partition or file (mkswap'd, not swapped on itself) that takes the "
                     "pages that do not compress or do not fit under memlimit; the device then "
                     "has its size."),
    "compression-algorithm": ("compressor", _compressor, "NAME",
                              "The device's compression algorithm: "
                              + ", ".join(compress.names()) + ". Default: the daemon's "
                              "(compressor=, or [ublkzswapd]'s compression-algorithm)."),
    "swap-priority": ("swap_priority", _priority, "N",
                      "Priority of the device's swap unit (swapon -p), -1 to 32767; -1 lets the "
                      f"kernel choose. Default: {DEFAULT_PRIORITY}."),
    "options": ("options", _options, "OPTS",
                "Options of the device's swap unit (swapon -o), comma-separated; an empty value "
                f"means none. Default: {DEFAULT_OPTIONS}."),
}
DAEMON_KEYS = {
    "num-devices": ("num_devices", _num_devices, "N",
                    f"Devices to reserve, 1 to {MAX_DEVICES} (as num_devices=). Default: one past "
                    "the highest [ublkbN] configured."),
    "compression-algorithm": ("compressor", _compressor, "NAME",
                              "Compression algorithm of the devices that do not name their own "
                              "(as compressor=). Default: " + compress.names()[0] + "."),
    "allocator": ("allocator", _allocator, "|".join(ALLOCATORS),
                  f"How compressed pages are placed (as allocator=). Default: {ALLOCATORS[0]}."),
    "standby": ("standby", _boolean, "yes|no",
                "Keep a prepared standby that takes the devices over if the daemon dies (as "
                "--standby). Default: no."),
    "queues": ("queues", _queues, "N",
               f"Queues per device, each served by a thread of its own, 1 to {MAX_QUEUES} (as "
               "queues=; at most the online CPUs are used). Default: 1."),
}


# ----------------------------------------------------------------------------- reading
def files(path: str) -> list[str]:
    """``path`` if it exists, then ``path``.d/*.conf sorted by name. ConfigError if the
    directory exists but cannot be listed."""
    out = [path] if os.path.lexists(path) else []
    d = path + ".d"
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".conf") and not n.startswith("."))
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise ConfigError(d, f"cannot read: {e.strerror}") from None
    return out + [os.path.join(d, n) for n in names]


def _lines(path: str):
    """(line number, text) of one file, comments and blank lines left out."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{path}:{n}", "not UTF-8 text") from None
        if line and line[0] not in "#;":
            yield n, line


def _settings(path: str):
    """(section, key, value, PATH:LINE) of one file, checked for syntax, known sections and
    keys, and repeats within the file."""
    section, seen = None, set()
    for n, line in _lines(path):
        where = f"{path}:{n}"
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(where, f"'{line}' is not a [section] line")
            section = line[1:-1].strip()
            if section != DAEMON_SECTION and _SECTION.fullmatch(section) is None:
                raise ConfigError(where, f"unknown section [{section}] (sections are "
                                  f"[{DAEMON_SECTION}] and [ublkb0] to [ublkb{MAX_DEVICES - 1}])")
            if section != DAEMON_SECTION and int(section[5:]) >= MAX_DEVICES:
                raise ConfigError(where, f"[{section}]: device numbers are 0 to {MAX_DEVICES - 1}")
            if section in seen:
                raise ConfigError(where, f"[{section}] given twice in this file")
            seen.add(section)
            yield section, None, None, where
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(where, f"'{line}' is not key = value")
        if section is None:
            raise ConfigError(where, f"'{key}' is outside a section")
        keys = DAEMON_KEYS if section == DAEMON_SECTION else DEVICE_KEYS
        if key not in keys:
            raise ConfigError(where, f"unknown key '{key}' in [{section}] (keys: "
                              f"{', '.join(keys)})")
        if (section, key) in seen:
            raise ConfigError(where, f"'{key}' given twice in [{section}] in this file")
        seen.add((section, key))
        yield section, key, value, where


def read(path: str = DEFAULT_PATH, *, required: bool = False, ram: int | None = None) -> Config:
    """Read ``path`` and ``path``.d/*.conf. Without ``required`` a missing ``path`` (or no
    file at all) is an empty configuration; with it, ConfigError. ``ram`` (bytes) is what a
    percentage is of: this machine's RAM by default."""
    if required:
        try:
            os.stat(path)
        except OSError as e:
            raise ConfigError(path, f"cannot read: {e.strerror}") from None
    return parse_files(files(path), ram=ram)


def parse_files(paths: list[str], *, ram: int | None = None) -> Config:
    """The configuration of these files, read in this order. Raises ConfigError."""
    ram = total_ram_bytes() if ram is None else ram
    daemon: dict = {}
    devices: dict[int, dict] = {}
    where: dict = {}
    for path in paths:
        for section, key, value, at in _settings(path):
            if section != DAEMON_SECTION:
                devices.setdefault(int(section[5:]), {})
            if key is None:
                where.setdefault((section, None), at)
                continue
            name, parse = (DAEMON_KEYS if section == DAEMON_SECTION else DEVICE_KEYS)[key][:2]
            target = daemon if section == DAEMON_SECTION else devices[int(section[5:])]
            where[(section, key)] = at
            if value == "" and key != "options":
                target.pop(name, None)               # back to the default
                continue
            try:
                target[name] = parse(value, ram) if value else ""
            except ValueError as e:
                raise ConfigError(at, f"{key}: {e}") from None
            other = _EXCLUSIVE.get(key)
            if other is not None and DEVICE_KEYS[other][0] in target:
                if where[(section, other)].rpartition(":")[0] == path:
                    raise ConfigError(at, "disksize and backing-swap exclude each other (with "
                                      "a backing swap the device has the backing swap's size)")
                del target[DEVICE_KEYS[other][0]]    # an earlier file's: replaced
    out = {i: DeviceConfig(i, where=where[(f"ublkb{i}", None)], **kw)
           for i, kw in sorted(devices.items())}
    return Config(tuple(paths), daemon, out, where)


# ----------------------------------------------------------------------------- writing
def text(devices: dict, daemon: dict | None = None) -> str:
    """Configuration text: ``devices`` maps a device number to its keys (``{"disksize":
    "64M", "compression-algorithm": "lz4"}``), ``daemon`` holds [ublkzswapd] keys."""
    out = []
    for name, keys in ([(DAEMON_SECTION, daemon)] if daemon else []) + \
            [(f"ublkb{i}", keys) for i, keys in sorted(devices.items())]:
        out.append(f"[{name}]")
        out += [f"{k} = {v}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


def write(path: str, devices: dict, daemon: dict | None = None, *,
          ram: int | None = None) -> Config:
    """Write :func:`text` to ``path`` and read it back (so a bad key fails here, with its
    line). Returns the Config read (drop-ins in ``path``.d included)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text(devices, daemon))
    return read(path, required=True, ram=ram)
