"""A ublk queue's kernel, played by a test: :class:`FakeRing` is a real
:class:`~ublkzswap.uring.Ring` (its claim, put_rows, reap_pairs, sq_space run unchanged) over
ring memory this module owns, with liburing's four calls answered here instead of by the
kernel, plus the queue's descriptor array.

What the kernel would do, it does from a script: each time the queue waits for completions
and none are ready, the next step of ``steps`` runs (a callable getting the fake, or a list)
and its ``(user_data, res)`` pairs become CQEs. Helpers build the pairs: :meth:`request`
(fills a descriptor, and for a WRITE the tag's buffer, like ublk before completing a FETCH),
:meth:`complete_backing` (the oldest backing reads/writes in flight), :meth:`stop` (-ENODEV
for every tag, as STOP_DEV). What the queue submits is decoded into :attr:`fetches`,
:attr:`commits` (``(tag, result)`` in order), :attr:`read_data` (the bytes a READ's
COMMIT hands back) and :attr:`backing` (every READ/WRITE SQE); ublk's rules are asserted on
the way (one command per tag, requests only on tags that have one, and with ``q_id`` every
command naming that queue: the kernel refuses a queue's commands from another queue's
thread). A queue that waits with the script used up fails the test instead of hanging.
"""
from __future__ import annotations

import ctypes as C
from dataclasses import dataclass

import numpy as np

from ublkzswap import uapi
from ublkzswap.uring import Ring

CMD_LIMIT = 1 << 16          # a FETCH/COMMIT's user_data is its tag


@dataclass(frozen=True)
class RwOp:
    """One READ/WRITE SQE the queue submitted."""
    user_data: int
    opcode: int
    fd: int
    addr: int
    len: int
    off: int


class _Liburing:
    """liburing's entry points, as Ring calls them, answered by the fake."""

    def __init__(self, fake: "FakeRing"):
        self.fake = fake

    def io_uring_submit(self, pring) -> int:
        return self.fake._consume()

    def io_uring_submit_and_wait(self, pring, wait_nr: int) -> int:
        return self.fake._submit_and_wait(wait_nr)

    def io_uring_get_events(self, pring) -> int:
        return 0

    def io_uring_queue_exit(self, pring) -> None:
        return None


class FakeRing(Ring):
    def __init__(self, depth: int, steps=(), *, entries: int = 0, cq_entries: int = 0,
                 sqe_size: int = uapi.SQE_SIZE, q_id: int | None = None):
        entries = entries or 2 * depth
        cq_entries = cq_entries or 8 * depth
        assert entries & (entries - 1) == 0 and cq_entries & (cq_entries - 1) == 0
        self.depth = depth
        self.q_id = q_id
        self.iod = np.zeros(depth, dtype=uapi.IO_DESC_DTYPE)
        self._steps = iter(steps)
        self.fetches: list[int] = []
        self.commits: list[tuple[int, int]] = []
        self.read_data: list[tuple[int, bytes]] = []
        self.backing: list[RwOp] = []
        self.inflight: list[RwOp] = []      # backing ops submitted, not completed
        self.most_inflight = 0
        self.armed: set[int] = set()        # tags whose command is outstanding
        self.addrs: dict[int, int] = {}     # tag -> buffer address given in FETCH/COMMIT
        self.waits = 0
        # the memory the kernel would share: ring words, SQ index array, SQEs, CQEs
        self._words = (C.c_uint32 * 8)()
        self._array = (C.c_uint32 * entries)()
        self._sqe_mem = (C.c_uint8 * (entries * sqe_size))()
        self._cqe_mem = (C.c_uint8 * (cq_entries * 16))()
        word = lambda i: C.cast(C.addressof(self._words) + 4 * i, C.POINTER(C.c_uint32))  # noqa: E731
        self._ring = uapi.io_uring()
        sq, cq = self._ring.sq, self._ring.cq
        sq.khead, sq.ktail, sq.kflags, sq.kdropped = word(0), word(1), word(2), word(3)
        sq.array = C.cast(self._array, C.POINTER(C.c_uint32))
        sq.sqes = C.addressof(self._sqe_mem)
        sq.ring_mask, sq.ring_entries = entries - 1, entries
        cq.khead, cq.ktail, cq.kflags, cq.koverflow = word(4), word(5), word(6), word(7)
        cq.cqes = C.addressof(self._cqe_mem)
        cq.ring_mask, cq.ring_entries = cq_entries - 1, cq_entries
        self._ring.flags = uapi.IORING_SETUP_SQE128 if sqe_size == uapi.SQE128_SIZE else 0
        self._lib = _Liburing(self)
        self._open = True
        self._map()

    # ------------------------------------------------------------------ script helpers
    def request(self, tag: int, op: int, start_sector: int, nr_sectors: int, flags: int = 0,
                data: bytes | None = None) -> tuple[int, int]:
        """Hand tag ``tag`` a request (descriptor filled, ``data`` copied into the tag's
        buffer for a WRITE); returns the completion to post."""
        assert tag in self.armed, f"ublk sends requests only on tags with a command: {tag}"
        d = self.iod[tag]
        d["op_flags"], d["nr_sectors"], d["start_sector"] = op | flags, nr_sectors, start_sector
        d["addr"] = self.addrs[tag]
        if data is not None:
            C.memmove(self.addrs[tag], data, len(data))
        return (tag, uapi.UBLK_IO_RES_OK)

    def complete_backing(self, n: int | None = None, res: int | None = None) -> list[tuple[int, int]]:
        """Completions for the ``n`` oldest backing ops in flight (all by default), each with
        ``res`` (default: the op's full length)."""
        ops = self.inflight[:len(self.inflight) if n is None else n]
        return [(o.user_data, o.len if res is None else res) for o in ops]

    def stop(self) -> list[tuple[int, int]]:
        """What STOP_DEV does: every outstanding command comes back with -ENODEV."""
        return [(tag, uapi.UBLK_IO_RES_ABORT) for tag in sorted(self.armed)]

    # ------------------------------------------------------------------ the kernel's side
    def _consume(self) -> int:
        """io_uring_submit: take every SQE claimed since the last submit."""
        sq = self._ring.sq
        head, tail = self._sq_khead[0], sq.sqe_tail
        n = (tail - head) & 0xFFFFFFFF
        for k in range(n):
            self._take(self.sqes[(head + k) & self.sq_mask])
        sq.sqe_head = tail
        self._sq_khead[0] = tail
        return n

    def _take(self, sqe) -> None:
        opcode, ud = int(sqe["opcode"]), int(sqe["user_data"])
        if opcode == uapi.IORING_OP_URING_CMD:
            tag, cmd = int(sqe["io_tag"]), int(sqe["cmd_op"])
            assert ud == tag, f"command for tag {tag} carries user_data {ud:#x}"
            if self.q_id is not None:
                q = int(sqe["io_q_id"])
                assert q == self.q_id, f"queue {self.q_id}'s ring got a command for queue {q}"
            assert tag not in self.armed, f"a second command for tag {tag}"
            if cmd == uapi.UBLK_U_IO_FETCH_REQ:
                self.fetches.append(tag)
            elif cmd == uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ:
                result = int(sqe["io_result"])
                self.commits.append((tag, result))
                if self.iod[tag]["op_flags"] & 0xFF == uapi.UBLK_IO_OP_READ and result > 0:
                    self.read_data.append((tag, C.string_at(int(sqe["io_addr"]), result)))
            else:
                raise AssertionError(f"unknown io command {cmd:#x}")
            self.armed.add(tag)
            self.addrs[tag] = int(sqe["io_addr"])
        elif opcode in (uapi.IORING_OP_READ, uapi.IORING_OP_WRITE):
            op = RwOp(ud, opcode, int(sqe["fd"]), int(sqe["addr"]), int(sqe["len"]),
                      int(sqe["cmd_op"]) | int(sqe["pad1"]) << 32)
            self.backing.append(op)
            self.inflight.append(op)
            self.most_inflight = max(self.most_inflight, len(self.inflight))
        else:
            raise AssertionError(f"unexpected SQE opcode {opcode}")

    def _submit_and_wait(self, wait_nr: int) -> int:
        n = self._consume()
        while (self._cq_ktail[0] - self._cq_khead[0]) & 0xFFFFFFFF < wait_nr:
            try:
                step = next(self._steps)
            except StopIteration:
                raise AssertionError(
                    f"the queue waits with the script used up (commands outstanding for tags "
                    f"{sorted(self.armed)}, {len(self.inflight)} backing ops in flight)") from None
            self.waits += 1
            self._post(step(self) if callable(step) else step)
        return n

    def _post(self, pairs) -> None:
        tail = self._cq_ktail[0]
        for ud, res in pairs:
            if (tail - self._cq_khead[0]) & 0xFFFFFFFF >= self.cq_entries:
                raise AssertionError("CQ overflow: the queue reaps too late")
            if ud < CMD_LIMIT:
                assert ud in self.armed, f"a completion for tag {ud}, which has no command"
                self.armed.discard(ud)
            else:
                mine = [o for o in self.inflight if o.user_data == ud]
                assert mine, f"a completion for {ud:#x}, which is not in flight"
                self.inflight.remove(mine[0])
            i = tail & self.cq_mask
            self._cq_u64[2 * i] = ud
            self._cq_i32[4 * i + 2] = res
            self._cq_i32[4 * i + 3] = 0
            tail = (tail + 1) & 0xFFFFFFFF
        self._cq_ktail[0] = tail

