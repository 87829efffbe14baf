"""Kernel UAPI mirrors: what ublkzswap uses from ``linux/io_uring.h``, ``linux/ublk_cmd.h``
(Linux 6.12) and liburing 2.3's ``struct io_uring``, with the kernel's names verbatim.

Owns: struct layouts (ctypes), constants and ioctl encodings. Data only: no syscalls.
Offsets are commented and pinned by ``tests/unit/test_uapi.py``. The numpy dtypes
(``IO_DESC_DTYPE``, ``CQE_DTYPE``, :func:`sqe_dtype`) are derived from the ctypes structs and
let set-up and bulk paths read and fill many entries at once.

Still naive: only x86_64 is covered (liburing's struct io_uring layout is per-ABI).
"""

from __future__ import annotations

import ctypes as C

import numpy as np

PAGE_SHIFT = 12             # x86_64; the store's slot and the device's block size
PAGE_SIZE = 1 << PAGE_SHIFT
SECTOR_SHIFT = 9           # ublk descriptors count 512-byte sectors

# --------------------------------------------------------------------------- ioctl encoding
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _IOR(type_: str, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, ord(type_), nr, size)


def _IOWR(type_: str, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, ord(type_), nr, size)


def _IOC_NR(cmd: int) -> int:
    return (cmd >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


# --------------------------------------------------------------------------- io_uring.h
class io_uring_sqe(C.Structure):
    """64 bytes (128 with IORING_SETUP_SQE128). Unions flattened to the members we use."""
    _fields_ = [
        ("opcode", C.c_uint8),        # 0
        ("flags", C.c_uint8),         # 1
        ("ioprio", C.c_uint16),       # 2
        ("fd", C.c_int32),            # 4
        ("off", C.c_uint64),          # 8  union { off, addr2, { cmd_op u32 @8, __pad1 u32 @12 } }
        ("addr", C.c_uint64),         # 16
        ("len", C.c_uint32),          # 24
        ("rw_flags", C.c_uint32),     # 28 union { rw_flags, uring_cmd_flags, ... }
        ("user_data", C.c_uint64),    # 32
        ("buf_index", C.c_uint16),    # 40
        ("personality", C.c_uint16),  # 42
        ("file_index", C.c_uint32),   # 44 union { splice_fd_in, file_index, ... }
        ("addr3", C.c_uint64),        # 48 union { { addr3, __pad2[1] }, cmd[] }
        ("__pad2", C.c_uint64),       # 56
    ]


SQE_CMD_OFFSET = 48          # offsetof(struct io_uring_sqe, cmd)
SQE_CMD_OP_OFFSET = 8        # offsetof(struct io_uring_sqe, cmd_op)
SQE_SIZE = 64
SQE128_SIZE = 128


class io_uring_cqe(C.Structure):
    _fields_ = [
        ("user_data", C.c_uint64),  # 0
        ("res", C.c_int32),         # 8
        ("flags", C.c_uint32),      # 12
    ]


class io_sqring_offsets(C.Structure):
    _fields_ = [(n, C.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")] + [
        ("user_addr", C.c_uint64)]


class io_cqring_offsets(C.Structure):
    _fields_ = [(n, C.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")] + [
        ("user_addr", C.c_uint64)]


class io_uring_params(C.Structure):
    _fields_ = [
        ("sq_entries", C.c_uint32),      # 0
        ("cq_entries", C.c_uint32),      # 4
        ("flags", C.c_uint32),           # 8
        ("sq_thread_cpu", C.c_uint32),   # 12
        ("sq_thread_idle", C.c_uint32),  # 16
        ("features", C.c_uint32),        # 20
        ("wq_fd", C.c_uint32),           # 24
        ("resv", C.c_uint32 * 3),        # 28
        ("sq_off", io_sqring_offsets),   # 40
        ("cq_off", io_cqring_offsets),   # 80
    ]


IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_OP_URING_CMD = 46

IOSQE_FIXED_FILE = 1 << 0

IORING_SETUP_IOPOLL = 1 << 0
IORING_SETUP_SQPOLL = 1 << 1
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_TASKRUN_FLAG = 1 << 9
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13

IORING_SQ_NEED_WAKEUP = 1 << 0
IORING_SQ_CQ_OVERFLOW = 1 << 1
IORING_SQ_TASKRUN = 1 << 2

IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_EXT_ARG = 1 << 8


# --------------------------------------------------------------------------- liburing 2.3 (x86_64)
class io_uring_sq(C.Structure):
    """liburing 2.3 ``struct io_uring_sq`` (104 bytes)."""
    _fields_ = [
        ("khead", C.POINTER(C.c_uint32)),         # 0
        ("ktail", C.POINTER(C.c_uint32)),         # 8
        ("kring_mask", C.POINTER(C.c_uint32)),    # 16
        ("kring_entries", C.POINTER(C.c_uint32)),  # 24
        ("kflags", C.POINTER(C.c_uint32)),        # 32
        ("kdropped", C.POINTER(C.c_uint32)),      # 40
        ("array", C.POINTER(C.c_uint32)),         # 48
        ("sqes", C.c_void_p),                     # 56
        ("sqe_head", C.c_uint32),                 # 64
        ("sqe_tail", C.c_uint32),                 # 68
        ("ring_sz", C.c_size_t),                  # 72
        ("ring_ptr", C.c_void_p),                 # 80
        ("ring_mask", C.c_uint32),                # 88
        ("ring_entries", C.c_uint32),             # 92
        ("pad", C.c_uint32 * 2),                  # 96
    ]


class io_uring_cq(C.Structure):
    """liburing 2.3 ``struct io_uring_cq`` (88 bytes)."""
    _fields_ = [
        ("khead", C.POINTER(C.c_uint32)),         # 0
        ("ktail", C.POINTER(C.c_uint32)),         # 8
        ("kring_mask", C.POINTER(C.c_uint32)),    # 16
        ("kring_entries", C.POINTER(C.c_uint32)),  # 24
        ("kflags", C.POINTER(C.c_uint32)),        # 32
        ("koverflow", C.POINTER(C.c_uint32)),     # 40
        ("cqes", C.c_void_p),                     # 48
        ("ring_sz", C.c_size_t),                  # 56
        ("ring_ptr", C.c_void_p),                 # 64
        ("ring_mask", C.c_uint32),                # 72
        ("ring_entries", C.c_uint32),             # 76
        ("pad", C.c_uint32 * 2),                  # 80
    ]


class io_uring(C.Structure):
    """liburing 2.3 ``struct io_uring`` (216 bytes)."""
    _fields_ = [
        ("sq", io_uring_sq),              # 0
        ("cq", io_uring_cq),              # 104
        ("flags", C.c_uint32),            # 192
        ("ring_fd", C.c_int32),           # 196
        ("features", C.c_uint32),         # 200
        ("enter_ring_fd", C.c_int32),     # 204
        ("int_flags", C.c_uint8),         # 208
        ("pad", C.c_uint8 * 3),           # 209
        ("pad2", C.c_uint32),             # 212
    ]


# --------------------------------------------------------------------------- ublk_cmd.h
UBLK_CMD_GET_QUEUE_AFFINITY = 0x01
UBLK_CMD_GET_DEV_INFO = 0x02
UBLK_CMD_ADD_DEV = 0x04
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_SET_PARAMS = 0x08
UBLK_CMD_GET_PARAMS = 0x09
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
UBLK_CMD_GET_DEV_INFO2 = 0x12

UBLK_IO_FETCH_REQ = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
UBLK_IO_NEED_GET_DATA = 0x22


class ublksrv_ctrl_cmd(C.Structure):
    """32 bytes, placed at ``sqe->cmd`` of a control SQE (SQE128 ring)."""
    _fields_ = [
        ("dev_id", C.c_uint32),        # 0
        ("queue_id", C.c_uint16),      # 4  0xFFFF unless the command is per queue
        ("len", C.c_uint16),           # 6  length of the buffer at addr
        ("addr", C.c_uint64),          # 8  user buffer
        ("data", C.c_uint64 * 1),      # 16 inline argument (START_DEV: daemon pid)
        ("dev_path_len", C.c_uint16),  # 24
        ("pad", C.c_uint16),           # 26
        ("reserved", C.c_uint32),      # 28
    ]


class ublksrv_ctrl_dev_info(C.Structure):
    """64 bytes: in/out buffer of ADD_DEV and GET_DEV_INFO."""
    _fields_ = [
        ("nr_hw_queues", C.c_uint16),      # 0
        ("queue_depth", C.c_uint16),       # 2
        ("state", C.c_uint16),             # 4
        ("pad0", C.c_uint16),              # 6
        ("max_io_buf_bytes", C.c_uint32),  # 8
        ("dev_id", C.c_uint32),            # 12
        ("ublksrv_pid", C.c_int32),        # 16
        ("pad1", C.c_uint32),              # 20
        ("flags", C.c_uint64),             # 24
        ("ublksrv_flags", C.c_uint64),     # 32
        ("owner_uid", C.c_uint32),         # 40
        ("owner_gid", C.c_uint32),         # 44
        ("reserved1", C.c_uint64),         # 48
        ("reserved2", C.c_uint64),         # 56
    ]


class ublksrv_io_desc(C.Structure):
    """24 bytes per tag in the read-only descriptor array mmapped from /dev/ublkcN."""
    _fields_ = [
        ("op_flags", C.c_uint32),      # 0  bits 0-7 op, bits 8-31 UBLK_IO_F_* (absolute values)
        ("nr_sectors", C.c_uint32),    # 4
        ("start_sector", C.c_uint64),  # 8
        ("addr", C.c_uint64),          # 16
    ]


class ublksrv_io_cmd(C.Structure):
    """16 bytes, placed at ``sqe->cmd`` of a FETCH / COMMIT_AND_FETCH SQE."""
    _fields_ = [
        ("q_id", C.c_uint16),    # 0
        ("tag", C.c_uint16),     # 2
        ("result", C.c_int32),   # 4
        ("addr", C.c_uint64),    # 8  union { addr, zone_append_lba }
    ]


class ublk_param_basic(C.Structure):
    _fields_ = [
        ("attrs", C.c_uint32),              # 0
        ("logical_bs_shift", C.c_uint8),    # 4
        ("physical_bs_shift", C.c_uint8),   # 5
        ("io_opt_shift", C.c_uint8),        # 6
        ("io_min_shift", C.c_uint8),        # 7
        ("max_sectors", C.c_uint32),        # 8
        ("chunk_sectors", C.c_uint32),      # 12
        ("dev_sectors", C.c_uint64),        # 16
        ("virt_boundary_mask", C.c_uint64),  # 24
    ]


class ublk_param_discard(C.Structure):
    _fields_ = [
        ("discard_alignment", C.c_uint32),          # 0
        ("discard_granularity", C.c_uint32),        # 4
        ("max_discard_sectors", C.c_uint32),        # 8
        ("max_write_zeroes_sectors", C.c_uint32),   # 12
        ("max_discard_segments", C.c_uint16),       # 16
        ("reserved0", C.c_uint16),                  # 18
    ]


class ublk_param_devt(C.Structure):
    _fields_ = [
        ("char_major", C.c_uint32),
        ("char_minor", C.c_uint32),
        ("disk_major", C.c_uint32),
        ("disk_minor", C.c_uint32),
    ]


class ublk_param_zoned(C.Structure):
    _fields_ = [
        ("max_open_zones", C.c_uint32),
        ("max_active_zones", C.c_uint32),
        ("max_zone_append_sectors", C.c_uint32),
        ("reserved", C.c_uint8 * 20),
    ]


class ublk_params(C.Structure):
    """112 bytes: SET_PARAMS / GET_PARAMS buffer."""
    _fields_ = [
        ("len", C.c_uint32),                # 0
        ("types", C.c_uint32),              # 4
        ("basic", ublk_param_basic),        # 8
        ("discard", ublk_param_discard),    # 40
        ("devt", ublk_param_devt),          # 60
        ("zoned", ublk_param_zoned),        # 76
    ]


# ioctl-encoded control and io commands (what 6.12 expects; the legacy numbers also work there)
UBLK_U_CMD_GET_QUEUE_AFFINITY = _IOR("u", UBLK_CMD_GET_QUEUE_AFFINITY, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_GET_DEV_INFO = _IOR("u", UBLK_CMD_GET_DEV_INFO, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_ADD_DEV = _IOWR("u", UBLK_CMD_ADD_DEV, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_DEL_DEV = _IOWR("u", UBLK_CMD_DEL_DEV, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_START_DEV = _IOWR("u", UBLK_CMD_START_DEV, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_STOP_DEV = _IOWR("u", UBLK_CMD_STOP_DEV, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_SET_PARAMS = _IOWR("u", UBLK_CMD_SET_PARAMS, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_GET_PARAMS = _IOR("u", UBLK_CMD_GET_PARAMS, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_START_USER_RECOVERY = _IOWR("u", UBLK_CMD_START_USER_RECOVERY, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_END_USER_RECOVERY = _IOWR("u", UBLK_CMD_END_USER_RECOVERY, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_GET_DEV_INFO2 = _IOR("u", UBLK_CMD_GET_DEV_INFO2, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_GET_FEATURES = _IOR("u", 0x13, C.sizeof(ublksrv_ctrl_cmd))
UBLK_U_CMD_DEL_DEV_ASYNC = _IOR("u", 0x14, C.sizeof(ublksrv_ctrl_cmd))

UBLK_U_IO_FETCH_REQ = _IOWR("u", UBLK_IO_FETCH_REQ, C.sizeof(ublksrv_io_cmd))
UBLK_U_IO_COMMIT_AND_FETCH_REQ = _IOWR("u", UBLK_IO_COMMIT_AND_FETCH_REQ, C.sizeof(ublksrv_io_cmd))
UBLK_U_IO_NEED_GET_DATA = _IOWR("u", UBLK_IO_NEED_GET_DATA, C.sizeof(ublksrv_io_cmd))

# results of FETCH / COMMIT_AND_FETCH completions
UBLK_IO_RES_OK = 0
UBLK_IO_RES_NEED_GET_DATA = 1
UBLK_IO_RES_ABORT = -19  # -ENODEV

# mmap layout of /dev/ublkcN
UBLKSRV_CMD_BUF_OFFSET = 0
UBLK_MAX_QUEUE_DEPTH = 4096
UBLK_MAX_NR_QUEUES = 4096

# UBLK_F_* feature flags (6.12)
UBLK_F_SUPPORT_ZERO_COPY = 1 << 0
UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1
UBLK_F_NEED_GET_DATA = 1 << 2
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_UNPRIVILEGED_DEV = 1 << 5
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_F_USER_COPY = 1 << 7
UBLK_F_ZONED = 1 << 8

# device states (ublksrv_ctrl_dev_info.state)
UBLK_S_DEV_DEAD = 0
UBLK_S_DEV_LIVE = 1
UBLK_S_DEV_QUIESCED = 2

# request ops (ublksrv_io_desc.op_flags & 0xff)
UBLK_IO_OP_READ = 0
UBLK_IO_OP_WRITE = 1
UBLK_IO_OP_FLUSH = 2
UBLK_IO_OP_DISCARD = 3
UBLK_IO_OP_WRITE_SAME = 4
UBLK_IO_OP_WRITE_ZEROES = 5

# request flags: already shifted, test against op_flags itself
UBLK_IO_F_FAILFAST_DEV = 1 << 8
UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
UBLK_IO_F_FAILFAST_DRIVER = 1 << 10
UBLK_IO_F_META = 1 << 11
UBLK_IO_F_FUA = 1 << 13
UBLK_IO_F_NOUNMAP = 1 << 15
UBLK_IO_F_SWAP = 1 << 16

# param types
UBLK_PARAM_TYPE_BASIC = 1 << 0
UBLK_PARAM_TYPE_DISCARD = 1 << 1
UBLK_PARAM_TYPE_DEVT = 1 << 2
UBLK_PARAM_TYPE_ZONED = 1 << 3

# ublk_param_basic.attrs
UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_ROTATIONAL = 1 << 1
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3

# prctl
PR_SET_IO_FLUSHER = 57
PR_GET_IO_FLUSHER = 58

# --------------------------------------------------------------------------- numpy views
# Derived from the ctypes structs above, so that each layout is written down once.
IO_DESC_DTYPE = np.dtype(ublksrv_io_desc)
CQE_DTYPE = np.dtype(io_uring_cqe)


def _np_fields(struct, prefix: str = "", base: int = 0, skip=()) -> list[tuple[str, np.dtype, int]]:
    """(name, dtype, offset) of each field of ctypes ``struct``, offsets shifted by ``base``."""
    return [(prefix + name, np.dtype(ctype), base + getattr(struct, name).offset)
            for name, ctype in struct._fields_ if name not in skip]


def sqe_dtype(entry_size: int) -> np.dtype:
    """A structured dtype for one SQE slot of ``entry_size`` (64 or 128) bytes: the fields of
    ``io_uring_sqe`` with its ``off`` union seen as ``cmd_op`` / ``pad1`` (a READ/WRITE's file
    offset is ``cmd_op | pad1 << 32``) and the ``ublksrv_io_cmd`` payload at ``cmd`` (offset
    48) as ``io_q_id``, ``io_tag``, ``io_result``, ``io_addr``."""
    fields = []
    for name, dt, off in _np_fields(io_uring_sqe, skip=("addr3", "__pad2")):
        if name == "off":
            fields += [("cmd_op", np.dtype("<u4"), off), ("pad1", np.dtype("<u4"), off + 4)]
        else:
            fields.append((name, dt, off))
    fields += _np_fields(ublksrv_io_cmd, prefix="io_", base=SQE_CMD_OFFSET)
    return np.dtype({"names": [f[0] for f in fields], "formats": [f[1] for f in fields],
                     "offsets": [f[2] for f in fields], "itemsize": entry_size})


UBLKSRV_IO_BUF_OFFSET = 0x80000000
UBLK_TAG_OFF = 25
UBLK_QID_OFF = 41


def ublk_desc_offset(q_id: int) -> int:
    """mmap offset of queue ``q_id``'s descriptor array in /dev/ublkcN."""
    per_queue = (UBLK_MAX_QUEUE_DEPTH * C.sizeof(ublksrv_io_desc) + 4095) & ~4095
    return UBLKSRV_CMD_BUF_OFFSET + q_id * per_queue


def ublk_desc_len(depth: int) -> int:
    """Exact mmap length of a queue's descriptor array for ``depth`` tags."""
    return (depth * C.sizeof(ublksrv_io_desc) + 4095) & ~4095


# ---------------------------------------------------------------- linux/fiemap.h, linux/fs.h
# (a backing swap *file* is remapped to its block device, as the kernel does for swap files)

class fiemap_extent(C.Structure):
    _fields_ = [("fe_logical", C.c_uint64), ("fe_physical", C.c_uint64), ("fe_length", C.c_uint64),
                ("fe_reserved64", C.c_uint64 * 2), ("fe_flags", C.c_uint32),
                ("fe_reserved", C.c_uint32 * 3)]


class fiemap(C.Structure):
    _fields_ = [("fm_start", C.c_uint64), ("fm_length", C.c_uint64), ("fm_flags", C.c_uint32),
                ("fm_mapped_extents", C.c_uint32), ("fm_extent_count", C.c_uint32),
                ("fm_reserved", C.c_uint32)]   # followed by fm_extents[fm_extent_count]


FS_IOC_FIEMAP = 0xC020660B          # _IOWR('f', 11, struct fiemap)
FS_IOC_GETFLAGS = 0x80086601        # _IOR('f', 1, long)
FS_IOC_SETFLAGS = 0x40086602        # _IOW('f', 2, long)
FS_IMMUTABLE_FL = 0x00000010
FIEMAP_MAX_OFFSET = (1 << 64) - 1
FIEMAP_FLAG_SYNC = 0x00000001
FIEMAP_EXTENT_LAST = 0x00000001
FIEMAP_EXTENT_UNKNOWN = 0x00000002
FIEMAP_EXTENT_DELALLOC = 0x00000004
FIEMAP_EXTENT_ENCODED = 0x00000008
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x00000080
FIEMAP_EXTENT_NOT_ALIGNED = 0x00000100
FIEMAP_EXTENT_DATA_INLINE = 0x00000200
FIEMAP_EXTENT_DATA_TAIL = 0x00000400
FIEMAP_EXTENT_UNWRITTEN = 0x00000800
FIEMAP_EXTENT_MERGED = 0x00001000
FIEMAP_EXTENT_SHARED = 0x00002000
EXT4_SUPER_MAGIC = 0xEF53           # linux/magic.h (ext2, ext3 and ext4 share it)


# ---------------------------------------------------------------- linux/bpf.h, linux/perf_event.h
# (freed swap slots: a kprobe program on the kernel's per-slot free hook and a ring buffer,
# ublkzswap.slotfree)

__NR_bpf = 321                      # x86_64
__NR_perf_event_open = 298          # x86_64

BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_KPROBE = 2
BPF_PSEUDO_MAP_FD = 1
BPF_FUNC_probe_read_kernel = 113
BPF_FUNC_ringbuf_output = 130
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8

# instruction classes, sizes, modes, ops and sources (linux/bpf_common.h, linux/bpf.h)
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
BPF_W, BPF_H, BPF_B, BPF_DW = 0x00, 0x08, 0x10, 0x18
BPF_IMM, BPF_MEM = 0x00, 0x60
BPF_ADD, BPF_LSH, BPF_RSH, BPF_AND, BPF_MOV = 0x00, 0x60, 0x70, 0x50, 0xb0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JNE, BPF_CALL, BPF_EXIT = 0x00, 0x10, 0x20, 0x50, 0x80, 0x90
BPF_K, BPF_X = 0x00, 0x08


class bpf_insn(C.Structure):
    _fields_ = [("code", C.c_uint8), ("regs", C.c_uint8),   # dst_reg:4 (low), src_reg:4 (high)
                ("off", C.c_int16), ("imm", C.c_int32)]


class bpf_attr_map_create(C.Structure):
    """The BPF_MAP_CREATE part of ``union bpf_attr`` (up to ``map_name``)."""
    _fields_ = [("map_type", C.c_uint32), ("key_size", C.c_uint32), ("value_size", C.c_uint32),
                ("max_entries", C.c_uint32), ("map_flags", C.c_uint32),
                ("inner_map_fd", C.c_uint32), ("numa_node", C.c_uint32),
                ("map_name", C.c_char * 16)]


class bpf_attr_prog_load(C.Structure):
    """The BPF_PROG_LOAD part of ``union bpf_attr`` (up to ``expected_attach_type``)."""
    _fields_ = [("prog_type", C.c_uint32), ("insn_cnt", C.c_uint32), ("insns", C.c_uint64),
                ("license", C.c_uint64), ("log_level", C.c_uint32), ("log_size", C.c_uint32),
                ("log_buf", C.c_uint64), ("kern_version", C.c_uint32),
                ("prog_flags", C.c_uint32), ("prog_name", C.c_char * 16),
                ("prog_ifindex", C.c_uint32), ("expected_attach_type", C.c_uint32)]


class perf_event_attr(C.Structure):
    """``struct perf_event_attr`` up to ``config2`` (PERF_ATTR_SIZE_VER1); for a kprobe event
    ``config1`` is the function's name (``kprobe_func``), ``config2`` the offset in it."""
    _fields_ = [("type", C.c_uint32), ("size", C.c_uint32), ("config", C.c_uint64),
                ("sample_period", C.c_uint64), ("sample_type", C.c_uint64),
                ("read_format", C.c_uint64), ("flags", C.c_uint64),
                ("wakeup_events", C.c_uint32), ("bp_type", C.c_uint32),
                ("config1", C.c_uint64), ("config2", C.c_uint64)]


PERF_ATTR_SIZE_VER1 = 72
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400      # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)

# x86_64 struct pt_regs: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 ax cx dx si di ...
PT_REGS_DI = 14 * 8                 # a kprobe's first argument

# linux/swapops.h, x86_64: swp_entry_t.val = type << SWP_TYPE_SHIFT | offset
MAX_SWAPFILES_SHIFT = 5
SWP_TYPE_SHIFT = 63 - MAX_SWAPFILES_SHIFT
MAX_SWAPFILES = 1 << MAX_SWAPFILES_SHIFT
