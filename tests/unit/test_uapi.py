"""Layouts of the kernel structs we mirror, pinned to the 6.12 uapi / liburing 2.3 values."""
import ctypes as C

import numpy as np
import pytest

from ublkzswap import uapi


@pytest.mark.parametrize("struct,size", [
    (uapi.io_uring_sqe, 64), (uapi.io_uring_cqe, 16), (uapi.io_uring_params, 120),
    (uapi.io_sqring_offsets, 40), (uapi.io_cqring_offsets, 40),
    (uapi.io_uring_sq, 104), (uapi.io_uring_cq, 88), (uapi.io_uring, 216),
    (uapi.ublksrv_ctrl_cmd, 32), (uapi.ublksrv_ctrl_dev_info, 64), (uapi.ublksrv_io_desc, 24),
    (uapi.ublksrv_io_cmd, 16), (uapi.ublk_param_basic, 32), (uapi.ublk_param_discard, 20),
    (uapi.ublk_param_devt, 16), (uapi.ublk_param_zoned, 32), (uapi.ublk_params, 112),
])
def test_sizes(struct, size):
    assert C.sizeof(struct) == size


@pytest.mark.parametrize("struct,field,offset", [
    (uapi.io_uring_sqe, "fd", 4), (uapi.io_uring_sqe, "off", 8), (uapi.io_uring_sqe, "addr", 16),
    (uapi.io_uring_sqe, "len", 24), (uapi.io_uring_sqe, "user_data", 32),
    (uapi.io_uring_sqe, "addr3", uapi.SQE_CMD_OFFSET),
    (uapi.io_uring_cqe, "res", 8), (uapi.io_uring_cqe, "flags", 12),
    (uapi.io_uring_params, "sq_off", 40), (uapi.io_uring_params, "cq_off", 80),
    (uapi.io_uring_sq, "sqes", 56), (uapi.io_uring_sq, "sqe_tail", 68), (uapi.io_uring_sq, "ring_mask", 88),
    (uapi.io_uring_cq, "cqes", 48), (uapi.io_uring_cq, "ring_mask", 72),
    (uapi.io_uring, "cq", 104), (uapi.io_uring, "flags", 192), (uapi.io_uring, "ring_fd", 196),
    (uapi.ublksrv_ctrl_cmd, "queue_id", 4), (uapi.ublksrv_ctrl_cmd, "len", 6),
    (uapi.ublksrv_ctrl_cmd, "addr", 8), (uapi.ublksrv_ctrl_cmd, "data", 16),
    (uapi.ublksrv_ctrl_cmd, "dev_path_len", 24),
    (uapi.ublksrv_ctrl_dev_info, "max_io_buf_bytes", 8), (uapi.ublksrv_ctrl_dev_info, "dev_id", 12),
    (uapi.ublksrv_ctrl_dev_info, "ublksrv_pid", 16), (uapi.ublksrv_ctrl_dev_info, "flags", 24),
    (uapi.ublksrv_ctrl_dev_info, "owner_uid", 40),
    (uapi.ublksrv_io_desc, "nr_sectors", 4), (uapi.ublksrv_io_desc, "start_sector", 8),
    (uapi.ublksrv_io_desc, "addr", 16),
    (uapi.ublksrv_io_cmd, "tag", 2), (uapi.ublksrv_io_cmd, "result", 4), (uapi.ublksrv_io_cmd, "addr", 8),
    (uapi.ublk_param_basic, "max_sectors", 8), (uapi.ublk_param_basic, "dev_sectors", 16),
    (uapi.ublk_param_discard, "max_discard_segments", 16),
    (uapi.ublk_params, "basic", 8), (uapi.ublk_params, "discard", 40), (uapi.ublk_params, "devt", 60),
    (uapi.ublk_params, "zoned", 76),
])
def test_offsets(struct, field, offset):
    assert getattr(struct, field).offset == offset


def test_ioctl_encodings_match_kernel_values():
    assert uapi.UBLK_U_CMD_GET_DEV_INFO == 0x80207502
    assert uapi.UBLK_U_CMD_ADD_DEV == 0xC0207504
    assert uapi.UBLK_U_CMD_DEL_DEV == 0xC0207505
    assert uapi.UBLK_U_CMD_START_DEV == 0xC0207506
    assert uapi.UBLK_U_CMD_STOP_DEV == 0xC0207507
    assert uapi.UBLK_U_CMD_SET_PARAMS == 0xC0207508
    assert uapi.UBLK_U_CMD_GET_PARAMS == 0x80207509
    assert uapi.UBLK_U_CMD_GET_FEATURES == 0x80207513
    assert uapi.UBLK_U_IO_FETCH_REQ == 0xC0107520
    assert uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ == 0xC0107521
    assert uapi._IOC_NR(uapi.UBLK_U_CMD_START_DEV) == uapi.UBLK_CMD_START_DEV


def test_numpy_dtypes_derived_from_ctypes_keep_the_kernel_layout():
    # np.dtype(ctypes struct) must give exactly the layout the ring and descriptor memory have
    assert uapi.IO_DESC_DTYPE == np.dtype({"names": ["op_flags", "nr_sectors", "start_sector", "addr"],
                                           "formats": ["<u4", "<u4", "<u8", "<u8"],
                                           "offsets": [0, 4, 8, 16], "itemsize": 24})
    assert uapi.CQE_DTYPE == np.dtype({"names": ["user_data", "res", "flags"],
                                       "formats": ["<u8", "<i4", "<u4"],
                                       "offsets": [0, 8, 12], "itemsize": 16})
    for size in (64, 128):
        assert uapi.sqe_dtype(size) == np.dtype({
            "names": ["opcode", "flags", "ioprio", "fd", "cmd_op", "pad1", "addr", "len",
                      "rw_flags", "user_data", "buf_index", "personality", "file_index",
                      "io_q_id", "io_tag", "io_result", "io_addr"],
            "formats": ["u1", "u1", "<u2", "<i4", "<u4", "<u4", "<u8", "<u4",
                        "<u4", "<u8", "<u2", "<u2", "<u4", "<u2", "<u2", "<i4", "<u8"],
            "offsets": [0, 1, 2, 4, 8, 12, 16, 24, 28, 32, 40, 42, 44, 48, 50, 52, 56],
            "itemsize": size})
    # and a record written through the dtype reads back through the ctypes struct
    d = np.zeros(2, dtype=uapi.IO_DESC_DTYPE)
    d[1] = (0x10001, 8, 1 << 33, 0xABC)
    s = uapi.ublksrv_io_desc.from_buffer(d, 24)
    assert (s.op_flags, s.nr_sectors, s.start_sector, s.addr) == (0x10001, 8, 1 << 33, 0xABC)


def test_numpy_dtypes_match_ctypes():
    assert uapi.IO_DESC_DTYPE.itemsize == C.sizeof(uapi.ublksrv_io_desc)
    assert uapi.CQE_DTYPE.itemsize == C.sizeof(uapi.io_uring_cqe)
    for size in (64, 128):
        dt = uapi.sqe_dtype(size)
        assert dt.itemsize == size
        assert dt.fields["user_data"][1] == uapi.io_uring_sqe.user_data.offset
        assert dt.fields["cmd_op"][1] == uapi.SQE_CMD_OP_OFFSET
        assert dt.fields["io_tag"][1] == uapi.SQE_CMD_OFFSET + uapi.ublksrv_io_cmd.tag.offset
        assert dt.fields["io_result"][1] == uapi.SQE_CMD_OFFSET + uapi.ublksrv_io_cmd.result.offset
        assert dt.fields["io_addr"][1] == uapi.SQE_CMD_OFFSET + uapi.ublksrv_io_cmd.addr.offset


def test_descriptor_mmap_geometry():
    assert uapi.ublk_desc_offset(0) == 0
    assert uapi.ublk_desc_offset(1) == 98304
    assert uapi.ublk_desc_len(64) == 4096
    assert uapi.ublk_desc_len(512) == 12288


def test_swap_flag_is_absolute():
    assert uapi.UBLK_IO_F_SWAP == 0x10000
    assert uapi.UBLK_IO_F_NOUNMAP == 0x8000


def test_fiemap_layouts_and_ioctls():
    assert C.sizeof(uapi.fiemap) == 32 and C.sizeof(uapi.fiemap_extent) == 56
    assert uapi.fiemap_extent.fe_flags.offset == 40 and uapi.fiemap.fm_extent_count.offset == 24
    # _IOWR('f', 11, struct fiemap) = dir 3 << 30 | size 32 << 16 | 'f' << 8 | 11
    assert uapi.FS_IOC_FIEMAP == (3 << 30) | (32 << 16) | (ord("f") << 8) | 11
    assert uapi.FS_IOC_GETFLAGS == (2 << 30) | (8 << 16) | (ord("f") << 8) | 1
    assert uapi.FS_IOC_SETFLAGS == (1 << 30) | (8 << 16) | (ord("f") << 8) | 2


def test_bpf_and_perf_layouts():
    assert C.sizeof(uapi.bpf_insn) == 8
    a = uapi.bpf_attr_prog_load
    assert (a.insns.offset, a.license.offset, a.log_level.offset, a.log_buf.offset,
            a.kern_version.offset, a.prog_name.offset, a.expected_attach_type.offset) == \
        (8, 16, 24, 32, 40, 48, 68)
    m = uapi.bpf_attr_map_create
    assert (m.max_entries.offset, m.map_flags.offset, m.map_name.offset) == (12, 16, 28)
    p = uapi.perf_event_attr
    assert C.sizeof(p) == uapi.PERF_ATTR_SIZE_VER1 == 72
    assert (p.config.offset, p.flags.offset, p.config1.offset, p.config2.offset) == (8, 40, 56, 64)
    # _IOW('$', 8, __u32)
    assert uapi.PERF_EVENT_IOC_SET_BPF == (1 << 30) | (4 << 16) | (ord("$") << 8) | 8
    assert uapi.PERF_EVENT_IOC_ENABLE == (ord("$") << 8) | 0
    assert uapi.PT_REGS_DI == 112 and uapi.SWP_TYPE_SHIFT == 58
