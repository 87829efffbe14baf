"""``/dev/ublk-control``: building and sending ublk control commands.

Owns: one pure builder per command (``prepare_<cmd>``: returns the ioctl-encoded ``cmd_op``,
the 32-byte ``ublksrv_ctrl_cmd`` header and the buffer it points at), one submit path
(:meth:`Control.run`, an SQE128 ``IORING_OP_URING_CMD`` on a private ring) and one errno
mapping (:class:`UblkCtrlError`).

Commands run one at a time (a lock): the kernel executes them in an io-wq worker and some
block for long (START_DEV until the queue has served the partition scan, DEL_DEV until
``/dev/ublkcN`` is closed), so callers that must keep serving I/O meanwhile run queues on
other threads.

Still naive: one command in flight per ``Control``; no unprivileged devices.
"""

from __future__ import annotations

import ctypes as C
import os
import threading
from dataclasses import dataclass

from . import uapi
from .uring import Ring

CONTROL_PATH = "/dev/ublk-control"
AUTO_DEV_ID = 0xFFFFFFFF


class UblkCtrlError(OSError):
    """A control command the kernel refused: ``errno`` is the kernel's, the text names the
    command and device (``ADD_DEV of ublk device 0: File exists``)."""

    def __init__(self, err: int, command: str, dev_id: int):
        dev = "(auto)" if dev_id == AUTO_DEV_ID else str(dev_id)
        super().__init__(err, f"{command} of ublk device {dev}: {os.strerror(err)}")
        self.command = command
        self.dev_id = dev_id


@dataclass
class CtrlCmd:
    """A ready-to-send control command: what a builder returns."""
    name: str
    cmd_op: int
    header: uapi.ublksrv_ctrl_cmd
    buf: C.Structure | C.Array | None = None


def _header(dev_id: int, buf=None, data0: int = 0) -> uapi.ublksrv_ctrl_cmd:
    h = uapi.ublksrv_ctrl_cmd()
    h.dev_id = dev_id
    h.queue_id = 0xFFFF
    if buf is not None:
        h.addr = C.addressof(buf)
        h.len = C.sizeof(buf)
    h.data[0] = data0
    return h


def prepare_get_features() -> CtrlCmd:
    buf = C.c_uint64(0)
    return CtrlCmd("GET_FEATURES", uapi.UBLK_U_CMD_GET_FEATURES, _header(0, buf), buf)


def prepare_add_dev(dev_id: int, nr_hw_queues: int, queue_depth: int,
                    max_io_buf_bytes: int, flags: int = 0) -> CtrlCmd:
    info = uapi.ublksrv_ctrl_dev_info()
    info.nr_hw_queues = nr_hw_queues
    info.queue_depth = queue_depth
    info.max_io_buf_bytes = max_io_buf_bytes
    info.dev_id = dev_id
    info.ublksrv_pid = -1
    info.flags = flags
    return CtrlCmd("ADD_DEV", uapi.UBLK_U_CMD_ADD_DEV, _header(dev_id, info), info)


def prepare_set_params(dev_id: int, params: uapi.ublk_params) -> CtrlCmd:
    params.len = C.sizeof(uapi.ublk_params)
    return CtrlCmd("SET_PARAMS", uapi.UBLK_U_CMD_SET_PARAMS, _header(dev_id, params), params)


def prepare_get_dev_info(dev_id: int) -> CtrlCmd:
    info = uapi.ublksrv_ctrl_dev_info()
    return CtrlCmd("GET_DEV_INFO", uapi.UBLK_U_CMD_GET_DEV_INFO, _header(dev_id, info), info)


def prepare_start_dev(dev_id: int, pid: int) -> CtrlCmd:
    return CtrlCmd("START_DEV", uapi.UBLK_U_CMD_START_DEV, _header(dev_id, data0=pid))


def prepare_stop_dev(dev_id: int) -> CtrlCmd:
    return CtrlCmd("STOP_DEV", uapi.UBLK_U_CMD_STOP_DEV, _header(dev_id))


def prepare_del_dev(dev_id: int) -> CtrlCmd:
    return CtrlCmd("DEL_DEV", uapi.UBLK_U_CMD_DEL_DEV, _header(dev_id))


def prepare_start_user_recovery(dev_id: int) -> CtrlCmd:
    return CtrlCmd("START_USER_RECOVERY", uapi.UBLK_U_CMD_START_USER_RECOVERY, _header(dev_id))


def prepare_end_user_recovery(dev_id: int, pid: int) -> CtrlCmd:
    return CtrlCmd("END_USER_RECOVERY", uapi.UBLK_U_CMD_END_USER_RECOVERY, _header(dev_id, data0=pid))


def basic_params(dev_sectors: int, max_io_buf_bytes: int, *, discard: bool,
                 volatile_cache: bool = False) -> uapi.ublk_params:
    """``ublk_params`` for a 4 KiB-block, non-rotational device (what swap wants):
    BASIC always; DISCARD (and write-zeroes) only when the target implements it."""
    p = uapi.ublk_params()
    p.len = C.sizeof(p)
    p.types = uapi.UBLK_PARAM_TYPE_BASIC
    b = p.basic
    b.attrs = uapi.UBLK_ATTR_VOLATILE_CACHE if volatile_cache else 0
    b.logical_bs_shift = b.physical_bs_shift = b.io_opt_shift = b.io_min_shift = 12
    b.max_sectors = max_io_buf_bytes >> 9
    b.dev_sectors = dev_sectors
    if discard:
        p.types |= uapi.UBLK_PARAM_TYPE_DISCARD
        d = p.discard
        d.discard_alignment = 0
        d.discard_granularity = 4096
        d.max_discard_sectors = 8192          # 4 MiB: two swap clusters per request
        d.max_write_zeroes_sectors = 8192
        d.max_discard_segments = 1            # 6.12 refuses anything else
    return p


class Control:
    """An open ``/dev/ublk-control`` plus the SQE128 ring its commands travel on."""

    def __init__(self, path: str = CONTROL_PATH):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.ring = Ring(32, uapi.IORING_SETUP_SQE128)
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()
        self._seq = 0

    def run(self, cmd: CtrlCmd) -> int:
        """Send ``cmd``, wait for its completion; return ``cqe.res`` (>= 0).

        Raises :class:`UblkCtrlError` with the kernel's errno when ``res < 0``.
        """
        with self._lock:
            self._seq += 1
            i = int(self.ring.claim(1)[0])
            sqe = self.ring.sqes[i:i + 1]
            sqe["opcode"] = uapi.IORING_OP_URING_CMD
            sqe["fd"] = self.fd
            sqe["cmd_op"] = cmd.cmd_op
            sqe["user_data"] = self._seq
            C.memmove(self.ring.sqe_address(i) + uapi.SQE_CMD_OFFSET, C.addressof(cmd.header),
                      C.sizeof(cmd.header))
            while True:
                cqes = self.ring.wait(1)
                mine = cqes[cqes["user_data"] == self._seq]
                if len(mine):
                    res = int(mine["res"][0])
                    break
        if res < 0:
            raise UblkCtrlError(-res, cmd.name, cmd.header.dev_id)
        return res

    # convenience wrappers: one line each over builder + run
    def get_features(self) -> int:
        cmd = prepare_get_features()
        self.run(cmd)
        return cmd.buf.value

    def add_dev(self, dev_id: int, nr_hw_queues: int, queue_depth: int,
                max_io_buf_bytes: int, flags: int = 0) -> uapi.ublksrv_ctrl_dev_info:
        cmd = prepare_add_dev(dev_id, nr_hw_queues, queue_depth, max_io_buf_bytes, flags)
        self.run(cmd)
        return cmd.buf

    def set_params(self, dev_id: int, params: uapi.ublk_params) -> None:
        self.run(prepare_set_params(dev_id, params))

    def get_dev_info(self, dev_id: int) -> uapi.ublksrv_ctrl_dev_info:
        cmd = prepare_get_dev_info(dev_id)
        self.run(cmd)
        return cmd.buf

    def start_dev(self, dev_id: int, pid: int | None = None) -> None:
        self.run(prepare_start_dev(dev_id, os.getpid() if pid is None else pid))

    def start_user_recovery(self, dev_id: int) -> None:
        self.run(prepare_start_user_recovery(dev_id))

    def end_user_recovery(self, dev_id: int, pid: int | None = None) -> None:
        self.run(prepare_end_user_recovery(dev_id, os.getpid() if pid is None else pid))

    def stop_dev(self, dev_id: int) -> None:
        self.run(prepare_stop_dev(dev_id))

    def del_dev(self, dev_id: int) -> None:
        self.run(prepare_del_dev(dev_id))

    def close(self) -> None:
        if self.fd >= 0:
            self.ring.close()
            os.close(self.fd)
            self.fd = -1


def ublk_available() -> tuple[bool, str]:
    """Whether this kernel offers ublk here, and if not, exactly why not."""
    if os.path.exists(CONTROL_PATH):
        if os.access(CONTROL_PATH, os.R_OK | os.W_OK):
            return True, ""
        return False, f"{CONTROL_PATH} exists but is not accessible (need root)"
    return False, f"this kernel has no ublk driver ({CONTROL_PATH} missing; modprobe ublk_drv)"
