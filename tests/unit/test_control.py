"""control.py and ctlserver.py: framing, request checks, permission rules and a real
ControlServer on a temp socket, in front of the real Manager over fake ublk devices
(fakeublk.RecordingManager; the op table itself: test_control_ops.py)."""

import errno
import json
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ublkzswap import control
from ublkzswap.control import Client, DaemonUnreachable, FrameError, encode
from ublkzswap.ctlserver import ControlServer

sys.path.insert(0, os.path.dirname(__file__))
from fakeublk import RecordingManager  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="ublkzswap-ctl-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sockdir):
    m = RecordingManager()
    srv = ControlServer(m, os.path.join(sockdir, "control.sock"), timeout=1.0).start()
    yield srv
    srv.close()
    m.teardown()


def raw_connect(path, timeout=3.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_answer(s):
    hdr = b""
    while len(hdr) < 4:
        chunk = s.recv(4 - len(hdr))
        if not chunk:
            return None
        hdr += chunk
    (n,) = struct.unpack(">I", hdr)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk
        body += chunk
    return json.loads(body)


# ---------------------------------------------------------------- framing and checks

def test_encode_split_roundtrip():
    msg = {"v": 1, "op": "stats", "dev": 3}
    frame = control.encode(msg)
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert control.split_frame(frame[:3]) == (None, 0)
    assert control.split_frame(frame[:-1]) == (None, 0)
    body, used = control.split_frame(frame + b"xx")
    assert used == len(frame) and control.decode_body(body) == msg


def test_oversized_header_rejected_before_body_arrives():
    with pytest.raises(FrameError) as e:
        control.split_frame(struct.pack(">I", control.MAX_MESSAGE + 1))
    assert e.value.errno == errno.EMSGSIZE
    with pytest.raises(ValueError):
        control.encode({"x": "a" * control.MAX_MESSAGE})


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1,2]", b"nope", b'"str"', b"", b"[" * 100000])
def test_malformed_bodies(body):
    with pytest.raises(FrameError) as e:
        control.decode_body(body)
    assert e.value.errno == errno.EBADMSG


@pytest.mark.parametrize("msg,err", [
    ({"op": "stats", "dev": 0}, errno.EPROTO),
    ({"v": 2, "op": "stats", "dev": 0}, errno.EPROTO),
    ({"v": 1, "op": "format_disk", "dev": 0}, errno.EINVAL),
    ({"v": 1, "op": ["init"], "dev": 0}, errno.EINVAL),
    ({"v": 1, "op": "init"}, errno.EINVAL),
    ({"v": 1, "op": "init", "dev": True}, errno.EINVAL),
    ({"v": 1, "op": "init", "dev": -1}, errno.EINVAL),
    ({"v": 1, "op": "init", "dev": "0"}, errno.EINVAL),
    ({"v": 1, "op": "set_disksize_kb", "dev": 0}, errno.EINVAL),
    ({"v": 1, "op": "set_disksize_kb", "dev": 0, "kb": 1.5}, errno.EINVAL),
    ({"v": 1, "op": "set_memlimit_kb", "dev": 0, "kb": 1 << 64}, errno.EINVAL),
    ({"v": 1, "op": "set_backing_swap", "dev": 0, "path": 5}, errno.EINVAL),
    ({"v": 1, "op": "set_backing_swap", "dev": 0, "path": "/dev/a\0b"}, errno.EINVAL),
])
def test_check_request_refusals(msg, err):
    m = RecordingManager()
    srv = ControlServer(m, "/nonexistent/x.sock")
    ans = srv.handle(msg, uid=0)
    assert ans["ok"] is False and ans["errno"] == err and ans["error"]
    assert m.calls == []


def test_write_ops_need_root_or_owner():
    m = RecordingManager()
    srv = ControlServer(m, "/nonexistent/x.sock", owner_uid=1000)
    for uid in (0, 1000):
        assert srv.handle({"v": 1, "op": "reset", "dev": 0}, uid)["ok"] is True
    for op, extra in [("init", {}), ("reset", {}), ("set_disksize_kb", {"kb": 1}),
                      ("set_memlimit_kb", {"kb": 1}), ("set_backing_swap", {"path": "/x"})]:
        ans = srv.handle({"v": 1, "op": op, "dev": 0, **extra}, 1001)
        assert ans["errno"] == errno.EPERM, op
    assert not [c for c in m.calls if c[0] != "reset"]
    for op in ("devices", "list", "info", "ping"):
        assert srv.handle({"v": 1, "op": op, "dev": 0}, 1001)["ok"] is True
    assert srv.handle({"v": 1, "op": "stats", "dev": 0}, 1001)["errno"] == errno.ENOTTY


def test_manager_exceptions_become_errno_answers(caplog):
    class Broken(RecordingManager):
        def info(self, dev):
            raise RuntimeError("boom")

        def stats(self, dev):
            raise OSError(errno.EAGAIN, "later")

        def devices(self):
            return [0, 1, 2]

    srv = ControlServer(Broken(), "/nonexistent/x.sock")
    with caplog.at_level(logging.ERROR, logger="ublkzswap.ctlserver"):
        ans = srv.handle({"v": 1, "op": "info", "dev": 0}, 0)
    assert ans["errno"] == errno.EIO and "boom" in caplog.text
    ans = srv.handle({"v": 1, "op": "stats", "dev": 0}, 0)
    assert ans == {"v": 1, "ok": False, "errno": errno.EAGAIN, "error": "later"}


def test_list_skips_devices_removed_meanwhile():
    class Vanishing(RecordingManager):
        def devices(self):
            return super().devices() + [9]  # gone by the time it is asked: info(9) is ENODEV

    m = Vanishing(3)
    srv = ControlServer(m, "/nonexistent/x.sock")
    ans = srv.handle({"v": 1, "op": "list"}, 0)
    assert [i["dev"] for i in ans["result"]] == [0, 1, 2]
    assert ("info", 9) in m.calls


def test_default_path_env(monkeypatch):
    monkeypatch.delenv("UBLKZSWAP_SOCKET", raising=False)
    assert control.default_path() == "/run/ublkzswap/control.sock"
    monkeypatch.setenv("UBLKZSWAP_SOCKET", "/tmp/x.sock")
    assert control.default_path() == "/tmp/x.sock"
    assert Client().path == "/tmp/x.sock"
    assert ControlServer(RecordingManager()).path == "/tmp/x.sock"
    assert ControlServer(RecordingManager(), "/a/b.sock").path == "/a/b.sock"


# ---------------------------------------------------------------- real server

def test_client_server_lifecycle(server):
    with Client(server.path) as c:
        assert c.call("ping")["version"] == 1
        assert c.call("devices") == [0, 1]
        with pytest.raises(OSError) as e:
            c.call("stats", 0)
        assert e.value.errno == errno.ENOTTY and e.value.strerror == os.strerror(errno.ENOTTY)
        c.call("set_disksize_kb", 0, kb=10240)
        c.call("init", 0)
        with pytest.raises(OSError) as e:
            c.call("init", 0)
        assert e.value.errno == errno.EBUSY and e.value.detail == "Device already initialized!"
        assert c.call("stats", 0)["disksize"] == 10240 << 10
        assert c.call("info", 0)["state"] == "initialised"
        with pytest.raises(OSError) as e:
            c.call("info", 5)
        assert e.value.errno == errno.ENODEV


def test_socket_mode_and_cleanup(sockdir):
    path = os.path.join(sockdir, "sub", "control.sock")
    srv = ControlServer(RecordingManager(), path).start()
    try:
        st_ = os.stat(path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o660
    finally:
        srv.close()
    assert not os.path.exists(path)


def test_stale_socket_replaced(sockdir):
    path = os.path.join(sockdir, "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # file left behind, nobody listening
    with ControlServer(RecordingManager(), path) as srv:
        assert Client(path).call("devices") == [0, 1]
        assert srv.path == path


def test_live_daemon_refuses_second_server(server):
    with pytest.raises(OSError) as e:
        ControlServer(RecordingManager(), server.path).start()
    assert e.value.errno == errno.EADDRINUSE and server.path in str(e.value)
    assert Client(server.path).call("devices") == [0, 1]  # first one unharmed


def test_non_socket_file_never_removed(sockdir):
    path = os.path.join(sockdir, "control.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(OSError) as e:
        ControlServer(RecordingManager(), path).start()
    assert e.value.errno == errno.EEXIST
    assert open(path).read() == "precious"


def test_unreachable_daemon(sockdir):
    with pytest.raises(DaemonUnreachable) as e:
        Client(os.path.join(sockdir, "none.sock")).call("devices")
    assert e.value.errno == errno.ENOENT


def test_malformed_message_answered_connection_kept(server):
    s = raw_connect(server.path)
    body = b"{not json"
    s.sendall(struct.pack(">I", len(body)) + body)
    assert read_answer(s)["errno"] == errno.EBADMSG
    s.sendall(control.encode({"v": 1, "op": "devices"}))
    assert read_answer(s) == {"v": 1, "ok": True, "result": [0, 1]}
    s.close()


def test_oversized_message_answered_then_closed(server):
    s = raw_connect(server.path)
    s.sendall(struct.pack(">I", 1 << 30) + b"x" * 100)
    assert read_answer(s)["errno"] == errno.EMSGSIZE
    assert s.recv(10) == b""
    s.close()
    assert Client(server.path).call("devices") == [0, 1]


def test_truncated_message_then_eof(server):
    s = raw_connect(server.path)
    s.sendall(struct.pack(">I", 50) + b'{"v":1')
    s.shutdown(socket.SHUT_WR)
    assert s.recv(10) == b""
    s.close()
    assert Client(server.path).call("devices") == [0, 1]


def test_pipelined_requests_answered_in_order(server):
    s = raw_connect(server.path)
    s.sendall(b"".join(control.encode({"v": 1, "op": "info", "dev": d}) for d in (1, 0, 1)))
    assert [read_answer(s)["result"]["dev"] for _ in range(3)] == [1, 0, 1]
    s.close()


def test_slow_client_does_not_block_others(server):
    slow = raw_connect(server.path)
    slow.sendall(b"\x00\x00")  # half a header, then silence
    t0 = time.monotonic()
    for _ in range(5):
        assert Client(server.path, timeout=2).call("devices") == [0, 1]
    assert time.monotonic() - t0 < 2  # not waiting for the stalled client's timeout
    # the stalled client is dropped after the server's timeout (1 s here)
    slow.settimeout(5)
    assert slow.recv(10) == b""
    assert time.monotonic() - t0 < 5
    slow.close()


def test_many_idle_clients_then_a_real_one(sockdir):
    path = os.path.join(sockdir, "control.sock")
    with ControlServer(RecordingManager(), path, max_clients=4, timeout=5) as srv:
        idle = [raw_connect(path) for _ in range(8)]
        time.sleep(0.2)
        assert len(srv._conns) <= 4
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert Client(path).call("devices") == [0, 1]


def test_unencodable_answer_is_eio(sockdir):
    class Odd(RecordingManager):
        def info(self, dev):
            return {"dev": dev, "x": object()}

    with ControlServer(Odd(), os.path.join(sockdir, "c.sock")) as srv:
        with pytest.raises(OSError) as e:
            Client(srv.path).call("info", 0)
        assert e.value.errno == errno.EIO
        assert Client(srv.path).call("devices") == [0, 1]


# ---------------------------------------------------------------- an op that waits

def stuck_manager():
    """Two devices with a size; device 0's queue does not arm until ``m.ublks[0].arm`` is set."""
    m = RecordingManager(2)
    m.set_disksize_kb(0, 4096)
    m.set_disksize_kb(1, 4096)
    m.ublks[0].arm, m.ublks[0].arm_timeout = threading.Event(), 5.0
    return m


def test_a_stuck_init_holds_up_no_other_client_and_its_own_waits_for_the_answer(sockdir):
    m = stuck_manager()
    try:
        with ControlServer(m, os.path.join(sockdir, "c.sock"), timeout=0.5) as srv:
            s = raw_connect(srv.path, timeout=5)
            s.sendall(encode({"v": 1, "op": "init", "dev": 0}) +      # pipelined: answered
                      encode({"v": 1, "op": "info", "dev": 0}))       # after the init
            assert m.ublks[0].arming.wait(2)
            t0 = time.monotonic()
            with Client(srv.path, timeout=2) as c:
                assert c.call("ping")["version"] == 1
                assert [d["state"] for d in c.call("list")] == ["initialising", "uninitialised"]
                with pytest.raises(OSError) as e:
                    c.call("stats", 0)
                assert e.value.errno == errno.EBUSY and e.value.detail == "device is being initialised"
                c.call("init", 1)
                assert c.call("info", 1)["state"] == "initialised"
            assert time.monotonic() - t0 < 1
            time.sleep(0.8)          # past the server's stall timeout: a client waiting on us stays
            m.ublks[0].arm.set()
            assert read_answer(s) == {"v": 1, "ok": True, "result": None}
            assert read_answer(s)["result"]["state"] == "initialised"
            s.close()
    finally:
        m.teardown()


def test_a_client_that_shuts_down_its_side_still_gets_the_answer_of_a_waiting_op(sockdir):
    m = stuck_manager()
    try:
        with ControlServer(m, os.path.join(sockdir, "c.sock")) as srv:
            s = raw_connect(srv.path, timeout=5)
            s.sendall(encode({"v": 1, "op": "init", "dev": 0}))
            s.shutdown(socket.SHUT_WR)
            assert m.ublks[0].arming.wait(2)
            time.sleep(0.1)                      # the server has seen the EOF
            m.ublks[0].arm.set()
            assert read_answer(s) == {"v": 1, "ok": True, "result": None}
            assert s.recv(10) == b""             # then closed
            s.close()
            assert m.info(0)["state"] == "initialised"
    finally:
        m.teardown()


def test_the_stop_path_does_not_wait_for_a_stuck_init(sockdir):
    m = stuck_manager()
    m.ublks[0].arm_timeout = 30.0
    srv = ControlServer(m, os.path.join(sockdir, "c.sock")).start()
    s = raw_connect(srv.path, timeout=5)
    s.sendall(encode({"v": 1, "op": "init", "dev": 0}))
    assert m.ublks[0].arming.wait(2)
    t0 = time.monotonic()                   # as ublkzswapd on SIGTERM: busy(), close, teardown
    assert m.busy() == []
    srv.close()
    assert m.teardown() == []
    assert time.monotonic() - t0 < 1
    assert m.devs == {} and not m.ublks[0].added and ("stop", 0) in m.log   # cancelled, undone
    s.close()


def test_close_is_prompt_and_idempotent(server):
    t0 = time.monotonic()
    server.close()
    server.close()
    assert time.monotonic() - t0 < 2


UNPRIV = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from ublkzswap.control import Client
os.setgid(65534); os.setgroups([]); os.setuid(65534)
out = {}
c = Client(sys.argv[2])
for op, kw in [("set_disksize_kb", {"dev": 0, "kb": 64}), ("init", {"dev": 0}),
               ("stats", {"dev": 1}), ("list", {}), ("info", {"dev": 1})]:
    try:
        r = c.call(op, **kw)
        out[op] = "ok"
    except OSError as e:
        out[op] = e.errno
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid(65534) in a child process")
@pytest.mark.parametrize("owner,expect_write", [(0, errno.EPERM), (65534, "ok")])
def test_unprivileged_peer(sockdir, owner, expect_write):
    m = RecordingManager()
    m.set_disksize_kb(1, 4096)
    m.init(1)
    path = os.path.join(sockdir, "control.sock")
    try:
        with ControlServer(m, path, owner_uid=owner):
            os.chmod(path, 0o666)  # the test's peer is in no group of ours
            r = subprocess.run([sys.executable, "-c", UNPRIV, REPO, path],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
        assert out["init"] == expect_write
        assert out["set_disksize_kb"] == expect_write
        assert out["stats"] == "ok" and out["list"] == "ok" and out["info"] == "ok"
        assert m.devs[0].initialised is (expect_write == "ok")
    finally:
        m.teardown()


# ---------------------------------------------------------------- fuzzing

class FuzzManager(RecordingManager):
    """The real Manager with the disksize capped at 1 MiB: it builds (and populates) a slot table
    for whatever size it is told, and hypothesis likes sizes of 2**40 kB."""

    def set_disksize_kb(self, dev, kb):
        return super().set_disksize_kb(dev, min(kb, 1024))


@pytest.fixture(scope="module")
def fuzz_server():
    d = tempfile.mkdtemp(prefix="ublkzswap-fuzz-", dir="/tmp")
    m = FuzzManager()
    srv = ControlServer(m, os.path.join(d, "control.sock"), timeout=0.5).start()
    yield srv
    srv.close()
    m.teardown()
    shutil.rmtree(d, ignore_errors=True)


def _drain(s):
    s.settimeout(3)
    try:
        while s.recv(65536):
            pass
    except (socket.timeout, ConnectionResetError):
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n, b: struct.pack(">I", n) + b, st.integers(0, 2**32 - 1), st.binary(max_size=200)),
    st.builds(lambda b: struct.pack(">I", len(b)) + b, st.binary(max_size=200)),
))
def test_fuzz_raw_bytes_server_survives(fuzz_server, data):
    s = raw_connect(fuzz_server.path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        _drain(s)
    finally:
        s.close()
    assert Client(fuzz_server.path, timeout=5).call("devices") == [0, 1]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.sampled_from(["v", "op", "dev", "kb", "path", "x"]), json_values),
       op=st.sampled_from(sorted(control.OPS) + ["nope"]))
def test_fuzz_json_requests_always_answered(fuzz_server, extra, op):
    msg = {"v": 1, "op": op, **extra}
    with Client(fuzz_server.path, timeout=5) as c:
        ans = c.request(msg)
        assert ans["v"] == 1 and isinstance(ans["ok"], bool)
        if not ans["ok"]:
            assert isinstance(ans["errno"], int) and ans["errno"] > 0
        assert c.call("devices") == [0, 1]


def test_idle_connection_dropped_and_client_reconnects(sockdir):
    path = os.path.join(sockdir, "c.sock")
    with ControlServer(RecordingManager(), path, timeout=5, idle_timeout=0.3) as srv:
        c = Client(path)
        assert c.call("devices") == [0, 1]
        first = c._sock
        time.sleep(0.8)  # the server drops the idle connection
        assert not srv._conns
        assert c.call("devices") == [0, 1]  # transparently reconnected
        assert c._sock is not first
        c.close()


def test_idle_timeout_longer_than_request_timeout(sockdir):
    path = os.path.join(sockdir, "c.sock")
    with ControlServer(RecordingManager(), path, timeout=0.3, idle_timeout=5) as srv:
        c = Client(path)
        assert c.call("devices") == [0, 1]
        time.sleep(0.8)
        assert len(srv._conns) == 1  # idle between requests is fine
        assert c.call("devices") == [0, 1]
        c.close()


def test_socket_path_too_long(sockdir):
    path = os.path.join(sockdir, "x" * 120)
    with pytest.raises(OSError) as e:
        ControlServer(RecordingManager(), path).start()
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(DaemonUnreachable) as e:
        Client(path).call("devices")
    assert e.value.errno == errno.ENAMETOOLONG


def test_a_request_too_big_to_send_is_emsgsize_before_any_connection():
    import errno as _errno
    from ublkzswap.control import Client, MAX_MESSAGE
    c = Client("/nonexistent/ublkzswap.sock")
    with pytest.raises(OSError) as e:
        c.request({"v": 1, "op": "set_backing_swap", "dev": 0, "path": "a" * MAX_MESSAGE})
    assert e.value.errno == _errno.EMSGSIZE


def test_a_request_trickling_in_is_dropped_after_timeout_from_its_first_byte(sockdir):
    path = os.path.join(sockdir, "c.sock")
    with ControlServer(RecordingManager(), path, timeout=0.5, idle_timeout=5) as srv:
        s = raw_connect(path)
        frame = encode({"v": 1, "op": "devices"})
        t0 = time.monotonic()
        dropped = None
        for b in frame[:-1]:                       # one byte every 0.1 s: never complete
            try:
                s.send(bytes([b]))
            except OSError:
                dropped = time.monotonic() - t0
                break
            time.sleep(0.1)
            if not srv._conns:
                dropped = time.monotonic() - t0
                break
        assert dropped is not None and dropped < 1.5, dropped
        s.close()


def _hold_as(uid: int, path: str, n: int):
    """A child process of ``uid`` (forked: no exec, so no access to our interpreter needed)
    that opens ``n`` connections and keeps them; returns (pid, its report, fd to end it)."""
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(w2)
            os.setgid(uid)
            os.setuid(uid)
            held, refused = [], 0
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                held.append(s)
            time.sleep(0.5)
            for s in held:
                s.setblocking(False)
                try:
                    refused += bool(s.recv(4096))
                except BlockingIOError:
                    pass
            try:
                Client(path, timeout=5).call("devices")
                extra = "extra call worked"
            except OSError as e:
                extra = f"extra call: {e.errno} {getattr(e, 'detail', '')}"
            os.write(w, f"{len(held)} {refused}\n{extra}\n".encode())
            os.read(r2, 1)                          # hold them until told
        finally:
            os._exit(0)
    os.close(w)
    os.close(r2)
    report = b""
    while report.count(b"\n") < 2:
        more = os.read(r, 4096)
        if not more:
            break
        report += more
    os.close(r)
    return pid, report.decode(), w2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another uid")
def test_another_user_cannot_take_every_slot_and_root_gets_in(sockdir):
    path = os.path.join(sockdir, "c.sock")
    with ControlServer(RecordingManager(), path, max_clients=12, reserved=4, per_uid=3,
                       mode=0o666) as srv:
        pid, report, end = _hold_as(65534, path, 20)
        try:
            counts, extra = report.splitlines()[:2]
            held, refused = map(int, counts.split())
            # 3 kept for uid 65534, the other 17 told why (EAGAIN) and closed
            assert held == 20 and refused == 17, report
            assert extra.startswith(f"extra call: {errno.EAGAIN}") and "uid 65534" in extra
            assert sum(1 for c in srv._conns.values() if c.uid == 65534) == 3
            roots = [Client(path, timeout=5) for _ in range(srv.max_clients - 3)]
            for c in roots:                            # root and the owner: every other slot
                assert c.call("devices") == [0, 1]
            with pytest.raises(OSError) as e:          # all 12 taken now: told, not reset
                Client(path, timeout=5).call("devices")
            assert e.value.errno == errno.EAGAIN
            for c in roots:
                c.close()
        finally:
            os.close(end)
            os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another uid")
def test_sixty_four_hostile_connections_and_root_is_answered_within_a_second(sockdir):
    """The daemon's own limits (64 slots, 8 kept for root and the owner, 8 per other uid):
    another user opening 64 connections and keeping them holds 8, and root gets in at once."""
    path = os.path.join(sockdir, "c.sock")
    with ControlServer(RecordingManager(), path, mode=0o666) as srv:
        assert srv.max_clients == 64
        pid, report, end = _hold_as(65534, path, 64)
        try:
            held, refused = map(int, report.splitlines()[0].split())
            assert held == 64 and refused == 64 - srv.per_uid, report
            t0 = time.monotonic()
            assert Client(path, timeout=5).call("devices") == [0, 1]
            assert time.monotonic() - t0 < 1.0
        finally:
            os.close(end)
            os.waitpid(pid, 0)


def test_a_daemon_that_never_answers_is_a_timeout_that_says_so(sockdir):
    path = os.path.join(sockdir, "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)
    try:
        with pytest.raises(OSError) as e:
            Client(path, timeout=0.5).call("devices")
        assert e.value.errno == errno.ETIMEDOUT and "did not answer within 0.5 s" in str(e.value)
    finally:
        mute.close()


def test_a_client_waits_longer_than_an_init_waits_for_its_queue():
    """A timed-out init is the daemon's answer (ETIMEDOUT, rolled back), never a client that
    gave up first and reported a daemon that did not answer."""
    from ublkzswap import ublkdev
    assert Client("/nonexistent").timeout > ublkdev.ARM_TIMEOUT + 5
