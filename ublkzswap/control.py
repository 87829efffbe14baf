"""The control socket: protocol, server (inside ublkzswapd) and client (rzscontrol).

Owns: how rzscontrol talks to the daemon. Nothing here is on the I/O path.

Protocol (version 1). A unix stream socket; every message, both ways, is one *frame*:
a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON (an object).
Requests: ``{"v": 1, "op": OP, "dev": N, ...args}``. Answers: ``{"v": 1, "ok": true,
"result": ...}`` or ``{"v": 1, "ok": false, "errno": N, "error": "text"}``. A connection may
carry any number of request/answer pairs, strictly in turn.

======================  ===========================  ==========================  =========
op                      args                         result                      needs
======================  ===========================  ==========================  =========
ping                    --                           {"version", "pid"}          anyone
devices                 --                           [N, ...]                    anyone
list                    --                           [info, ...]                 anyone
info                    dev                          info dict                   anyone
stats                   dev                          stats dict (stats.py names) anyone
set_backing_swap        dev, path                    null                        owner
set_memlimit_kb         dev, kb                      null                        owner
set_disksize_kb         dev, kb                      null                        owner
init                    dev                          null                        owner
reset                   dev                          null                        owner
======================  ===========================  ==========================  =========

"owner" = the peer's uid (SO_PEERCRED) is 0 or the daemon's own uid; anyone else gets
EPERM. Access to the socket itself is governed by its file mode (0660) and directory.
The server calls a *Manager* (contract in docs/CONTRACTS.md); an ``OSError`` from it becomes
an errno answer, any other exception is logged and answered with EIO. Malformed JSON,
a wrong version, unknown op or bad argument types are answered (EINVAL/EPROTO) and the
connection stays usable; an oversized frame is answered with EMSGSIZE and the connection
closed (the stream cannot be resynchronised); a truncated frame or a client that stalls
longer than ``timeout`` seconds in the middle of a request, or idles longer than
``idle_timeout`` seconds between requests, is disconnected. The server never dies of a client.

Server: one thread running a ``selectors`` loop over non-blocking sockets, so a slow or
stalled client cannot block another, and no thread (stack mapping) is created per
connection. At most ``max_clients`` connections; more are accepted and closed at once.

Default socket path: ``$UBLKZSWAP_SOCKET`` or ``/run/ublkzswap/control.sock``. At start,
an existing socket file nobody listens on is replaced; if a daemon answers there, start
fails with ``OSError(EADDRINUSE)``; a non-socket file is never removed (EEXIST).

Still naive: Manager calls run synchronously in the server thread (a slow reset delays
other clients' answers, not their connections); the server thread shares the GIL with the
I/O threads, so memory it allocates per request is small and bounded (``max_message``,
``max_clients``) but not preallocated; no authentication beyond uid; one request per
connection at a time.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import selectors
import socket
import stat
import struct
import threading
import time

from .memory import daemon_thread_init

PROTOCOL_VERSION = 1
DEFAULT_PATH = "/run/ublkzswap/control.sock"
ENV_SOCKET = "UBLKZSWAP_SOCKET"
MAX_MESSAGE = 64 * 1024
HEADER = struct.Struct(">I")

READ_ONLY_OPS = frozenset({"ping", "devices", "list", "info", "stats"})
WRITE_OPS = frozenset({"set_backing_swap", "set_memlimit_kb", "set_disksize_kb", "init", "reset"})
OPS = READ_ONLY_OPS | WRITE_OPS
# ops that name one device, and the extra (name, type) each one needs
_DEV_OPS = frozenset({"info", "stats"}) | WRITE_OPS
_ARGS = {"set_backing_swap": ("path", str), "set_memlimit_kb": ("kb", int),
         "set_disksize_kb": ("kb", int)}
MAX_PATH = 4096
MAX_U64 = (1 << 64) - 1

log = logging.getLogger("ublkzswap.control")


MAX_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1


def _check_path(path: str) -> None:
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        raise OSError(errno.ENAMETOOLONG, f"socket path longer than {MAX_SUN_PATH} bytes")


def default_path() -> str:
    """``$UBLKZSWAP_SOCKET`` if set and non-empty, else /run/ublkzswap/control.sock."""
    return os.environ.get(ENV_SOCKET) or DEFAULT_PATH


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
    return {"v": PROTOCOL_VERSION, "ok": False, "errno": int(err),
            "error": text or os.strerror(err)}


def ok_answer(result=None) -> dict:
    return {"v": PROTOCOL_VERSION, "ok": True, "result": result}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_request(msg: dict) -> tuple[str, int | None, dict]:
    """Validate a request; returns (op, dev, args) or raises OSError(EPROTO/EINVAL)."""
    if msg.get("v") != PROTOCOL_VERSION:
        raise OSError(errno.EPROTO, f"unsupported protocol version {msg.get('v')!r} "
                                    f"(this daemon speaks {PROTOCOL_VERSION})")
    op = msg.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise OSError(errno.EINVAL, f"unknown op {op!r}")
    dev = None
    if op in _DEV_OPS:
        dev = msg.get("dev")
        if not _is_int(dev) or not 0 <= dev <= MAX_U64:
            raise OSError(errno.EINVAL, f"{op}: 'dev' must be a device number")
    args = {}
    if op in _ARGS:
        name, typ = _ARGS[op]
        v = msg.get(name)
        if typ is int:
            if not _is_int(v) or not 0 <= v <= MAX_U64:
                raise OSError(errno.EINVAL, f"{op}: '{name}' must be an integer 0..2^64-1")
        elif not isinstance(v, str) or len(v) > MAX_PATH or "\0" in v:
            raise OSError(errno.EINVAL, f"{op}: '{name}' must be a path string")
        args[name] = v
    return op, dev, args


def peer_uid(sock: socket.socket) -> int:
    """uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


# ---------------------------------------------------------------- server

class _Conn:
    __slots__ = ("sock", "uid", "rbuf", "wbuf", "deadline", "closing")

    def __init__(self, sock, uid, deadline):
        self.sock = sock
        self.uid = uid
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.deadline = deadline
        self.closing = False


class ControlServer:
    """Serve the control protocol for ``manager`` on a unix socket at ``path``.

    ``owner_uid``: besides root, the uid allowed to change state (default: our own uid).
    ``timeout``: seconds a client may stall in the middle of a request (or leave an answer
    unread) before it is dropped; ``idle_timeout``: seconds a connection may sit idle between
    requests.
    ``start()`` binds (raising OSError if another daemon listens there) and runs the loop in a
    daemon thread; ``close()`` stops it and removes the socket file.
    """

    def __init__(self, manager, path: str | None = None, owner_uid: int | None = None, *,
                 timeout: float = 5.0, idle_timeout: float = 30.0,
                 max_message: int = MAX_MESSAGE, max_clients: int = 64,
                 mode: int = 0o660):
        self.manager = manager
        self.path = path or default_path()
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self.max_clients = max_clients
        self.mode = mode
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r = self._wake_w = None
        self._ino = None
        self._conns: dict[int, _Conn] = {}

    # -- lifecycle
    def bind(self) -> None:
        """Create the socket file (replacing a stale one) and listen. Raises OSError."""
        _check_path(self.path)
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        self._remove_stale()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.path)
            os.chmod(self.path, self.mode)  # before listen(): nobody can connect yet
            self._ino = os.stat(self.path).st_ino
            s.listen(16)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self._listener = s

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: nobody listens
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
        else:
            raise OSError(errno.EADDRINUSE,
                          f"another ublkzswapd is already listening on {self.path}")
        finally:
            probe.close()
        log.info("removing stale control socket %s", self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def start(self) -> "ControlServer":
        """bind() if needed, then serve in a background daemon thread. Returns self."""
        if self._listener is None:
            self.bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ublkzswap-control", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, drop all clients, remove the socket file if it is still ours."""
        self._stop.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        for c in list(self._conns.values()):
            c.sock.close()
        self._conns.clear()
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._listener = self._wake_r = self._wake_w = None
        try:
            if self._ino is not None and os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
        self._ino = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- request handling (pure: usable without sockets)
    def handle(self, msg: dict, uid: int) -> dict:
        """Answer one decoded request from a peer with ``uid``. Never raises."""
        try:
            op, dev, args = check_request(msg)
            if op in WRITE_OPS and uid != 0 and uid != self.owner_uid:
                raise OSError(errno.EPERM, f"{op}: only root or uid {self.owner_uid} may do this")
            return ok_answer(self._dispatch(op, dev, args))
        except OSError as e:
            err = e.errno or errno.EIO
            return error_answer(err, e.strerror or os.strerror(err))
        except Exception:
            log.exception("control request %.200r failed", msg)
            return error_answer(errno.EIO)

    def _dispatch(self, op, dev, args):
        m = self.manager
        if op == "ping":
            return {"version": PROTOCOL_VERSION, "pid": os.getpid()}
        if op == "devices":
            return [int(d) for d in m.devices()]
        if op == "list":
            out = []
            for d in m.devices():
                try:
                    out.append(m.info(d))
                except OSError as e:
                    if e.errno != errno.ENODEV:  # removed meanwhile: skip it
                        raise
            return out
        if op == "info":
            return m.info(dev)
        if op == "stats":
            return m.stats(dev)
        if op == "set_backing_swap":
            m.set_backing_swap(dev, args["path"])
        elif op == "set_memlimit_kb":
            m.set_memlimit_kb(dev, args["kb"])
        elif op == "set_disksize_kb":
            m.set_disksize_kb(dev, args["kb"])
        elif op == "init":
            m.init(dev)
        elif op == "reset":
            m.reset(dev)
        return None

    def _answer_bytes(self, msg: dict) -> bytes:
        try:
            return encode(msg)
        except (TypeError, ValueError) as e:
            log.error("control answer not encodable: %s", e)
            return encode(error_answer(errno.EIO, f"answer not encodable: {e}"))

    # -- event loop
    def _loop(self) -> None:
        daemon_thread_init()   # in ublkzswapd: lock this thread's stack (it shares the GIL with I/O)
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                try:
                    self._step(sel)
                except Exception:  # never die of a client
                    log.exception("control loop error (continuing)")
                    time.sleep(0.01)
        finally:
            sel.close()

    def _step(self, sel) -> None:
        now = time.monotonic()
        wait = min([c.deadline for c in self._conns.values()], default=now + 1.0) - now
        for key, events in sel.select(timeout=max(0.0, min(wait, 1.0))):
            if key.data == "wake":
                try:
                    self._wake_r.recv(64)
                except OSError:
                    pass
            elif key.data == "listen":
                self._accept(sel)
            else:
                c = key.data
                if c.sock.fileno() < 0:
                    continue
                if events & selectors.EVENT_READ:
                    self._on_read(sel, c)
                if events & selectors.EVENT_WRITE and c.sock.fileno() >= 0:
                    self._on_write(sel, c)
        now = time.monotonic()
        for c in [c for c in self._conns.values() if c.deadline <= now]:
            if c.rbuf and not c.closing:
                log.info("control client stalled mid-request; disconnecting")
            self._drop(sel, c)

    def _accept(self, sel) -> None:
        for _ in range(16):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE etc.: keep serving the others
                log.warning("control accept failed: %s", e)
                return
            if len(self._conns) >= self.max_clients:
                log.warning("control: too many clients (%d); refusing one", self.max_clients)
                sock.close()
                continue
            try:
                sock.setblocking(False)
                uid = peer_uid(sock)
            except OSError:
                sock.close()
                continue
            c = _Conn(sock, uid, time.monotonic() + self.idle_timeout)
            self._conns[sock.fileno()] = c
            sel.register(sock, selectors.EVENT_READ, c)

    def _on_read(self, sel, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, c)
            return
        if not data:  # EOF (a partial frame is simply dropped: truncated)
            self._drop(sel, c)
            return
        c.rbuf += data
        while not c.closing:
            try:
                body, used = split_frame(c.rbuf, self.max_message)
            except FrameError as e:  # oversized: answer, then close
                c.wbuf += self._answer_bytes(error_answer(e.errno, str(e)))
                c.closing = True
                c.rbuf.clear()
                break
            if body is None:
                break
            del c.rbuf[:used]
            try:
                answer = self.handle(decode_body(body), c.uid)
            except FrameError as e:
                answer = error_answer(e.errno, str(e))
            c.wbuf += self._answer_bytes(answer)
        self._on_write(sel, c)

    def _on_write(self, sel, c: _Conn) -> None:
        if c.wbuf:
            try:
                n = c.sock.send(c.wbuf)
                del c.wbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(sel, c)
                return
        if not c.wbuf and c.closing:
            self._drop(sel, c)
            return
        busy = c.rbuf or c.wbuf
        c.deadline = time.monotonic() + (self.timeout if busy else self.idle_timeout)
        # stop reading while answers pile up (a client that sends but never reads)
        ev = 0 if c.closing or len(c.wbuf) > 4 * self.max_message else selectors.EVENT_READ
        if c.wbuf:
            ev |= selectors.EVENT_WRITE
        if not ev:
            ev = selectors.EVENT_WRITE
        try:
            sel.modify(c.sock, ev, c)
        except (KeyError, ValueError, OSError):
            self._drop(sel, c)

    def _drop(self, sel, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            self._conns.pop(fd, None)
        c.sock.close()


# ---------------------------------------------------------------- client

class DaemonUnreachable(OSError):
    """Connecting to the control socket failed (no daemon, no permission, ...)."""


class Client:
    """Blocking client: ``Client(path).call(op, **args)`` returns the answer's result.

    A refusal raises ``OSError(errno, strerror)`` with the daemon's text in ``.detail``; a failure to connect raises
    :class:`DaemonUnreachable` (an OSError with the connect errno); a broken or
    malformed answer raises ``OSError(EPROTO)``. One connection, opened on first use.
    """

    def __init__(self, path: str | None = None, timeout: float = 30.0):
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
            _check_path(self.path)
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
        self.connect()
        try:
            self._sock.sendall(encode(msg))
            (n,) = HEADER.unpack(self._recv_exact(HEADER.size))
            if n > MAX_MESSAGE:
                raise OSError(errno.EPROTO, f"answer of {n} bytes exceeds {MAX_MESSAGE}")
            body = self._recv_exact(n)
        except BaseException:
            self.close()
            raise
        try:
            return decode_body(body)
        except FrameError as e:
            raise OSError(errno.EPROTO, str(e)) from None

    def call(self, op: str, dev: int | None = None, **args):
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
