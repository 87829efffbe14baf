"""ublk control command builders: what goes to the kernel, checked without a kernel."""
import ctypes as C

from ublkzswap import ublkctrl as ctrl, uapi


def test_add_dev_asks_for_the_chosen_id_in_header_and_info():
    cmd = ctrl.prepare_add_dev(3, 1, 64, 256 * 1024)
    assert cmd.name == "ADD_DEV" and cmd.cmd_op == uapi.UBLK_U_CMD_ADD_DEV
    h, info = cmd.header, cmd.buf
    assert h.dev_id == info.dev_id == 3          # the kernel refuses a mismatch
    assert h.queue_id == 0xFFFF                  # ADD_DEV wants "no queue"
    assert h.addr == C.addressof(info) and h.len == 64
    assert (info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes) == (1, 64, 256 * 1024)


def test_start_dev_carries_the_pid_inline():
    cmd = ctrl.prepare_start_dev(2, 4242)
    assert cmd.cmd_op == uapi.UBLK_U_CMD_START_DEV
    assert cmd.header.data[0] == 4242 and cmd.header.addr == 0 and cmd.buf is None


def test_get_features_buffer_is_exactly_8_bytes():
    cmd = ctrl.prepare_get_features()
    assert cmd.header.len == 8                   # 16 gives -EINVAL on 6.12


def test_params_respect_the_kernels_validation_rules():
    p = ctrl.basic_params(131072, 256 * 1024, discard=True)
    assert p.len == 112 and p.types == uapi.UBLK_PARAM_TYPE_BASIC | uapi.UBLK_PARAM_TYPE_DISCARD
    b, d = p.basic, p.discard
    assert b.logical_bs_shift == 12 and b.physical_bs_shift >= b.logical_bs_shift
    assert 8 <= b.max_sectors <= (256 * 1024) >> 9
    assert b.dev_sectors == 131072
    assert not b.attrs & uapi.UBLK_ATTR_ROTATIONAL      # swap must see a non-rotational device
    assert d.discard_granularity == 4096 and d.max_discard_segments == 1
    assert d.max_discard_sectors >= 4096                 # at least one 2 MiB swap cluster
    q = ctrl.basic_params(8, 4096, discard=False)
    assert q.types == uapi.UBLK_PARAM_TYPE_BASIC and q.discard.max_discard_sectors == 0


def test_refusal_names_command_device_and_errno():
    e = ctrl.UblkCtrlError(17, "ADD_DEV", 0)
    assert e.errno == 17 and str(e) == "[Errno 17] ADD_DEV of ublk device 0: File exists"
    assert "(auto)" in str(ctrl.UblkCtrlError(22, "ADD_DEV", ctrl.AUTO_DEV_ID))
