"""Freed swap slots heard of one by one (ublkzswap.slotfree): the ring buffer's consumer, the
kprobe program (loaded into this machine's kernel where it may be: the verifier's verdict),
the kernel's BTF read for the fields it needs, the order of drain and requests in the queue,
and the store dropping freed slots. The kernel side is proven in the VM (tests/kernel)."""
import errno
import mmap
import os
import struct

import pytest

from fakeublk import small_store, text_page
from test_queue_loop import serve
from ublkzswap import slotfree as sf, uapi as U
from ublkzswap.target import RamTarget

PAGE = 4096
SIZE = 4096                        # a small ring for the consumer tests


class FakeKernelRing:
    """The producer side of a BPF ring buffer, as the kernel lays it out: a consumer page, a
    producer page, then the data (which the kernel maps twice; records here never wrap)."""

    def __init__(self, size=SIZE):
        self.size = size
        self.consumer = bytearray(mmap.PAGESIZE)
        self.producer = bytearray(mmap.PAGESIZE + 2 * size)
        self.pos = 0

    def put(self, value: int, flags: int = 0) -> None:
        at = mmap.PAGESIZE + (self.pos & (self.size - 1))
        struct.pack_into("<IIQ", self.producer, at, 8 | flags, 0, value)
        self.pos += 16
        struct.pack_into("<Q", self.producer, 0, self.pos)

    def consumed(self) -> int:
        return struct.unpack_from("<Q", self.consumer, 0)[0]

    def ring(self) -> sf.Ring:
        return sf.Ring(size=self.size, consumer=self.consumer, producer=self.producer)


def test_the_consumer_takes_committed_records_and_skips_discarded_ones():
    k = FakeKernelRing()
    r = k.ring()
    assert not r.pending()
    for v in (5, 6):
        k.put(v)
    k.put(99, U.BPF_RINGBUF_DISCARD_BIT)
    k.put(7)
    assert r.pending()
    out = []
    assert r.drain(out, most=2) is True and out == [5, 6] and k.consumed() == 32
    assert r.drain(out) is False and out == [5, 6, 7] and k.consumed() == 64
    assert not r.pending()
    k.put(8, U.BPF_RINGBUF_BUSY_BIT)             # still being written: not yet, not skipped
    assert r.drain(out) is False and out == [5, 6, 7] and k.consumed() == 64
    r.close()


def test_the_consumer_follows_the_ring_around():
    k = FakeKernelRing()
    r = k.ring()
    got = []
    for round_ in range(3 * SIZE // 16 // 10):     # three times round the data
        for i in range(10):
            k.put(round_ * 10 + i)
        # the kernel maps the data twice: what runs past the end is read from the start
        k.producer[mmap.PAGESIZE + SIZE:] = k.producer[mmap.PAGESIZE:mmap.PAGESIZE + SIZE]
        r.drain(got)
    assert got == list(range(len(got))) and len(got) == 3 * SIZE // 16 // 10 * 10
    r.close()


def slot_free_over(ring) -> sf.SlotFree:
    """A SlotFree over a fake ring, without the kernel (the program is the kernel's side)."""
    s = object.__new__(sf.SlotFree)
    import threading
    s.ring, s._lock, s._batch, s.received, s._fds = ring, threading.Lock(), [], 0, []
    return s


def test_drain_applies_everything_committed_in_bounded_batches():
    k = FakeKernelRing(size=1 << 16)
    s = slot_free_over(k.ring())
    for v in range(1, 1201):
        k.put(v)
    calls = []
    s.drain(lambda batch: calls.append(list(batch)))
    assert [len(c) for c in calls] == [sf.BATCH, sf.BATCH, 1200 - 2 * sf.BATCH]
    assert sum(calls, []) == list(range(1, 1201)) and s.received == 1200
    calls.clear()
    s.drain(lambda batch: calls.append(list(batch)))
    assert calls == []                               # nothing new: apply not called


def test_a_failed_apply_loses_its_records_never_keeps_them_for_later():
    """Applied after a later write to the slot, a free would drop that write's data: what
    could not be applied now is dropped (the copy stays: stale, not lost)."""
    k = FakeKernelRing()
    s = slot_free_over(k.ring())
    k.put(3)

    def boom(batch):
        raise MemoryError("no")
    with pytest.raises(MemoryError):
        s.drain(boom)
    k.put(4)
    got = []
    s.drain(lambda b: got.extend(b))
    assert got == [4]


def test_the_store_drops_freed_slots_and_counts_them():
    s = small_store(0, 64 * PAGE)
    try:
        for i in range(1, 6):
            s.write_swap(i * PAGE, memoryview(bytearray(text_page(i))))
        assert s.stats()["pages_stored"] == 5
        k = FakeKernelRing()
        s._slotfree = slot_free_over(k.ring())
        for idx in (2, 4, 0, 64, 2):      # 0 is the header, 64 beyond the device, 2 twice
            k.put(idx)
        s.catch_up()
        st = s.stats()
        assert st["pages_stored"] == 3 and st["notify_free"] == 5
        buf = bytearray(PAGE)
        for i in (1, 3, 5):
            s.read(i * PAGE, memoryview(buf))
            assert bytes(buf) == text_page(i)
        s.read(2 * PAGE, memoryview(buf))
        assert bytes(buf) == bytes(PAGE)
    finally:
        s.close()


class Watching(RamTarget):
    """A target that logs its catch_up calls and its requests in order."""

    def __init__(self, size):
        super().__init__(size)
        self.log = []

    def catch_up(self):
        self.log.append("catch_up")

    def write(self, offset, buf):
        self.log.append(("write", offset // PAGE))
        return super().write(offset, buf)

    def read(self, offset, buf):
        self.log.append(("read", offset // PAGE))
        return super().read(offset, buf)


def test_the_queue_catches_up_once_a_wake_up_before_serving_it():
    t = Watching(1 << 20)
    data = bytes(PAGE)
    serve(t, [
        lambda k: [k.request(0, U.UBLK_IO_OP_WRITE, 8, 8, data=data),
                   k.request(1, U.UBLK_IO_OP_WRITE, 16, 16, data=data * 2)],
        lambda k: [k.request(2, U.UBLK_IO_OP_READ, 8, 8)]])
    t.close()
    assert t.log[:4] == ["catch_up", ("write", 1), ("write", 2), "catch_up"]
    assert t.log[4] == ("read", 1)


def test_the_queue_survives_a_failing_catch_up():
    class Failing(Watching):
        def catch_up(self):
            raise OSError(errno.EIO, "ring gone")
    t = Failing(1 << 20)
    _, ring = serve(t, [lambda k: [k.request(0, U.UBLK_IO_OP_WRITE, 8, 8, data=bytes(PAGE))]],
                    depth=2)
    t.close()
    assert ring.commits == [(0, PAGE)]


# ---------------------------------------------------------------- BTF and the program

def btf_blob(fields: dict, blkdev: int, extra_types: int = 3) -> bytes:
    """A little BTF: some unrelated types, then the two structs and the SWP_ enum."""
    strings = b"\0"
    offs = {}
    for name in ("int", "swap_info_struct", "block_device", "flags", "bdev", "bd_dev",
                 "SWP_USED", "SWP_BLKDEV", "other", "x"):
        offs[name] = len(strings)
        strings += name.encode() + b"\0"
    types = b""
    for _ in range(extra_types):                     # INT, each with its extra word
        types += struct.pack("<IIII", offs["int"], 1 << 24, 4, 32)
    types += struct.pack("<III", offs["other"], (4 << 24) | 1, 8)    # struct other { x }
    types += struct.pack("<III", offs["x"], 1, 0)
    members = [("x", 0), ("flags", fields["flags"]), ("bdev", fields["bdev"])]
    types += struct.pack("<III", offs["swap_info_struct"], (4 << 24) | len(members), 512)
    for n, o in members:
        types += struct.pack("<III", offs[n], 1, o * 8)
    types += struct.pack("<III", offs["block_device"], (4 << 24) | 1, 256)
    types += struct.pack("<III", offs["bd_dev"], 1, fields["bd_dev"] * 8)
    types += struct.pack("<III", 0, (6 << 24) | 2, 4)                 # enum { SWP_USED, SWP_BLKDEV }
    types += struct.pack("<Ii", offs["SWP_USED"], 1) + struct.pack("<Ii", offs["SWP_BLKDEV"], blkdev)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_the_btf_reader_finds_the_fields_and_the_flag(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(btf_blob({"flags": 16, "bdev": 208, "bd_dev": 52}, 64))
    assert sf.btf_layout(str(p)) == {"swap_info_struct.flags": 16, "swap_info_struct.bdev": 208,
                                     "block_device.bd_dev": 52, "SWP_BLKDEV": 64}


def test_the_btf_reader_says_what_is_missing(tmp_path):
    p = tmp_path / "vmlinux"
    blob = bytearray(btf_blob({"flags": 16, "bdev": 208, "bd_dev": 52}, 64))
    blob[blob.index(b"SWP_BLKDEV")] = ord("X")
    p.write_bytes(bytes(blob))
    with pytest.raises(sf.Unavailable, match="SWP_BLKDEV"):
        sf.btf_layout(str(p))
    with pytest.raises(sf.Unavailable, match="no kernel BTF"):
        sf.btf_layout(str(tmp_path / "none"))


def test_this_kernels_btf_if_it_has_one():
    if not os.path.exists(sf.BTF_PATH):
        pytest.skip("no kernel BTF here")
    try:
        lay = sf.btf_layout()
    except sf.Unavailable as e:
        pytest.skip(f"this kernel: {e}")
    assert lay["SWP_BLKDEV"] and not lay["SWP_BLKDEV"] & (lay["SWP_BLKDEV"] - 1)   # one bit
    assert 0 < lay["swap_info_struct.bdev"] < 4096 and 0 <= lay["block_device.bd_dev"] < 4096


LAYOUT = {"swap_info_struct.flags": 16, "swap_info_struct.bdev": 496, "block_device.bd_dev": 52,
          "SWP_BLKDEV": 64}


def test_every_jump_of_the_program_lands_on_its_exit():
    p = sf.program(5, 0xFFFFFFFF82345678, LAYOUT, sf.kernel_dev(os.makedev(259, 3)))
    exit_at = len(p) - 2
    assert p[-1][0] == U.BPF_JMP | U.BPF_EXIT and p[exit_at] == (U.BPF_ALU64 | U.BPF_MOV | U.BPF_K, 0, 0, 0)
    jumps = [(k, off) for k, (code, _r, off, _i) in enumerate(p)
             if code & 0x07 == U.BPF_JMP and code & 0xF0 not in (U.BPF_CALL, U.BPF_EXIT)]
    assert len(jumps) == 5 and all(k + 1 + off == exit_at for k, off in jumps)
    imms = [i for *_x, i in p]
    assert (259 << 20) | 3 in imms and 0x82345678 in imms and 0xFFFFFFFF in imms
    loads = [k for k, (code, r, _o, i) in enumerate(p) if code == U.BPF_LD | U.BPF_IMM | U.BPF_DW]
    assert [(p[k][1] >> 4, p[k][3]) for k in loads] == [(0, 0x82345678), (U.BPF_PSEUDO_MAP_FD, 5)]


def test_the_kernel_accepts_the_program_where_it_may_load_one():
    """This machine's verifier on the real program (skipped where bpf() is not allowed)."""
    attr = U.bpf_attr_map_create(map_type=U.BPF_MAP_TYPE_RINGBUF, max_entries=sf.RING_BYTES)
    try:
        fd = sf._bpf(U.BPF_MAP_CREATE, attr)
    except OSError as e:
        pytest.skip(f"no BPF ring buffer here: {e.strerror}")
    try:
        prog = sf._load(sf.program(fd, 0xFFFFFFFF82000000, LAYOUT, (259 << 20)))
        os.close(prog)
        r = sf.Ring(fd)
        assert not r.pending()
        r.close()
    finally:
        os.close(fd)


def test_kernel_dev_is_mkdev():
    assert sf.kernel_dev(os.makedev(259, 7)) == (259 << 20) | 7


def test_the_keeper_drops_freed_slots_with_no_request_to_wake_a_queue():
    """After an OOM kill no I/O may come: the memory of the killed process's slots must come
    back anyway."""
    import time
    from ublkzswap.store import Store
    s = Store(64 * PAGE, keeper=True, keeper_interval=0.01, low=4, high=16)
    try:
        for i in range(1, 9):
            s.write_swap(i * PAGE, memoryview(bytearray(text_page(i))))
        k = FakeKernelRing()
        s._slotfree = slot_free_over(k.ring())
        for idx in range(1, 9):
            k.put(idx)
        deadline = time.monotonic() + 5
        while s.stats()["pages_stored"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.stats()["pages_stored"] == 0 and s.stats()["notify_free"] == 8
    finally:
        s.close()


def test_kernel_symbols_in_one_pass_hidden_ones_missing(tmp_path):
    p = tmp_path / "kallsyms"
    p.write_text("ffffffff81000000 T _text\n"
                 "ffffffff81664db0 T zswap_invalidate\n"
                 "ffffffff81700000 t zswap_invalidate_x\n"
                 "ffffffff82a00000 b swap_info\n"
                 "ffffffffc0000000 t helper\t[somemod]\n"
                 "0000000000000000 T hidden\n")
    assert sf.kernel_symbols(("swap_info", "zswap_invalidate"), str(p)) == {
        "swap_info": 0xFFFFFFFF82A00000, "zswap_invalidate": 0xFFFFFFFF81664DB0}
    with pytest.raises(sf.Unavailable, match="no kernel symbol hidden"):
        sf.kernel_symbols(("swap_info", "hidden"), str(p))
    with pytest.raises(sf.Unavailable, match="no kernel symbol helper"):
        sf.kernel_symbols(("helper",), str(p))
