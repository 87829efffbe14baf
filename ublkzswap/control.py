"""The control protocol: framing, the table of operations, and the client rzscontrol uses.

Owns: how rzscontrol talks to ublkzswapd, and the one table (:data:`OPS`) that says which
operations exist, what arguments they take, who may send them and in which order rzscontrol
sends them. The server (:mod:`ublkzswap.ctlserver`) checks and dispatches requests from this
table, rzscontrol (:mod:`ublkzswap.cli`) takes its request order from it, and the operation list
at the end of this docstring is generated from it. This module imports only the standard library,
so the CLI never loads the daemon's memory machinery. Nothing here is on the I/O path.

Protocol (version 1). A unix stream socket; every message, both ways, is one *frame*:
a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON (an object).
Requests: ``{"v": 1, "op": OP, ...args}`` with the op's arguments as named in its schema
(e.g. ``{"v": 1, "op": "set_disksize_kb", "dev": 0, "kb": 10240}``). Answers:
``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "errno": N, "error": "text"}``.
A connection may carry any number of request/answer pairs, strictly in turn.

A wrong version is refused with EPROTO; an unknown op or an argument that does not fit its
type with EINVAL; an owner-only op from anyone but root or the daemon's own uid (SO_PEERCRED)
with EPERM; a body that is not a JSON object with EBADMSG. After these the connection stays
usable. A frame longer than :data:`MAX_MESSAGE` is answered with EMSGSIZE and the connection
closed (the stream cannot be resynchronised). Access to the socket itself is governed by its
file mode (0660) and directory. Every other refusal comes from the daemon's Manager (contract
in docs/CONTRACTS.md) as the errno of its ``OSError``: a Manager op calls the Manager method
of the same name with the schema's arguments in order.

Default socket path: :func:`default_path` (``$UBLKZSWAP_SOCKET``, else :data:`DEFAULT_PATH`).

Still naive: no authentication beyond uid; one request per connection at a time; the client
does not check arguments against the table (the server does).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
from typing import Callable, NamedTuple

PROTOCOL_VERSION = 1
DEFAULT_PATH = "/run/ublkzswap/control.sock"
ENV_SOCKET = "UBLKZSWAP_SOCKET"
MAX_MESSAGE = 64 * 1024
HEADER = struct.Struct(">I")
MAX_PATH = 4096
MAX_U64 = (1 << 64) - 1
MAX_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1


def default_path() -> str:
    """``$UBLKZSWAP_SOCKET`` (:data:`ENV_SOCKET`) if set and non-empty, else
    :data:`DEFAULT_PATH`."""
    return os.environ.get(ENV_SOCKET) or DEFAULT_PATH


def check_socket_path(path: str) -> None:
    """Raise OSError(ENAMETOOLONG) for a path that does not fit in a sockaddr_un."""
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        raise OSError(errno.ENAMETOOLONG, f"socket path longer than {MAX_SUN_PATH} bytes")


# ---------------------------------------------------------------- the table of operations

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_u64(v) -> bool:
    return _is_int(v) and 0 <= v <= MAX_U64


def _is_path(v) -> bool:
    return isinstance(v, str) and len(v) <= MAX_PATH and "\0" not in v


class ArgType(NamedTuple):
    """The type of a request argument: ``check(value)`` accepts it; ``what`` completes the
    refusal "OP: 'NAME' must be WHAT"; ``doc`` describes it in the operation list."""
    what: str
    doc: str
    check: Callable[[object], bool]


DEVICE = ArgType("a device number", "device number, 0..2^64-1", _is_u64)
KB = ArgType("an integer 0..2^64-1", "size in kB, 0..2^64-1", _is_u64)
PATH = ArgType("a path string", f"path string, at most {MAX_PATH} characters, no NUL", _is_path)


class Op(NamedTuple):
    """One control operation.

    ``args``: the request's fields besides ``v`` and ``op``, as (name, ArgType), in the order
    the Manager method takes them. ``owner_only``: refused with EPERM unless the peer is root
    or the daemon's uid. ``help``: one line for the operation list. ``result``: what the
    answer's ``result`` holds. ``option``: the rzscontrol option that sends this op for one
    device (compcache's name), or None; rzscontrol sends them in table order. ``manager``:
    True if the server calls ``Manager.<name>(*args)``, False if it composes the answer itself
    (``ControlServer._op_<name>``).
    """
    name: str
    args: tuple[tuple[str, ArgType], ...]
    owner_only: bool
    help: str
    result: str = "null"
    option: str | None = None
    manager: bool = True


_DEV = ("dev", DEVICE)

# Table order is compcache 0.6.2's ioctl order for the ops rzscontrol sends (backing_swap,
# memlimit_kb, disksize_kb, init, reset, stats; ../shared/docs/compcache-reference.md), with
# zram's compact before stats, so that --compact --stats shows its effect.
OPS: dict[str, Op] = {op.name: op for op in (
    Op("set_backing_swap", (_DEV, ("path", PATH)), True,
       "set the swap device or file behind the device (uninitialised device only)",
       option="backing_swap"),
    Op("set_memlimit_kb", (_DEV, ("kb", KB)), True,
       "set the limit on memory for compressed pages (any state)", option="memlimit_kb"),
    Op("set_disksize_kb", (_DEV, ("kb", KB)), True,
       "set the device size, used without backing swap (uninitialised device only)",
       option="disksize_kb"),
    Op("init", (_DEV,), True, "allocate metadata and start serving /dev/ublkbN",
       option="init"),
    Op("reset", (_DEV,), True, "free all stored pages and metadata (not while in use)",
       option="reset"),
    Op("compact", (_DEV,), True, "move stored pages together so that emptied memory goes back "
       "(zram's compact; initialised device only)", result="pages given back", option="compact"),
    Op("stats", (_DEV,), False, "the device's counters (initialised device only)",
       result="stats dict (names in stats.py)", option="stats"),
    Op("info", (_DEV,), False, "state, sizes and algorithm of one device, in any state",
       result="info dict (keys in docs/CONTRACTS.md)"),
    Op("devices", (), False, "the daemon's device numbers", result="[N, ...]"),
    Op("list", (), False, "info of every device (one removed meanwhile is skipped)",
       result="[info, ...]", manager=False),
    Op("ping", (), False, "the daemon's protocol version and pid",
       result='{"version", "pid"}', manager=False),
)}


def check_request(msg: dict) -> tuple[Op, tuple]:
    """Validate a request against :data:`OPS`; returns (op, argument values in schema order).

    Raises OSError(EPROTO) for a wrong version, OSError(EINVAL) for an unknown op or an
    argument that is missing or does not fit its type. Permission is the server's business.
    """
    if msg.get("v") != PROTOCOL_VERSION:
        raise OSError(errno.EPROTO, f"unsupported protocol version {msg.get('v')!r} "
                                    f"(this daemon speaks {PROTOCOL_VERSION})")
    name = msg.get("op")
    op = OPS.get(name) if isinstance(name, str) else None
    if op is None:
        raise OSError(errno.EINVAL, f"unknown op {name!r}")
    values = []
    for arg, typ in op.args:
        v = msg.get(arg)
        if not typ.check(v):
            raise OSError(errno.EINVAL, f"{op.name}: '{arg}' must be {typ.what}")
        values.append(v)
    return op, tuple(values)


def describe_ops() -> str:
    """The operation list as text (appended to this module's docstring)."""
    width = max(len(op.name) + sum(len(a) + 1 for a, _ in op.args) for op in OPS.values())
    lines = ["Operations (generated from OPS; 'owner' = root or the daemon's uid only):", ""]
    for op in OPS.values():
        call = " ".join([op.name] + [a for a, _ in op.args])
        who = "owner " if op.owner_only else "anyone"
        lines.append(f"  {call:<{width}}  {who}  -> {op.result}")
        lines.append(f"      {op.help}")
    types = {}
    for op in OPS.values():
        for a, typ in op.args:
            types.setdefault(a, typ)
    aw = max(map(len, types), default=0)
    lines += ["", "Arguments:", ""] + [f"  {a:<{aw}}  {t.doc}" for a, t in types.items()]
    return "\n".join(lines) + "\n"


if __doc__ is not None:  # None under python -OO
    __doc__ += "\n" + describe_ops()


# ---------------------------------------------------------------- framing

def encode(msg: dict) -> bytes:
    """One frame: length + compact JSON. Raises ValueError when it exceeds MAX_MESSAGE."""
    body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(len(body)) + body


class FrameError(Exception):
    """A frame that cannot be parsed; ``errno`` says why (EMSGSIZE or EBADMSG)."""

    def __init__(self, err: int, text: str):
        super().__init__(text)
        self.errno = err


def decode_body(body: bytes) -> dict:
    """Parse a frame body into a dict; FrameError(EBADMSG) for anything but a JSON object."""
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FrameError(errno.EBADMSG, f"malformed message: {e}") from None
    if not isinstance(msg, dict):
        raise FrameError(errno.EBADMSG, "malformed message: not a JSON object")
    return msg


def split_frame(buf: bytes | bytearray, max_message: int = MAX_MESSAGE):
    """(body, consumed) for the first complete frame in ``buf``, or (None, 0) if incomplete.

    Raises FrameError(EMSGSIZE) as soon as the header announces more than ``max_message``.
    """
    if len(buf) < HEADER.size:
        return None, 0
    (n,) = HEADER.unpack_from(buf)
    if n > max_message:
        raise FrameError(errno.EMSGSIZE, f"message of {n} bytes exceeds {max_message}")
    end = HEADER.size + n
    if len(buf) < end:
        return None, 0
    return bytes(buf[HEADER.size:end]), end


def error_answer(err: int, text: str | None = None) -> dict:
    """A refusal: errno ``err`` with ``text`` (default: strerror)."""
    return {"v": PROTOCOL_VERSION, "ok": False, "errno": int(err),
            "error": text or os.strerror(err)}


def ok_answer(result=None) -> dict:
    return {"v": PROTOCOL_VERSION, "ok": True, "result": result}


# ---------------------------------------------------------------- client

class DaemonUnreachable(OSError):
    """Connecting to the control socket failed (no daemon, no permission, ...)."""


class Client:
    """Blocking client: ``Client(path).call(op, dev, **args)`` returns the answer's result.

    A refusal raises ``OSError(errno, strerror)`` with the daemon's text in ``.detail``; a
    failure to connect raises :class:`DaemonUnreachable` (an OSError with the connect errno);
    a broken or malformed answer raises ``OSError(EPROTO)``. One connection, opened on first
    use and reopened if the server dropped it while idle. The default ``timeout`` outlasts an
    init's wait for its queue to arm (30 s in the daemon), so a timed-out init is reported as
    the daemon's ETIMEDOUT, not as a daemon that did not answer.
    """

    def __init__(self, path: str | None = None, timeout: float = 45.0):
        self.path = path or default_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def connect(self) -> None:
        if self._sock is not None:
            if not self._peer_closed():
                return
            self.close()  # the server dropped an idle connection: open a new one
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            check_socket_path(self.path)
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise DaemonUnreachable(e.errno or errno.EIO,
                                    e.strerror or os.strerror(e.errno or errno.EIO),
                                    self.path) from None
        self._sock = s

    def _peer_closed(self) -> bool:
        """True if the server has closed our (idle) connection; nothing is consumed."""
        try:
            r, _, _ = select.select([self._sock], [], [], 0)
            return bool(r) and self._sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise OSError(errno.EPROTO, "ublkzswapd closed the connection")
            buf += chunk
        return bytes(buf)

    def request(self, msg: dict) -> dict:
        """Send one raw request dict, return the raw answer dict."""
        try:
            frame = encode(msg)
        except ValueError as e:         # too big to send: the caller's, not the daemon's
            raise OSError(errno.EMSGSIZE, str(e)) from None
        self.connect()
        try:
            try:
                self._sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                pass        # a server that refused us has said why before closing: read it
            (n,) = HEADER.unpack(self._recv_exact(HEADER.size))
            if n > MAX_MESSAGE:
                raise OSError(errno.EPROTO, f"answer of {n} bytes exceeds {MAX_MESSAGE}")
            body = self._recv_exact(n)
        except TimeoutError:
            self.close()
            raise OSError(errno.ETIMEDOUT, f"ublkzswapd did not answer within "
                                           f"{self.timeout:g} s") from None
        except BaseException:
            self.close()
            raise
        try:
            return decode_body(body)
        except FrameError as e:
            raise OSError(errno.EPROTO, str(e)) from None

    def call(self, op: str, dev: int | None = None, **args):
        """Send ``op`` (for device ``dev``, with ``args``) and return its result."""
        msg = {"v": PROTOCOL_VERSION, "op": op}
        if dev is not None:
            msg["dev"] = dev
        msg.update(args)
        ans = self.request(msg)
        if ans.get("ok") is True:
            return ans.get("result")
        err = ans.get("errno")
        if not _is_int(err) or err <= 0:
            err = errno.EPROTO
        exc = OSError(err, os.strerror(err))
        exc.detail = ans.get("error")  # the daemon's own words, e.g. "Device already initialized!"
        raise exc
