"""The control server inside ublkzswapd: serves :mod:`ublkzswap.control`'s protocol for a Manager.

Owns: the socket file's lifecycle, the connections, permission (owner-only ops) and dispatch.
What a request may be, and which Manager method answers it, is :data:`ublkzswap.control.OPS`;
this module adds no operation of its own beyond the table's server-composed ones (``list``,
``ping``: ``ControlServer._op_<name>``). Nothing here is on the I/O path.

The server never dies of a client. An ``OSError`` from the Manager becomes an errno answer;
any other exception is logged and answered with EIO. A truncated frame, a client that stalls
longer than ``timeout`` seconds in the middle of a request (or leaves an answer unread), or
one that idles longer than ``idle_timeout`` seconds between requests is disconnected; the
``timeout`` runs from a request's first byte, however the rest trickles in.

One thread runs a ``selectors`` loop over non-blocking sockets, so a slow or stalled client
cannot block another, and no thread (stack mapping) is created per connection. Reads (ping,
devices, list, info, stats) are answered in that thread: they take the Manager's lock, which
no op holds across a wait. An op that changes state may wait on the kernel (init waits for a
queue to arm, reset for STOP_DEV and DEL_DEV, compact for memory): from a peer allowed to send
it, it runs in a short-lived thread of its own, and its connection reads no further request
until it is answered (answers stay in order; a peer that sends more than a few messages'
worth meanwhile is dropped, one that shuts down its side still gets the answer). At most
``max_clients`` connections, some kept for root and the owner and a few per other uid;
more are accepted, answered EAGAIN with the reason, and closed at once. The thread first locks its
stack (:func:`ublkzswap.memory.daemon_thread_init`): it shares the GIL with the I/O threads,
so a page fault here stalls them (../shared/DESIGN.md "Memory and deadlock").

At start, an existing socket file nobody listens on is replaced; if a daemon answers there,
start fails with ``OSError(EADDRINUSE)``; a non-socket file is never removed (EEXIST).

Still naive: memory allocated per request is small and bounded (``max_message``,
``max_clients``, one op thread per connection at most) but not preallocated; an op thread
outlives :meth:`ControlServer.close` until its Manager call returns (its answer is dropped).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import selectors
import socket
import stat
import struct
import threading
import time

from .control import (MAX_MESSAGE, OPS, PROTOCOL_VERSION, FrameError, check_request,
                      check_socket_path, decode_body, default_path, encode, error_answer,
                      ok_answer, split_frame)
from .memory import daemon_thread_init

log = logging.getLogger(__name__)


def peer_uid(sock: socket.socket) -> int:
    """uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class _Conn:
    __slots__ = ("sock", "uid", "rbuf", "wbuf", "deadline", "busy_since", "closing", "pending",
                 "eof")

    def __init__(self, sock, uid, deadline):
        self.sock = sock
        self.uid = uid
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.deadline = deadline
        self.busy_since: float | None = None    # when the request or answer under way began
        self.closing = False
        self.pending = False        # a request is being answered in an op thread
        self.eof = False            # the peer shut down its side while a request was pending


class ControlServer:
    """Serve the control protocol for ``manager`` on a unix socket at ``path``.

    ``path``: default :func:`ublkzswap.control.default_path`. ``owner_uid``: besides root, the
    uid allowed to send owner-only ops (default: our own uid). ``timeout``: seconds a client
    may stall in the middle of a request (or leave an answer unread) before it is dropped;
    ``idle_timeout``: seconds a connection may sit idle between requests. ``max_clients``
    connections at most, ``reserved`` of them kept for root and the owner, ``per_uid`` for
    any other uid; a refused client is answered EAGAIN with the reason, then closed.
    ``mode``: of the socket file, set before listen().
    ``start()`` binds (raising OSError if another daemon listens there) and runs the loop in a
    daemon thread; ``close()`` stops it and removes the socket file. :meth:`handle` answers one
    decoded request without any socket.
    """

    def __init__(self, manager, path: str | None = None, owner_uid: int | None = None, *,
                 timeout: float = 5.0, idle_timeout: float = 30.0,
                 max_message: int = MAX_MESSAGE, max_clients: int = 64,
                 reserved: int = 8, per_uid: int = 8, mode: int = 0o660):
        self.manager = manager
        self.path = path or default_path()
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self.max_clients = max_clients
        self.reserved = min(reserved, max_clients)
        self.per_uid = per_uid
        self.mode = mode
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r = self._wake_w = None
        self._ino = None
        self._conns: dict[int, _Conn] = {}
        self._done: list[tuple[_Conn, dict]] = []    # answers from op threads, for the loop
        self._done_lock = threading.Lock()

    # -- lifecycle
    def bind(self) -> None:
        """Create the socket file (replacing a stale one) and listen. Raises OSError."""
        check_socket_path(self.path)
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
        self._wake()
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
        with self._done_lock:
            self._done.clear()
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
            op, args = check_request(msg)
            if op.owner_only and uid != 0 and uid != self.owner_uid:
                raise OSError(errno.EPERM,
                              f"{op.name}: only root or uid {self.owner_uid} may do this")
            if op.manager:
                result = getattr(self.manager, op.name)(*args)
            else:
                result = getattr(self, "_op_" + op.name)(*args)
            return ok_answer(result)
        except OSError as e:
            err = e.errno or errno.EIO
            return error_answer(err, e.strerror or os.strerror(err))
        except Exception:
            log.exception("control request %.200r failed", msg)
            return error_answer(errno.EIO)

    def _waits(self, msg: dict, uid: int) -> bool:
        """Whether ``msg`` is answered in an op thread: a Manager op that changes state (it
        may wait on the kernel), from a peer allowed to send it (others are refused at once)."""
        name = msg.get("op")
        op = OPS.get(name) if isinstance(name, str) else None
        return (op is not None and op.manager and op.owner_only
                and (uid == 0 or uid == self.owner_uid))

    def _spawn(self, c: _Conn, msg: dict) -> None:
        """Answer ``msg`` in a thread of its own; the loop picks the answer up (:meth:`_collect`)."""
        def run():
            answer = error_answer(errno.EIO)
            try:
                daemon_thread_init()
                answer = self.handle(msg, c.uid)
            finally:
                with self._done_lock:
                    self._done.append((c, answer))
                self._wake()
        c.pending = True
        try:
            threading.Thread(target=run, name="ublkzswap-op", daemon=True).start()
        except RuntimeError as e:             # no thread to be had: refused, not lost
            c.pending = False
            c.wbuf += self._answer_bytes(error_answer(errno.EAGAIN, f"cannot start a thread: {e}"))

    def _wake(self) -> None:
        """Interrupt the loop's select (to stop, or to collect an op thread's answer)."""
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"x")
            except OSError:
                pass

    # server-composed ops (Op.manager False)
    def _op_ping(self):
        return {"version": PROTOCOL_VERSION, "pid": os.getpid()}

    def _op_list(self):
        out = []
        for d in self.manager.devices():
            try:
                out.append(self.manager.info(d))
            except OSError as e:
                if e.errno != errno.ENODEV:  # removed meanwhile: skip it
                    raise
        return out

    def _answer_bytes(self, msg: dict) -> bytes:
        try:
            return encode(msg)
        except (TypeError, ValueError) as e:
            log.error("control answer not encodable: %s", e)
            return encode(error_answer(errno.EIO, f"answer not encodable: {e}"))

    # -- event loop
    def _loop(self) -> None:
        daemon_thread_init()
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
        self._collect(sel)
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
            try:
                sock.setblocking(False)
                uid = peer_uid(sock)
            except OSError:
                sock.close()
                continue
            why = self._refusal(uid)
            if why:
                log.warning("control: refusing a client of uid %d: %s", uid, why)
                try:                             # told why, not just reset
                    sock.send(self._answer_bytes(error_answer(errno.EAGAIN, why)))
                except OSError:
                    pass
                sock.close()
                continue
            c = _Conn(sock, uid, time.monotonic() + self.idle_timeout)
            self._conns[sock.fileno()] = c
            sel.register(sock, selectors.EVENT_READ, c)

    def _refusal(self, uid: int) -> str:
        """Why a new connection from ``uid`` is refused ("" if it is not). Root and the owner
        may use every slot; others share what is left once ``reserved`` slots are kept for
        them, at most ``per_uid`` each: whoever can connect cannot lock root out."""
        if len(self._conns) >= self.max_clients:
            return f"too many control connections ({self.max_clients}); try again"
        if uid == 0 or uid == self.owner_uid:
            return ""
        others = [c.uid for c in self._conns.values() if c.uid != 0 and c.uid != self.owner_uid]
        if len(others) >= self.max_clients - self.reserved:
            return (f"too many control connections of other users "
                    f"({self.max_clients - self.reserved}); try again")
        if others.count(uid) >= self.per_uid:
            return f"too many control connections of uid {uid} ({self.per_uid}); try again"
        return ""

    def _on_read(self, sel, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, c)
            return
        if not data:  # EOF (a partial frame is simply dropped: truncated)
            if not c.pending:
                self._drop(sel, c)
                return
            c.eof = True              # answer what was asked, then close
        c.rbuf += data
        if c.pending and len(c.rbuf) > 4 * self.max_message:
            log.info("control client sent too much while its request was under way; disconnecting")
            self._drop(sel, c)
            return
        self._serve(c)
        self._on_write(sel, c)

    def _serve(self, c: _Conn) -> None:
        """Answer the complete requests in ``c.rbuf``, in order, until one goes to an op thread."""
        while not c.closing and not c.pending:
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
                msg = decode_body(body)
            except FrameError as e:
                c.wbuf += self._answer_bytes(error_answer(e.errno, str(e)))
                continue
            if self._waits(msg, c.uid):
                self._spawn(c, msg)
            else:
                c.wbuf += self._answer_bytes(self.handle(msg, c.uid))

    def _collect(self, sel) -> None:
        """Hand the op threads' answers to their connections (if still open) and go on with
        the requests those connections sent meanwhile."""
        with self._done_lock:
            done, self._done = self._done, []
        for c, answer in done:
            if c.sock.fileno() < 0:
                continue              # the peer went away: the op is done all the same
            c.pending = False
            c.busy_since = None
            c.wbuf += self._answer_bytes(answer)
            self._serve(c)
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
        if not c.wbuf and (c.closing or c.eof) and not c.pending:
            self._drop(sel, c)
            return
        # a request must arrive, and its answer be read, within `timeout` of its first byte:
        # more bytes do not buy more time (a client sending one a second would stay forever);
        # while an op thread answers, the client waits for us: no deadline
        now = time.monotonic()
        if c.pending:
            c.busy_since = None
            c.deadline = math.inf
        elif c.rbuf or c.wbuf:
            if c.busy_since is None:
                c.busy_since = now
            c.deadline = c.busy_since + self.timeout
        else:
            c.busy_since = None
            c.deadline = now + self.idle_timeout
        # stop reading while answers pile up (a client that sends but never reads), and after
        # the peer's EOF (nothing more to read; the pending answer still goes out)
        ev = 0 if c.closing or c.eof or len(c.wbuf) > 4 * self.max_message else selectors.EVENT_READ
        if c.wbuf:
            ev |= selectors.EVENT_WRITE
        try:
            if not ev:                    # half-closed, waiting for an op thread's answer
                if c.sock in sel.get_map():
                    sel.unregister(c.sock)
            elif c.sock in sel.get_map():
                sel.modify(c.sock, ev, c)
            else:                         # watched again once that answer is in
                sel.register(c.sock, ev, c)
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
