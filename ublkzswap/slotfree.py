"""Freed swap slots, heard of one by one, as zram hears of them.

Owns: a kprobe BPF program on the kernel's per-slot free hook, the ring buffer it writes to,
and :class:`SlotFree`, which hands the store the offsets of its device's freed slots
(``ublkzswapd slot_free=on``).

Why: the kernel tells zram of every swap slot it frees (``swap_slot_free_notify``), and zram
drops the slot's compressed copy at once. A ublk device has no such callback: it hears of freed
slots only when a whole 2 MiB cluster is free and discarded, so a ublk swap keeps the copy of
every page swapped in again until its cluster empties (docs/NOTES.md, "A 384 MiB machine").
Linux calls ``zswap_invalidate(swp_entry_t)`` for every slot it frees, at the point where it
calls ``swap_slot_free_notify``, zswap or not (since 6.9; a global function, so a kprobe can
attach to it). The program filters those entries down to this device's and writes each
slot's offset to a BPF ring buffer; the queue threads drain it.

Ordering (what makes dropping a slot's data safe): the kernel calls the hook before the slot
can be allocated again (zram and zswap rely on that too), and the program has written its
record by then. A write to a reallocated slot is submitted after, so its completion reaches
the queue after the record is visible. :meth:`SlotFree.drain` runs at the start of every
wake-up, after the completions are reaped and before any request is served (the target's
``catch_up``, :meth:`ublkzswap.store.Store.catch_up`), under one lock, so a free is always
applied before a later write to the same slot and never after it. The pool's keeper drains
too (every pass, about 20 ms), so that memory comes back while no I/O wakes a queue (after an
OOM kill); a queue's drain waits for one under way. A record lost (a burst of frees larger
than the ring between two drains, say a big process exiting; the daemon restarted) only
leaves a stale copy, as without the program, until its cluster is discarded.

The filter, in the program: the entry's swap type indexes the kernel's ``swap_info`` array
(its address from /proc/kallsyms); the slot is this device's if that area is a block device
(``SWP_BLKDEV``: a swap *file* on a filesystem on this device has other offsets) whose
``bd_dev`` is this device's. Field offsets and the flag's value come from the kernel's BTF
(/sys/kernel/btf/vmlinux), read once per process, in chunks.

Still naive: x86_64 only (the argument register, the syscall numbers); one program and ring
per device; a kernel without the hook, kprobes, BTF or ``swap_info`` gets none (the device
works as before, stale copies and all).
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import functools
import mmap
import os
import struct
import threading

from . import uapi as U
from .libc import libc, oserror

HOOK = "zswap_invalidate"
RING_BYTES = 128 << 10             # 8,192 records of 16 bytes (header + offset)
BATCH = 512                        # records applied at a time (bounded lists on the I/O path)
PAGE = mmap.PAGESIZE
BTF_PATH = "/sys/kernel/btf/vmlinux"
KPROBE_TYPE = "/sys/bus/event_source/devices/kprobe/type"


class Unavailable(Exception):
    """This kernel offers no per-slot free signal (the reason is the message)."""


# ---------------------------------------------------------------- what the program needs to know

_BTF_KINDS_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}              # fixed extra bytes by kind
_BTF_KINDS_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


def _find_strings(f, str_at: int, str_len: int, names: list[bytes]) -> dict[bytes, int]:
    """Offsets of ``names`` in the BTF string section (NUL-delimited), read in chunks."""
    want = {b"\0" + n + b"\0": n for n in names}
    longest = max(len(k) for k in want)
    found: dict[bytes, int] = {}
    pos, tail = 0, b""
    while pos < str_len and len(found) < len(want):
        f.seek(str_at + pos)
        chunk = f.read(min(1 << 18, str_len - pos))
        if not chunk:
            break
        buf = tail + chunk
        base = pos - len(tail)
        for key, name in want.items():
            if name not in found:
                i = buf.find(key)
                if i >= 0:
                    found[name] = base + i + 1
        pos += len(chunk)
        tail = buf[-longest:]
    return found


def btf_layout(path: str = BTF_PATH) -> dict[str, int]:
    """From the kernel's BTF: byte offsets of ``swap_info_struct.flags``,
    ``swap_info_struct.bdev`` and ``block_device.bd_dev``, and the value of ``SWP_BLKDEV``.
    Raises Unavailable when any is missing."""
    names = [b"swap_info_struct", b"block_device", b"flags", b"bdev", b"bd_dev", b"SWP_BLKDEV"]
    try:
        f = open(path, "rb", buffering=1 << 16)
    except OSError as e:
        raise Unavailable(f"no kernel BTF ({path}: {e.strerror})") from None
    with f:
        hdr = f.read(24)
        if len(hdr) < 24:
            raise Unavailable("kernel BTF too short")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack(
            "<HBBIIIII", hdr)
        if magic != 0xEB9F:
            raise Unavailable("kernel BTF has a foreign byte order or magic")
        s = _find_strings(f, hdr_len + str_off, str_len, names)
        if len(s) != len(names):
            raise Unavailable(f"kernel BTF lacks {sorted(n.decode() for n in names if n not in s)}")
        f.seek(hdr_len + type_off)
        out: dict[str, int] = {}
        want_struct = {s[b"swap_info_struct"]: {s[b"flags"]: "flags", s[b"bdev"]: "bdev"},
                       s[b"block_device"]: {s[b"bd_dev"]: "bd_dev"}}
        blkdev = s[b"SWP_BLKDEV"]
        read = f.read
        done = 0
        while done < type_len and len(out) < 4:
            name_off, info, _size = struct.unpack("<III", read(12))
            done += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            extra = _BTF_KINDS_EXTRA.get(kind, 0) + _BTF_KINDS_PER_MEMBER.get(kind, 0) * vlen
            if kind == 4 and name_off in want_struct and vlen:
                members = read(extra)
                fields = want_struct[name_off]
                prefix = "swap_info_struct." if "bdev" in fields.values() else "block_device."
                for i in range(vlen):
                    m_name, _m_type, m_off = struct.unpack_from("<III", members, 12 * i)
                    if m_name in fields:
                        bits = m_off & 0xFFFFFF if kflag else m_off
                        if bits % 8:
                            raise Unavailable(f"{fields[m_name]} is a bit field")
                        out[prefix + fields[m_name]] = bits // 8
            elif kind == 6 and vlen:
                members = read(extra)
                for i in range(vlen):
                    m_name, val = struct.unpack_from("<Ii", members, 8 * i)
                    if m_name == blkdev:
                        out["SWP_BLKDEV"] = val & 0xFFFFFFFF
            elif extra:
                f.seek(extra, os.SEEK_CUR)
            done += extra
    need = ("swap_info_struct.flags", "swap_info_struct.bdev", "block_device.bd_dev", "SWP_BLKDEV")
    missing = [k for k in need if k not in out]
    if missing:
        raise Unavailable(f"kernel BTF lacks {missing}")
    return out


def kernel_symbols(names: tuple[str, ...], path: str = "/proc/kallsyms") -> dict[str, int]:
    """Addresses of kernel symbols, in one pass over ``path`` (an address of 0, hidden by
    kptr_restrict, counts as missing). Raises Unavailable naming the first one missing."""
    want = {f" {n}\n": n for n in names}
    found: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                name = want.get(line[line.rfind(" "):])
                if name is not None and name not in found:
                    addr = int(line.split(None, 1)[0], 16)
                    if addr:
                        found[name] = addr
                        if len(found) == len(want):
                            break
    except OSError as e:
        raise Unavailable(f"{path}: {e.strerror}") from None
    for n in names:
        if n not in found:
            raise Unavailable(f"no kernel symbol {n} (or its address is hidden)")
    return found


@functools.lru_cache(maxsize=1)
def _kernel_facts() -> tuple[dict[str, int], int]:
    """(btf_layout(), address of ``swap_info``), read once per process, the hook checked
    present; an Unavailable is not cached (the next device asks again)."""
    return btf_layout(), kernel_symbols(("swap_info", HOOK))["swap_info"]


def kernel_dev(rdev: int) -> int:
    """A device number as the kernel keeps it (``MKDEV``: major << 20 | minor)."""
    return (os.major(rdev) << 20) | os.minor(rdev)


# ---------------------------------------------------------------- the program

def _i(code, dst=0, src=0, off=0, imm=0):
    return (code, (src << 4) | dst, off, imm)


def program(map_fd: int, swap_info: int, layout: dict[str, int], kdev: int) -> list[tuple]:
    """The kprobe program, as (code, regs, off, imm) tuples: for the hook's swap entry (first
    argument), if ``swap_info[type]`` is a block-device area on ``kdev``, write the offset."""
    A, X, M = U.BPF_ALU64, U.BPF_X, U.BPF_MEM
    mov_r = U.BPF_ALU64 | U.BPF_MOV | U.BPF_X
    mov_k = U.BPF_ALU64 | U.BPF_MOV | U.BPF_K
    add_k = U.BPF_ALU64 | U.BPF_ADD | U.BPF_K
    call = U.BPF_JMP | U.BPF_CALL
    ldx = U.BPF_LDX | M | U.BPF_DW
    stx = U.BPF_STX | M | U.BPF_DW
    st = U.BPF_ST | M | U.BPF_DW

    def read(dst_off: int, size: int):       # *(fp + dst_off) = *(r3) (size bytes), r3 set
        return [_i(mov_r, 1, 10), _i(add_k, 1, imm=dst_off), _i(mov_k, 2, imm=size),
                _i(call, imm=U.BPF_FUNC_probe_read_kernel)]

    p = [
        _i(ldx, 6, 1, U.PT_REGS_DI),                          # r6 = entry.val
        _i(mov_r, 7, 6), _i(A | U.BPF_RSH | U.BPF_K, 7, imm=U.SWP_TYPE_SHIFT),   # r7 = type
        _i(U.BPF_JMP | U.BPF_JGT | U.BPF_K, 7, off=None, imm=U.MAX_SWAPFILES - 1),
        _i(mov_r, 8, 6), _i(A | U.BPF_LSH | U.BPF_K, 8, imm=64 - U.SWP_TYPE_SHIFT),
        _i(A | U.BPF_RSH | U.BPF_K, 8, imm=64 - U.SWP_TYPE_SHIFT),                # r8 = offset
        _i(st, 10, off=-8, imm=0), _i(st, 10, off=-16, imm=0),
        _i(A | U.BPF_LSH | U.BPF_K, 7, imm=3),
        _i(U.BPF_LD | U.BPF_IMM | U.BPF_DW, 3, imm=swap_info & 0xFFFFFFFF),
        _i(0, imm=swap_info >> 32),
        _i(A | U.BPF_ADD | X, 3, 7),                          # r3 = &swap_info[type]
        *read(-8, 8),                                         # fp-8 = si
        _i(ldx, 9, 10, -8),
        _i(U.BPF_JMP | U.BPF_JEQ | U.BPF_K, 9, off=None, imm=0),
        _i(mov_r, 3, 9), _i(add_k, 3, imm=layout["swap_info_struct.flags"]),
        *read(-16, 8),                                        # fp-16 = si->flags
        _i(ldx, 3, 10, -16),
        _i(A | U.BPF_AND | U.BPF_K, 3, imm=layout["SWP_BLKDEV"]),
        _i(U.BPF_JMP | U.BPF_JEQ | U.BPF_K, 3, off=None, imm=0),
        _i(mov_r, 3, 9), _i(add_k, 3, imm=layout["swap_info_struct.bdev"]),
        *read(-8, 8),                                         # fp-8 = si->bdev
        _i(ldx, 3, 10, -8),
        _i(U.BPF_JMP | U.BPF_JEQ | U.BPF_K, 3, off=None, imm=0),
        _i(add_k, 3, imm=layout["block_device.bd_dev"]),
        _i(st, 10, off=-16, imm=0),
        *read(-16, 4),                                        # fp-16 = bdev->bd_dev
        _i(ldx, 3, 10, -16),
        _i(U.BPF_JMP | U.BPF_JNE | U.BPF_K, 3, off=None, imm=kdev),
        _i(stx, 10, 8, -8),                                   # fp-8 = offset
        _i(U.BPF_LD | U.BPF_IMM | U.BPF_DW, 1, U.BPF_PSEUDO_MAP_FD, imm=map_fd), _i(0),
        _i(mov_r, 2, 10), _i(add_k, 2, imm=-8), _i(mov_k, 3, imm=8), _i(mov_k, 4, imm=0),
        _i(call, imm=U.BPF_FUNC_ringbuf_output),
        _i(mov_k, 0, imm=0),                                  # out:
        _i(U.BPF_JMP | U.BPF_EXIT),
    ]
    out = len(p) - 2
    return [(c, r, out - k - 1 if o is None else o, imm) for k, (c, r, o, imm) in enumerate(p)]


# ---------------------------------------------------------------- system calls

def _bpf(cmd: int, attr) -> int:
    fd = libc.syscall(C.c_long(U.__NR_bpf), C.c_long(cmd), C.byref(attr), C.c_long(C.sizeof(attr)))
    if fd < 0:
        raise oserror(f"bpf({cmd})")
    return fd


def _load(insns: list[tuple]) -> int:
    arr = (U.bpf_insn * len(insns))(*[U.bpf_insn(c, r, o, ((imm + (1 << 31)) & 0xFFFFFFFF) - (1 << 31))
                                      for c, r, o, imm in insns])
    lic = C.create_string_buffer(b"GPL")
    attr = U.bpf_attr_prog_load(prog_type=U.BPF_PROG_TYPE_KPROBE, insn_cnt=len(insns),
                                insns=C.addressof(arr), license=C.addressof(lic),
                                prog_name=b"ublkz_slotfree")
    try:
        return _bpf(U.BPF_PROG_LOAD, attr)
    except OSError as e:
        log = C.create_string_buffer(1 << 16)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), C.addressof(log)
        try:
            return _bpf(U.BPF_PROG_LOAD, attr)
        except OSError:
            last = log.value.decode(errors="replace").strip().splitlines()[-3:]
            raise Unavailable(f"the kernel refused the program ({e.strerror}): "
                              + " | ".join(last)) from None


def _attach(prog_fd: int, func: str) -> int:
    try:
        with open(KPROBE_TYPE) as f:
            pmu = int(f.read())
    except OSError:
        raise Unavailable("no kprobe event source") from None
    name = C.create_string_buffer(func.encode())
    attr = U.perf_event_attr(type=pmu, size=U.PERF_ATTR_SIZE_VER1, config1=C.addressof(name))
    fd = libc.syscall(C.c_long(U.__NR_perf_event_open), C.byref(attr), C.c_long(-1),
                      C.c_long(0), C.c_long(-1), C.c_long(U.PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        raise Unavailable(oserror(f"kprobe on {func}").strerror)
    try:
        fcntl.ioctl(fd, U.PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, U.PERF_EVENT_IOC_ENABLE, 0)
    except OSError as e:
        os.close(fd)
        raise Unavailable(f"attaching the program to {func}: {e.strerror}") from None
    return fd


class Ring:
    """The consumer side of a BPF ring buffer of 8-byte records, over its two mappings (the
    consumer page, read-write; the producer page and the data, mapped twice, read-only), or
    over memory a test provides (``consumer``/``producer`` as bytearray-like)."""

    def __init__(self, fd: int = -1, size: int = RING_BYTES, *, consumer=None, producer=None):
        if consumer is None:
            consumer = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            producer = mmap.mmap(fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                 offset=PAGE)
        self._maps = (consumer, producer)
        self._cons = memoryview(consumer).cast("Q")
        self._prod = memoryview(producer).cast("Q")
        self._mask = size - 1
        self._data = PAGE // 8
        self._u32 = memoryview(producer).cast("I")
        for m in (self._cons, self._prod):       # page tables made now, not on the I/O path
            sum(m[::PAGE // 8])

    def pending(self) -> bool:
        return self._prod[0] != self._cons[0]

    def drain(self, out: list, most: int = 1 << 30) -> bool:
        """Append committed records' values to ``out`` (at most ``most``) and release them;
        True if more were committed."""
        cons, prod = self._cons[0], self._prod[0]
        mask, data, u32, q = self._mask, self._data, self._u32, self._prod
        while cons < prod:
            if len(out) >= most:
                self._cons[0] = cons
                return True
            at = cons & mask
            hdr = u32[(PAGE + at) >> 2]
            if hdr & U.BPF_RINGBUF_BUSY_BIT:
                break
            if not hdr & U.BPF_RINGBUF_DISCARD_BIT:
                out.append(q[data + ((at + U.BPF_RINGBUF_HDR_SZ) >> 3)])
            cons += ((hdr & 0x3FFFFFFF) + U.BPF_RINGBUF_HDR_SZ + 7) & ~7
        self._cons[0] = cons
        return False

    def close(self) -> None:
        self._cons.release()
        self._prod.release()
        self._u32.release()
        for m in self._maps:
            if hasattr(m, "close"):
                m.close()


class SlotFree:
    """The freed slots of one block device (``rdev``, its ``st_rdev``), from the kernel.

    ``drain(apply)`` calls ``apply(offsets)`` (page offsets, a list) with every slot freed
    since the last drain, under a lock, so that a concurrent drain waits until those are
    applied. Raises Unavailable at construction when the kernel offers no such signal."""

    def __init__(self, rdev: int):
        if os.uname().machine != "x86_64":
            raise Unavailable("x86_64 only")
        layout, swap_info = _kernel_facts()
        self._fds: list[int] = []
        try:
            attr = U.bpf_attr_map_create(map_type=U.BPF_MAP_TYPE_RINGBUF, max_entries=RING_BYTES)
            try:
                map_fd = _bpf(U.BPF_MAP_CREATE, attr)
            except OSError as e:
                raise Unavailable(f"no BPF ring buffer: {e.strerror}") from None
            self._fds.append(map_fd)
            prog_fd = _load(program(map_fd, swap_info, layout, kernel_dev(rdev)))
            self._fds.append(prog_fd)
            self.ring = Ring(map_fd)
            self._fds.append(_attach(prog_fd, HOOK))
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._batch: list[int] = []
        self.received = 0

    def drain(self, apply) -> None:
        ring = self.ring
        if not ring.pending():
            if not self._lock.locked():
                return
        with self._lock:           # (a drain under way in another thread: wait for it)
            batch = self._batch
            try:
                more = True
                while more:                  # all of them, before any request is served
                    more = ring.drain(batch, BATCH)
                    if batch:
                        self.received += len(batch)
                        apply(batch)
                        batch.clear()
            finally:
                batch.clear()      # never kept for later: applied after a write, a free
                                   # would drop that write's data; lost, it leaves a copy

    def close(self) -> None:
        for fd in reversed(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        ring = getattr(self, "ring", None)
        if ring is not None:
            ring.close()
            self.ring = None


def open_for(path: str):
    """A :class:`SlotFree` for the block device at ``path``, or (None, why)."""
    try:
        return SlotFree(os.stat(path).st_rdev), ""
    except Unavailable as e:
        return None, str(e)
    except OSError as e:
        return None, f"{path}: {e.strerror or errno.errorcode.get(e.errno, e.errno)}"
