"""The control op table (control.OPS) drives the server's checks and dispatch, the docs and
the owner rule: every op is dispatched to the real Manager (fakeublk.RecordingManager) and
checked by its schema, documented, and an op added to the table is served (and refused for
non-owners when owner-only) with no other change."""

import errno
import os
import sys

import pytest

from ublkzswap import control, devices
from ublkzswap.ctlserver import ControlServer

sys.path.insert(0, os.path.dirname(__file__))
from fakeublk import RecordingManager  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLE = {control.DEVICE: 0, control.KB: 4096, control.PATH: "/dev/sda2"}
BAD = {control.DEVICE: -1, control.KB: "4096", control.PATH: 7}


def manager_accepting(op):
    """A RecordingManager (one small device) in a state where the real Manager accepts ``op``:
    device 0 uninitialised, with a size, except for stats and compact (ENOTTY before init). No
    calls yet."""
    m = RecordingManager(1)
    m.set_disksize_kb(0, 64)
    if op.name in ("stats", "compact"):
        m.init(0)
    m.calls.clear()
    return m


def request(op, **override):
    msg = {"v": 1, "op": op.name, **{a: SAMPLE[t] for a, t in op.args}}
    msg.update(override)
    return msg


@pytest.mark.parametrize("op", list(control.OPS.values()), ids=list(control.OPS))
def test_every_op_is_dispatched_by_its_schema(op):
    m = manager_accepting(op)
    try:
        srv = ControlServer(m, "/nonexistent/x.sock")
        ans = srv.handle(request(op), uid=0)
        assert ans["ok"] is True, ans
        if op.manager:  # the Manager method of the same name, with the schema's arguments in order
            assert m.calls == [(op.name, *(SAMPLE[t] for _, t in op.args))]
        else:
            assert callable(getattr(srv, "_op_" + op.name))
    finally:
        m.teardown()


@pytest.mark.parametrize("op", list(control.OPS.values()), ids=list(control.OPS))
def test_every_argument_is_checked_by_its_type(op):
    srv = ControlServer(RecordingManager(1), "/nonexistent/x.sock")
    for arg, typ in op.args:
        missing = {k: v for k, v in request(op).items() if k != arg}
        for msg in (request(op, **{arg: BAD[typ]}), missing):
            ans = srv.handle(msg, uid=0)
            assert ans["errno"] == errno.EINVAL
            assert ans["error"] == f"{op.name}: '{arg}' must be {typ.what}"
    assert srv.manager.calls == []


def test_manager_ops_are_in_the_contract_the_manager_and_the_recorder():
    with open(os.path.join(REPO, "docs", "CONTRACTS.md"), encoding="utf-8") as f:
        contract = f.read().split("## Manager", 1)[1].split("\n## ", 1)[0]
    for op in control.OPS.values():
        if op.manager:
            assert f"{op.name}(" in contract, op.name
            assert callable(getattr(devices.Manager, op.name)), op.name
            assert op.name in RecordingManager.CALLS, op.name


def test_every_op_is_documented_in_the_module_docstring():
    doc = control.__doc__
    for op in control.OPS.values():
        line = next(x for x in doc.splitlines() if x.split()[:1] == [op.name])
        assert line.split()[1:1 + len(op.args)] == [a for a, _ in op.args]
        assert ("owner" if op.owner_only else "anyone") in line.split()
        assert op.result in line and op.help in doc
        for _, typ in op.args:
            assert typ.doc in doc


def test_an_owner_only_op_added_to_the_table_is_refused_for_others(monkeypatch):
    monkeypatch.setitem(control.OPS, "frob", control.Op(
        "frob", (("dev", control.DEVICE), ("kb", control.KB)), True, "frobnicate a device"))
    monkeypatch.setitem(control.OPS, "peek", control.Op(
        "peek", (("dev", control.DEVICE),), False, "look at a device", result="int"))

    class Frobbable(RecordingManager):
        def frob(self, dev, kb):
            self.calls.append(("frob", dev, kb))

        def peek(self, dev):
            return 42

    m = Frobbable()
    srv = ControlServer(m, "/nonexistent/x.sock", owner_uid=1000)
    ans = srv.handle({"v": 1, "op": "frob", "dev": 1, "kb": 8}, 1001)
    assert ans["errno"] == errno.EPERM and ans["error"] == "frob: only root or uid 1000 may do this"
    assert m.calls == []
    assert srv.handle({"v": 1, "op": "frob", "dev": 1, "kb": 8}, 1000)["ok"] is True
    assert srv.handle({"v": 1, "op": "frob", "dev": 1}, 0)["errno"] == errno.EINVAL
    assert m.calls == [("frob", 1, 8)]
    assert srv.handle({"v": 1, "op": "peek", "dev": 1}, 1001) == {"v": 1, "ok": True, "result": 42}
    assert "frob dev kb" in control.describe_ops()


def test_owner_only_is_exactly_the_ops_that_change_state():
    owner = {n for n, op in control.OPS.items() if op.owner_only}
    assert owner == {"set_backing_swap", "set_memlimit_kb", "set_disksize_kb", "init", "reset",
                     "compact"}
