"""rzscontrol: compcache 0.6.2's control utility, talking to ublkzswapd over the control socket.

Owns: the command line (:func:`build_parser` is also the source of the man page), the order
in which requests are sent, and the three renderers (compcache's exact ``--stats`` text via
:mod:`ublkzswap.stats`, JSON, and a zramctl-like device table).

Compatible with compcache 0.6.2 ``rzscontrol``:

- ``rzscontrol DEVICE [options]`` with the device first; fewer than two arguments print the
  original usage text and exit 0 (``rzscontrol`` alone, ``rzscontrol /dev/ublkb0`` alone);
- ``-b/--backing_swap``, ``-m/--memlimit_kb``, ``-d/--disksize_kb``, ``-i/--init``,
  ``-r/--reset``, ``-s/--stats``, ``-v/--verbose``, ``-h/--help`` (prints help and goes on),
  long options may be abbreviated as with getopt_long;
- requests go in compcache's fixed order whatever the order given (backing_swap, memlimit_kb,
  disksize_kb, init, reset, stats: the order of :data:`ublkzswap.control.OPS`, see
  ../shared/docs/compcache-reference.md); the first refusal prints ``<name>: <strerror>``
  (e.g. ``init: Device or resource busy``) and stops;
- sizes are decimal kB (a K/M/G/T suffix is our extension, as zramctl's); more than 10 digits prints ``memlimit_kb: Value too large for defined
  data type`` (EOVERFLOW) as the original did;
- ``--stats`` prints the original text byte for byte.

Deliberate differences: errors go to stderr and the exit status is 0 (success), 1 (a request
was refused or the daemon cannot be reached) or 2 (bad command line), not a raw ioctl return;
non-numeric sizes are rejected instead of being read as 0 by strtoul; an explicit 0 is sent
(compcache silently ignored ``-d 0``/``-m 0``); ``-v`` really prints ``device:`` (the original
printed it before parsing ``-v``, so never); a device path is ``/dev/ublkbN``, anything else is
refused with one line.

Extras: ``-j/--json`` (the stats as JSON with zram names; with a device and no other action
it implies ``--stats``, without a device ``--list``), ``--compact``, ``-V/--version``,
``--socket PATH`` (default :func:`ublkzswap.control.default_path`).

The device table, ``-l/--list``, follows zramctl(8). :data:`COLUMNS` is the one table behind
its output, its ``--help`` glossary and the man page's COLUMNS: zramctl's columns where zram
has the same thing, under zramctl's names, then STATE and BACKING. The default set,
:data:`DEFAULT_COLUMNS`, is rzscontrol's from before ``-o`` (MEM-LIMIT and STATE matter more
here than zramctl's STREAMS, always 1, and MOUNTPOINT, which STATE covers). Options as
zramctl's: ``-o/--output LIST`` (any case; ``+LIST`` appends to the default),
``--output-all``, ``-n/--noheadings``, ``--raw`` (one space, no alignment, whitespace and
backslashes as ``\\xHH`` as libsmartcols writes them), ``--bytes``; ``--json`` prints
``{"ublkbdevices": [{"name": ..., ...}]}`` (zramctl: ``"zramdevices"``) keyed by the
lower-case names of the columns shown, with sizes in bytes and counts as numbers (zramctl
prints the table's text) and null where the table shows "-". Only initialised devices are
listed, as zramctl lists only configured ones; ``--all`` adds the reserved, uninitialised
ones, named /dev/ublkbN like the device argument although that node does not exist yet. A
device argument shows just that device, in any state, after any requests. ``-o``,
``--output-all``, ``-n``, ``--raw`` and ``--all`` imply ``--list``; so do ``--bytes`` when
nothing else is asked and ``--json`` without a device. MOUNTPOINT ("[SWAP]") is read here
from /proc/swaps (:data:`SWAPS`), as zramctl reads it, not asked of the daemon.

Still naive: one request per round trip; MOUNTPOINT knows swap only, not mounts; the table's
long options make ``--r``, which compcache read as ``--reset``, ambiguous (``--raw``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import textwrap
from typing import Callable, NamedTuple

from . import __version__, control
from . import stats as statsmod
from .control import Client, DaemonUnreachable, default_path

PROG = "rzscontrol"
DEVICE_RE = re.compile(r"^/dev/ublkb(0|[1-9][0-9]*)$")
MAX_SIZE_LEN = 10  # compcache: "10 decimal digits", longer -> EOVERFLOW
USAGE = ("Usage: rzscontrol {<ublkzswap device>} [<options>]\n"
         "Example: rzscontrol /dev/ublkb0 --init\n"
         "See rzscontrol manpage for details.\n")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

SWAPS = "/proc/swaps"        # where MOUNTPOINT looks for swap devices (tests point it elsewhere)
JSON_KEY = "ublkbdevices"    # --list --json: {"ublkbdevices": [...]}, as zramctl's "zramdevices"
COMPAT_GROUP = "compcache options"
EXTRAS_GROUP = "extras (not in compcache)"
TABLE_GROUP = "device table (as zramctl's; -o, --output-all, -n, --raw and --all imply --list)"


class Column(NamedTuple):
    """One --list column. ``kind`` decides format and alignment: "text" (left-aligned),
    "size" (bytes: K/M/G unless --bytes), "count" and "ratio" (two decimals), all right-aligned.
    ``get`` takes a device's info dict (``ublkzswap.devices.Device.info`` plus "mountpoint")
    and returns the value, or None where it does not apply ("-"; null in JSON)."""
    name: str
    kind: str
    help: str
    get: Callable[[dict], object]


def _key(name: str) -> Callable[[dict], object]:
    return lambda info: info.get(name)


def _comp_ratio(info: dict) -> float | None:
    data, total = info.get("orig_data_size"), info.get("mem_used_total")
    return None if data is None or not total else data / total


# zramctl's columns in zramctl's order (where zram has the same thing), then ours.
COLUMNS = (
    Column("NAME", "text", "device name, /dev/ublkbN", lambda i: f"/dev/ublkb{i.get('dev')}"),
    Column("DISKSIZE", "size", "limit on the uncompressed amount of data (the size swapon sees)",
           _key("disksize")),
    Column("DATA", "size", "uncompressed size of stored data (OrigDataSize)",
           _key("orig_data_size")),
    Column("COMPR", "size", "compressed size of stored data (ComprDataSize)",
           _key("compr_data_size")),
    Column("ALGORITHM", "text", "compression algorithm (with target=ram or null, the target)",
           _key("algorithm")),
    Column("STREAMS", "count", "number of queues, each served by a thread of its own",
           _key("queues")),
    Column("ZERO-PAGES", "count", "pages filled with one repeated word, zero-filled ones "
           "included: no memory allocated (zram same_pages)", _key("same_pages")),
    Column("TOTAL", "size", "all memory used, including allocator fragmentation "
           "(MemUsedTotal)", _key("mem_used_total")),
    Column("MEM-LIMIT", "size", "limit on memory used for compressed data (0: none)",
           _key("mem_limit")),
    Column("MEM-USED", "size", "peak memory used to store compressed data since init "
           "(zram mem_used_max)", _key("mem_used_max")),
    Column("MIGRATED", "count", "pages given back by compaction since init (zram "
           "pages_compacted)", _key("pages_compacted")),
    Column("COMP-RATIO", "ratio", "compression ratio: DATA/TOTAL", _comp_ratio),
    Column("MOUNTPOINT", "text", "[SWAP] while the device is in use as swap (/proc/swaps)",
           _key("mountpoint")),
    Column("STATE", "text", "uninitialised, initialising, initialised, active (held: "
           "swapon, a mount), resetting or failed (its queue ended, or it could not be taken "
           "over)", _key("state")),
    Column("BACKING", "text", "backing swap device or file", _key("backing_swap")),
)
COLUMNS_BY_NAME = {c.name: c for c in COLUMNS}
DEFAULT_COLUMNS = tuple(COLUMNS_BY_NAME[n] for n in (
    "NAME", "DISKSIZE", "DATA", "COMPR", "TOTAL", "MEM-LIMIT", "ALGORITHM", "STATE"))

# The per-device requests rzscontrol sends, in the order it sends them: the ops of the control
# table that name an rzscontrol option, in table order. Each option's parser dest is op.option.
REQUESTS = tuple(op for op in control.OPS.values() if op.option)


class UsageError(Exception):
    """A bad command line; the message is printed as one line after 'rzscontrol: '."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # never sys.exit from inside the parser
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The rzscontrol parser; the man page's SYNOPSIS and OPTIONS are generated from it."""
    p = _Parser(
        prog=PROG, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s DEVICE [options]\n"
              "       %(prog)s [DEVICE] --list [-o LIST|--output-all] [-n] [--raw] [--all]",
        description="Control ublkzswap devices (compcache 0.6 ramzswap served by ublkzswapd).\n"
                    + textwrap.fill("Requests are applied in a fixed order: "
                                    + ", ".join(op.option for op in REQUESTS) + ".", 80),
        epilog=columns_help() + "\n\n" + statsmod.help_text())
    p.add_argument("device", nargs="?", metavar="DEVICE",
                   help="the device, /dev/ublkbN; must be the first argument")
    g = p.add_argument_group(COMPAT_GROUP)
    g.add_argument("-b", "--backing_swap", metavar="PATH",
                   help="swap device or file that takes writes beyond the memory limit and "
                        "incompressible pages (uninitialised device only)")
    g.add_argument("-m", "--memlimit_kb", metavar="KB",
                   help="limit in kB (or with a K, M, G or T suffix) on memory used for "
                        "compressed pages (may also be changed on an initialised device)")
    g.add_argument("-d", "--disksize_kb", metavar="KB",
                   help="device size in kB (or with a K, M, G or T suffix), without backing "
                        "swap (uninitialised device only)")
    g.add_argument("-i", "--init", action="store_true",
                   help="allocate metadata; the device is then ready for swapon")
    g.add_argument("-r", "--reset", action="store_true",
                   help="free all stored pages and metadata (after swapoff)")
    g.add_argument("-s", "--stats", action="store_true",
                   help="print the device's statistics (compcache format)")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="print each request before sending it")
    g.add_argument("-h", "--help", action="store_true",
                   help="print this help (and carry on with any other option)")
    x = p.add_argument_group(EXTRAS_GROUP)
    x.add_argument("--compact", action="store_true",
                   help="move stored pages together and give the memory emptied back "
                        "(zram's compact); prints the pages given back with -v")
    x.add_argument("-j", "--json", action="store_true",
                   help="JSON output: --stats under zram's counter names, --list under the "
                        "column names (sizes in bytes); with only a device, implies --stats, "
                        "without one --list")
    x.add_argument("-V", "--version", action="store_true",
                   help="print the version (and carry on with any other option)")
    x.add_argument("--socket", metavar="PATH",
                   help=f"control socket of ublkzswapd (default: ${control.ENV_SOCKET} or "
                        f"{control.DEFAULT_PATH})")
    t = p.add_argument_group(TABLE_GROUP)
    t.add_argument("-l", "--list", action="store_true",
                   help="show the initialised devices (with a device: just that one) in a table "
                        "of the columns below")
    cols = t.add_mutually_exclusive_group()
    cols.add_argument("-o", "--output", metavar="LIST",
                      help="columns to show, comma-separated (see below); +LIST adds them to "
                           "the default ones")
    cols.add_argument("--output-all", action="store_true", help="show every column")
    t.add_argument("-n", "--noheadings", action="store_true", help="no header line")
    t.add_argument("--raw", action="store_true",
                   help="no alignment: cells separated by one space, whitespace and "
                        "backslashes in them as \\xHH")
    t.add_argument("--all", action="store_true",
                   help="also show the uninitialised devices the daemon has reserved")
    t.add_argument("--bytes", action="store_true",
                   help="sizes in bytes instead of K/M/G (alone: implies --list)")
    return p


def columns_help(width: int = 80) -> str:
    """The column glossary for --help, zramctl's layout: names right-aligned, then the text."""
    lines = ["--list columns (default: " + " ".join(c.name for c in DEFAULT_COLUMNS) + "):"]
    for c in COLUMNS:
        lines.append(textwrap.fill(c.help, width, initial_indent=f"  {c.name:>10}  ",
                                   subsequent_indent=" " * 14))
    return "\n".join(lines)


def list_columns(output: str | None, output_all: bool = False) -> tuple[Column, ...]:
    """The columns of ``-o LIST`` (names as in :data:`COLUMNS`, any case; ``+LIST`` appends to
    the default), every column with ``--output-all``, else the default; UsageError naming an
    unknown column and listing the valid ones."""
    if output_all:
        return COLUMNS
    if output is None:
        return DEFAULT_COLUMNS
    add = output.startswith("+")
    out = list(DEFAULT_COLUMNS) if add else []
    for name in (output[1:] if add else output).split(","):
        col = COLUMNS_BY_NAME.get(name.strip().upper())
        if col is None:
            shown = name if len(name) <= 20 else name[:17] + "..."
            raise UsageError(f"unknown column {shown!r} (columns: "
                             + ",".join(c.name for c in COLUMNS) + ")")
        out.append(col)
    return tuple(out)


def swap_devices(path: str | None = None) -> set[str]:
    """Names in the Filename column of /proc/swaps (``path``, default :data:`SWAPS`); empty if
    it cannot be read."""
    try:
        with open(SWAPS if path is None else path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    return {line.split()[0] for line in lines if line.split()}


MAX_DEVICE = (1 << 20) - 1     # ublk_drv's highest device id (UBLK_MAX_UBLKS - 1)
PATH_MAX = 4096                # Linux's, with its terminating NUL


def device_number(path: str) -> int:
    """/dev/ublkbN -> N; UsageError for anything else (the name shortened in the message)."""
    m = DEVICE_RE.match(path)
    shown = path if len(path) <= 40 else path[:37] + "..."
    if not m:
        raise UsageError(f"not a ublkzswap device: {shown!r} (expected /dev/ublkbN)")
    if len(m.group(1)) > 7 or int(m.group(1)) > MAX_DEVICE:
        raise UsageError(f"not a ublkzswap device: {shown!r} (ublk device numbers go up to "
                         f"{MAX_DEVICE})")
    return int(m.group(1))


SIZE_SUFFIXES = {"K": 0, "M": 10, "G": 20, "T": 30}     # shift from kB, as zramctl's sizes


def parse_kb(name: str, value: str) -> int:
    """A size in kB: decimal kB as compcache accepted it (more than 10 digits: compcache's
    EOVERFLOW message), or digits with a K, M, G or T suffix (powers of 1024, either case) as
    zramctl takes. UsageError otherwise."""
    digits, shift = value, 0
    if value[-1:].upper() in SIZE_SUFFIXES:
        digits, shift = value[:-1], SIZE_SUFFIXES[value[-1].upper()]
    if len(digits) > MAX_SIZE_LEN:
        raise UsageError(f"{name}: {os.strerror(errno.EOVERFLOW)}", "bare")
    if not digits.isascii() or not digits.isdigit():
        raise UsageError(f"{name}: invalid size {value!r} (kB, or a number with K, M, G or T)")
    return int(digits) << shift


def human_size(n: int) -> str:
    """zramctl-style size: 0B, 512B, 4K, 1.5M, 2G."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for suffix in "KMGTPE":
        value /= 1024
        if value < 1024 or suffix == "E":
            break
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return text + suffix


def _value(col: Column, info: dict):
    v = col.get(info)
    return None if v is None or v == "" else v


def _cell(col: Column, info: dict, exact: bool) -> str:
    v = _value(col, info)
    if v is None:
        return "-"
    if col.kind == "size":
        return str(int(v)) if exact else human_size(int(v))
    if col.kind == "ratio":
        return f"{v:.2f}"
    return str(v)


def _raw_cell(text: str) -> str:
    """libsmartcols' raw form: whitespace, backslashes and unprintables as \\xHH."""
    return "".join(c if c.isprintable() and not c.isspace() and c != "\\"
                   else "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))
                   for c in text)


def _by_dev(infos: list[dict]) -> list[dict]:
    return sorted(infos, key=lambda i: i.get("dev", 0))


def render_list(infos: list[dict], columns=DEFAULT_COLUMNS, *, exact: bool = False,
                headings: bool = True, raw: bool = False) -> str:
    """The --list table: zramctl's layout (text left-aligned, numbers right, one space between
    columns, no trailing blanks), or with ``raw`` one space and no alignment. Nothing at all
    when there are no devices."""
    rows = [[_cell(c, info, exact) for c in columns] for info in _by_dev(infos)]
    if not rows:
        return ""
    if headings:
        rows.insert(0, [c.name for c in columns])
    if raw:
        return "".join(" ".join(_raw_cell(x) for x in r) + "\n" for r in rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    out = []
    for r in rows:
        cells = [x.ljust(w) if c.kind == "text" else x.rjust(w)
                 for x, w, c in zip(r, widths, columns)]
        out.append(" ".join(cells).rstrip() + "\n")
    return "".join(out)


def render_json(infos: list[dict], columns=DEFAULT_COLUMNS) -> str:
    """--list --json: ``{"ublkbdevices": [...]}``, one object per device keyed by the lower-case
    names of ``columns``; sizes in bytes and counts as integers, COMP-RATIO a number with two
    decimals, None (null) where the table shows "-"."""
    def value(col, info):
        v = _value(col, info)
        if v is None:
            return None
        if col.kind == "text":
            return str(v)
        return round(float(v), 2) if col.kind == "ratio" else int(v)
    devices = [{c.name.lower(): value(c, info) for c in columns} for info in _by_dev(infos)]
    return json.dumps({JSON_KEY: devices}, indent=2)


def _err(msg: str) -> None:
    if sys.stderr is not None:
        print(msg, file=sys.stderr)


class _StdoutClosed(Exception):
    """Output was due and standard output is closed (``rzscontrol --list >&-``)."""


class _ClosedStdout:
    """Stands for a closed standard output: writing raises, flushing does nothing, so a
    command with nothing to print still works."""

    def write(self, text: str) -> int:
        raise _StdoutClosed

    def flush(self) -> None:
        pass


def plan(argv: list[str]):
    """Parse ``argv`` into (args, dev, requests) or raise UsageError.

    ``requests`` is the list of (option name, op name, kwargs) in :data:`REQUESTS` order;
    ``dev`` is None for --list/--help without a device; ``args.columns`` are the --list
    columns. Returns None when the original would just print usage. Values are checked by their
    type in the op's schema (kB: decimal, at most 10 digits; path: no NUL).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is not None and argv[0] != args.device:
        raise UsageError(f"the device must be the first argument ({PROG} /dev/ublkbN [options])")
    args.columns = list_columns(args.output, args.output_all)
    if args.output is not None or args.output_all or args.noheadings or args.raw or args.all:
        args.list = True
    if args.device is None:
        args.list = args.list or args.bytes or args.json
        if args.list or args.help or args.version:
            return args, None, []
        if len(argv) < 2:
            return None
        raise UsageError(f"no device given ({PROG} /dev/ublkbN [options], or {PROG} --list)")
    if len(argv) < 2:
        return None
    dev = device_number(args.device)

    def given(op):
        return getattr(args, op.option) not in (None, False)

    if args.bytes and not any(map(given, REQUESTS)):
        args.list = True   # a device and --bytes alone: its row, sizes in bytes
    if args.json and not args.list and not any(map(given, REQUESTS)):
        args.stats = True  # a device and --json alone: the stats as JSON
    requests = []
    for op in filter(given, REQUESTS):
        kwargs = {}
        for argname, typ in op.args:
            if typ is control.DEVICE:
                continue
            kwargs[argname] = _option_value(op.option, typ, getattr(args, op.option))
        requests.append((op.option, op.name, kwargs))
    return args, dev, requests


def _option_value(name: str, typ: control.ArgType, value: str):
    """The request value for option ``name``'s text, by its argument type; UsageError."""
    if typ is control.KB:
        return parse_kb(name, value)
    if typ is control.PATH:
        if "\0" in value:
            raise UsageError(f"{name}: path contains a NUL byte")
        size = len(os.fsencode(value))
        if size >= PATH_MAX:
            raise UsageError(f"{name}: path of {size} bytes is too long (at most {PATH_MAX - 1})")
        return value
    raise TypeError(f"{name}: no command-line form for {typ.what}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the rzscontrol console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()
    try:
        return _main(argv)
    except _StdoutClosed:
        _err(f"{PROG}: write error: {os.strerror(errno.EBADF)}")
        return EXIT_FAIL
    except BrokenPipeError:                 # | head: the reader has gone, stop quietly
        sys.stdout = _ClosedStdout()
        return EXIT_FAIL


def _main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(USAGE)
        return EXIT_OK
    try:
        planned = plan(argv)
    except UsageError as e:
        if len(e.args) > 1 and e.args[1] == "bare":
            _err(e.args[0])
        else:
            _err(f"{PROG}: {e.args[0]} (see {PROG} --help)")
        return EXIT_USAGE
    if planned is None:
        sys.stdout.write(USAGE)
        return EXIT_OK
    args, dev, requests = planned
    if args.help:
        sys.stdout.write(build_parser().format_help())
        sys.stdout.flush()
    if args.version:
        sys.stdout.write(f"{PROG} from ublkzswap {__version__}\n")
        sys.stdout.flush()
    path = args.socket or default_path()
    if dev is None and not args.list:
        return EXIT_OK
    client = Client(path)
    try:
        return _run(client, args, dev, requests)
    except DaemonUnreachable as e:
        _err(f"{PROG}: cannot reach ublkzswapd at {path}: {e.strerror}")
        return EXIT_FAIL
    finally:
        client.close()


def _run(client: Client, args, dev, requests) -> int:
    if args.verbose and dev is not None:
        print(f"device: {args.device}")
    for name, op, kwargs in requests:
        if args.verbose and kwargs:
            print(f"{name}: {next(iter(kwargs.values()))}")
        try:
            result = client.call(op, dev, **kwargs)
        except DaemonUnreachable:
            raise
        except OSError as e:
            sys.stdout.flush()
            _err(f"{name}: {e.strerror or os.strerror(e.errno or errno.EIO)}")
            detail = getattr(e, "detail", None)
            if args.verbose and detail and detail != e.strerror:
                _err(f"{name}: {detail}")
            return EXIT_FAIL
        if op == "stats":
            if args.json:
                sys.stdout.write(statsmod.render_json(result) + "\n")
            else:
                sys.stdout.write(statsmod.render_text(result))
        elif op == "compact" and args.verbose:
            print(f"compact: {result} pages given back")
    if args.list:
        try:
            infos = [client.call("info", dev)] if dev is not None else client.call("list")
        except DaemonUnreachable:
            raise
        except OSError as e:
            _err(f"list: {e.strerror or os.strerror(e.errno or errno.EIO)}")
            return EXIT_FAIL
        if dev is None and not args.all:
            infos = [i for i in infos if i.get("state") != "uninitialised"]
        swaps = swap_devices()
        infos = [dict(i, mountpoint="[SWAP]" if f"/dev/ublkb{i.get('dev')}" in swaps else None)
                 for i in infos]
        if args.json:
            sys.stdout.write(render_json(infos, args.columns) + "\n")
        else:
            sys.stdout.write(render_list(infos, args.columns, exact=args.bytes,
                                         headings=not args.noheadings, raw=args.raw))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
