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
- sizes are decimal kB; more than 10 digits prints ``memlimit_kb: Value too large for defined
  data type`` (EOVERFLOW) as the original did;
- ``--stats`` prints the original text byte for byte.

Deliberate differences: errors go to stderr and the exit status is 0 (success), 1 (a request
was refused or the daemon cannot be reached) or 2 (bad command line), not a raw ioctl return;
non-numeric sizes are rejected instead of being read as 0 by strtoul; an explicit 0 is sent
(compcache silently ignored ``-d 0``/``-m 0``); ``-v`` really prints ``device:`` (the original
printed it before parsing ``-v``, so never); a device path is ``/dev/ublkbN``, anything else is
refused with one line.

Extras: ``-l/--list`` (a zramctl-like table of all devices: NAME DISKSIZE DATA COMPR TOTAL
MEM-LIMIT ALGORITHM STATE; ``--bytes`` for exact sizes), ``-j/--json`` (stats, or the list, as
JSON with zram names; with a device and no other action it implies ``--stats``),
``--socket PATH`` (default :func:`ublkzswap.control.default_path`).

Still naive: one request per round trip; no ``--output`` column selection for ``--list``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import textwrap

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

LIST_COLUMNS = ("NAME", "DISKSIZE", "DATA", "COMPR", "TOTAL", "MEM-LIMIT", "ALGORITHM", "STATE")

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
        usage="%(prog)s DEVICE [options]\n       %(prog)s --list [--json] [--bytes]",
        description="Control ublkzswap devices (compcache 0.6 ramzswap served by ublkzswapd).\n"
                    + textwrap.fill("Requests are applied in a fixed order: "
                                    + ", ".join(op.option for op in REQUESTS) + ".", 80),
        epilog=statsmod.help_text())
    p.add_argument("device", nargs="?", metavar="DEVICE",
                   help="the device, /dev/ublkbN; must be the first argument")
    g = p.add_argument_group("compcache options")
    g.add_argument("-b", "--backing_swap", metavar="PATH",
                   help="swap device or file that takes writes beyond the memory limit and "
                        "incompressible pages (uninitialised device only)")
    g.add_argument("-m", "--memlimit_kb", metavar="KB",
                   help="limit in kB on memory used for compressed pages "
                        "(may also be changed on an initialised device)")
    g.add_argument("-d", "--disksize_kb", metavar="KB",
                   help="device size in kB, without backing swap (uninitialised device only)")
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
    x = p.add_argument_group("extras (not in compcache)")
    x.add_argument("--compact", action="store_true",
                   help="move stored pages together and give the memory emptied back "
                        "(zram's compact); prints the pages given back with -v")
    x.add_argument("-l", "--list", action="store_true",
                   help="list all devices, zramctl style: " + " ".join(LIST_COLUMNS))
    x.add_argument("-j", "--json", action="store_true",
                   help="JSON output (zram counter names, bytes) for --stats or --list; "
                        "with only a device, implies --stats")
    x.add_argument("--bytes", action="store_true",
                   help="--list: sizes in bytes instead of K/M/G")
    x.add_argument("-V", "--version", action="store_true",
                   help="print the version (and carry on with any other option)")
    x.add_argument("--socket", metavar="PATH",
                   help=f"control socket of ublkzswapd (default: ${control.ENV_SOCKET} or "
                        f"{control.DEFAULT_PATH})")
    return p


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


def parse_kb(name: str, value: str) -> int:
    """A decimal kB value as compcache accepted it; UsageError with compcache's message."""
    if len(value) > MAX_SIZE_LEN:
        raise UsageError(f"{name}: {os.strerror(errno.EOVERFLOW)}", "bare")
    if not value.isascii() or not value.isdigit():
        raise UsageError(f"{name}: invalid size {value!r} (decimal kB expected)")
    return int(value)


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


def render_list(infos: list[dict], *, exact: bool = False) -> str:
    """The --list table (zramctl layout: left-aligned NAME/ALGORITHM/STATE, sizes right)."""
    def size(info, key):
        v = info.get(key)
        if v is None:
            return "-"
        return str(int(v)) if exact else human_size(int(v))

    rows = [LIST_COLUMNS]
    for info in sorted(infos, key=lambda i: i.get("dev", 0)):
        rows.append((f"/dev/ublkb{info.get('dev')}", size(info, "disksize"),
                     size(info, "orig_data_size"), size(info, "compr_data_size"),
                     size(info, "mem_used_total"), size(info, "mem_limit"),
                     str(info.get("algorithm") or "-"), str(info.get("state") or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(LIST_COLUMNS))]
    left = {0, 6, 7}
    out = []
    for r in rows:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append(" ".join(cells).rstrip() + "\n")
    return "".join(out)


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
    ``dev`` is None for --list/--help without a device. Returns None when the original would
    just print usage. Values are checked by their type in the op's schema (kB: decimal, at most
    10 digits; path: no NUL).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is not None and argv[0] != args.device:
        raise UsageError(f"the device must be the first argument ({PROG} /dev/ublkbN [options])")
    if args.device is None:
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
            infos = client.call("list")
        except DaemonUnreachable:
            raise
        except OSError as e:
            _err(f"list: {e.strerror or os.strerror(e.errno or errno.EIO)}")
            return EXIT_FAIL
        if args.json:
            out = [dict(info, name=f"/dev/ublkb{info.get('dev')}") for info in infos]
            sys.stdout.write(json.dumps({"devices": out}, indent=2) + "\n")
        else:
            sys.stdout.write(render_list(infos, exact=args.bytes))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
