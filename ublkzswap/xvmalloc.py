"""xvmalloc: compcache 0.6.2's allocator for compressed pages, over a numpy arena.

Owns: placing objects of 1..4092 bytes inside 4 KiB arena pages, exactly as
compcache's ``xvmalloc.c`` does (reference: ../shared/docs/compcache-reference.md
section (c)):

- 4-byte alignment (``XV_ALIGN``), requests rounded up to 4;
- 508 free lists 8 bytes apart covering block sizes 32..4092 (list *i* holds
  free blocks of size ``32+8i .. 32+8i+7``), LIFO, doubly linked through the
  free blocks' payload;
- a two-level bitmap: one first-level word (bit *j* set iff second-level word
  *j* is non-zero) and 8 second-level 64-bit words (bit *i* set iff free list
  *i* is non-empty); a fitting list is found with two lowest-set-bit lookups;
- a 4-byte header in front of every block: ``u16 size`` (payload bytes; the
  caller's *exact* requested size while allocated) and ``u16 prev`` (byte
  offset of the previous block in the same page, 4-aligned, its low bits
  carrying ``BLOCK_FREE`` = 1 and ``PREV_FREE`` = 2);
- blocks never span a 4 KiB page; a page grows the pool one at a time and goes
  back as soon as it is entirely free;
- the split rule: the remainder of a split block becomes a free block; if it
  is smaller than 32 bytes it stays marked free (so it can merge later) but is
  put on no list;
- ``free`` merges with both neighbours.

Handles are xvmalloc's ``<page, offset + 4>`` flattened into one integer: the
byte address of the object inside the arena (``page * 4096 + offset + 4``).

Layout of the state (so that it can later live in memory that outlives the
process): the block headers and free-list links live in the arena bytes
themselves; the pool head (bitmaps, list heads, page count) is one 3128-byte
numpy ``uint8`` array, :data:`POOL_STATE_BYTES` (:attr:`XvPool.state`)::

    0     u64 flbitmap
    8     u64 slbitmap[8]
    72    u32 freelist[508]     word address of the list head, NIL if empty
    2104  u64 total_pages
    2112  (reserved to 3128)

A free block's link node (bytes 4..11 of the block) is ``u32 prev, u32 next``:
the *word address* (byte address / 4) of the neighbouring free blocks' headers,
``NIL`` = 0xFFFFFFFF. That is xvmalloc's ``{prev_page, next_page, prev_offset,
next_offset}`` packed into two words; it limits an arena to 16 GiB.

An :class:`XvPool` is the store's *object allocator* (docs/CONTRACTS.md): ``malloc(size,
timeout) / free(handle) / pages_used()``, as zram's ``zs_malloc / zs_free /
zs_get_total_pages``. Its pages come from a *page pool* (:class:`ublkzswap.arena.Arena`):
``take(OBJECTS, timeout) -> page or -1``, ``give(page)``, and ``words``, a ``uint32`` view
of the pool's memory. xvmalloc never creates memory itself; the pool hands it only pages
that are already resident.

Deliberate differences from the C code:

- a request of 4089..4092 bytes: the C ``get_index`` yields list 508, which
  does not exist, so such a request always fails after growing the pool by an
  empty page (ramzswap never asks for more than 3072). Here such a request
  takes a fresh page whole (an exact fit), as the documented 4092 maximum
  intends;
- after growing, the fresh page's block is used directly instead of being
  inserted into list 507 and found again (the result is the same: after a
  failed search it is the only fitting block).
- Python speed: every field access is one memoryview item access; the fast
  paths are written out inline rather than in small helpers.

Still naive: one pool per store and no locking of its own (the store
serialises calls); no compaction, exactly like the original; objects never
span pages, so objects a little over a third of a page leave a third of each
page unused.
"""

from __future__ import annotations

import numpy as np

from .uapi import PAGE_SIZE

PAGE_WORDS = PAGE_SIZE // 4
XV_ALIGN = 4
XV_MIN_ALLOC_SIZE = 32
XV_MAX_ALLOC_SIZE = PAGE_SIZE - XV_ALIGN  # 4092
FL_DELTA = 8
FL_DELTA_SHIFT = 3
NUM_FREE_LISTS = (XV_MAX_ALLOC_SIZE - XV_MIN_ALLOC_SIZE) // FL_DELTA + 1  # 508
BITS_PER_LONG = 64
MAX_FLI = (NUM_FREE_LISTS + BITS_PER_LONG - 1) // BITS_PER_LONG  # 8

BLOCK_FREE = 1
PREV_FREE = 2
NIL = 0xFFFFFFFF

# flag bits as they sit in the 32-bit header word (size in the low half)
_HF = BLOCK_FREE << 16
_HP = PREV_FREE << 16
_SIZE = 0xFFFF

POOL_STATE_BYTES = 3128
_OFF_FL = 0
_OFF_SL = 8
_OFF_HEAD = 72
_OFF_TOTAL = 2104

MAX_ARENA_PAGES = (1 << 32) // PAGE_WORDS - 1  # word addresses fit in u32, NIL excluded


class XvError(Exception):
    """Misuse of the allocator (double free, bad handle)."""


def insert_index(size: int) -> int:
    """Free list a free block of ``size`` bytes goes on (rounds down)."""
    if size > XV_MAX_ALLOC_SIZE:
        size = XV_MAX_ALLOC_SIZE
    return ((size & ~(FL_DELTA - 1)) - XV_MIN_ALLOC_SIZE) >> FL_DELTA_SHIFT


def search_index(size: int) -> int:
    """First free list whose every block fits ``size`` (rounds up)."""
    if size < XV_MIN_ALLOC_SIZE:
        size = XV_MIN_ALLOC_SIZE
    return (((size + FL_DELTA - 1) & ~(FL_DELTA - 1)) - XV_MIN_ALLOC_SIZE) >> FL_DELTA_SHIFT


OBJECTS, WHOLE = 2, 3   # the page pool's kinds: pages carved into objects, a page used whole


class XvPool:
    """One xvmalloc pool over the pages of ``pool`` (a page pool, see the module docstring).

    ``take`` failing means no ready page: ``malloc`` raises :class:`MemoryError`, like
    ``xv_malloc`` returning -ENOMEM. A page that becomes entirely free goes back by ``give``.
    """

    def __init__(self, pool):
        words = pool.words
        if words.format != "I" or words.itemsize != 4:
            raise TypeError("pool.words must be a memoryview cast to 'I' (uint32)")
        if len(words) % PAGE_WORDS:
            raise ValueError("arena size must be a multiple of 4096 bytes")
        if len(words) // PAGE_WORDS > MAX_ARENA_PAGES:
            raise ValueError("arena larger than 16 GiB cannot be addressed by xvmalloc links")
        self.state = state = np.zeros(POOL_STATE_BYTES, dtype=np.uint8)
        sm = memoryview(state)
        self._fl = sm[_OFF_FL:_OFF_SL].cast("Q")
        self._sl = sm[_OFF_SL:_OFF_HEAD].cast("Q")
        self._head = sm[_OFF_HEAD:_OFF_HEAD + 4 * NUM_FREE_LISTS].cast("I")
        self._total = sm[_OFF_TOTAL:_OFF_TOTAL + 8].cast("Q")
        for i in range(NUM_FREE_LISTS):
            self._head[i] = NIL
        self._w = words
        self._pool = pool
        self._take = pool.take
        self._give = pool.give
        self._whole = 0

    # ---- public surface (xv_malloc, xv_free, xv_get_object_size, xv_get_total_size_bytes)

    UNIT_PAGES = 1   # the page pool hands out single pages

    def pages_used(self) -> int:
        """Pages currently owned: the pool's plus the whole ones (zs_get_total_pages)."""
        return self._total[0] + self._whole

    def object_size(self, handle: int) -> int:
        """Exact size the object at ``handle`` was allocated with."""
        return self._w[(handle - XV_ALIGN) >> 2] & _SIZE

    def malloc(self, size: int, timeout: float = 0.0) -> int:
        """Allocate ``size`` bytes (1..4092); return the handle (byte address).

        Raises ValueError for a size out of range, MemoryError when no fitting free block
        exists and the page pool has no page ready within ``timeout`` seconds. A request
        of exactly one page (an incompressible page) takes a whole pool page, as ramzswap
        did with alloc_page: its handle is the page's address (page-aligned, which no
        object handle is).
        """
        if size == PAGE_SIZE:
            page = self._take(WHOLE, timeout)
            if page < 0:
                raise MemoryError("xvmalloc: no ready page")
            self._whole += 1
            return page * PAGE_SIZE
        if size <= 0 or size > XV_MAX_ALLOC_SIZE:
            raise ValueError(f"xvmalloc: size {size} outside 1..{XV_MAX_ALLOC_SIZE}")
        w = self._w
        head = self._head
        sl = self._sl
        asz = (size + 3) & ~3
        # find_block: search index rounds up; lowest non-empty list >= it
        idx = (((asz + 7) & ~7) - 32) >> 3 if asz > 32 else 0
        a = NIL
        if idx < NUM_FREE_LISTS:
            fli = idx >> 6
            word = sl[fli] >> (idx & 63)
            if word:
                idx += (word & -word).bit_length() - 1
                a = head[idx]
            else:
                fl = self._fl[0] >> (fli + 1)
                if fl:
                    fli += (fl & -fl).bit_length()
                    word = sl[fli]
                    idx = (fli << 6) + (word & -word).bit_length() - 1
                    a = head[idx]
        if a != NIL:
            # remove_block_head
            nxt = w[a + 2]
            head[idx] = nxt
            if nxt == NIL:
                fli = idx >> 6
                v = sl[fli] & ~(1 << (idx & 63))
                sl[fli] = v
                if not v:
                    self._fl[0] &= ~(1 << fli)
            else:
                w[nxt + 1] = NIL
            h = w[a]
            bsize = h & _SIZE
        else:
            # grow_pool: one page, one free block of PAGE_SIZE - 4 at offset 0
            page = self._take(OBJECTS, timeout)
            if page < 0:
                raise MemoryError("xvmalloc: no ready page to grow the pool")
            self._total[0] += 1
            a = page * PAGE_WORDS
            h = XV_MAX_ALLOC_SIZE | _HF
            bsize = XV_MAX_ALLOC_SIZE
        # split
        rem = bsize - asz
        t = a + 1 + (asz >> 2)  # word address of what follows the allocated block
        if rem:
            tsz = rem - 4
            w[t] = tsz | _HF | ((a & 1023) << 18)
            if tsz >= XV_MIN_ALLOC_SIZE:
                # insert_block (inline)
                idx = ((tsz & ~7) - 32) >> 3
                nh = head[idx]
                w[t + 1] = NIL
                w[t + 2] = nh
                head[idx] = t
                if nh != NIL:
                    w[nh + 1] = t
                else:
                    fli = idx >> 6
                    sl[fli] |= 1 << (idx & 63)
                    self._fl[0] |= 1 << fli
            n = t + 1 + (tsz >> 2)
            if n & 1023:
                w[n] = (w[n] & 0x3FFFF) | ((t & 1023) << 18)
        elif t & 1023:
            w[t] &= ~_HP
        w[a] = size | ((h & ~_SIZE) & ~_HF)
        return (a << 2) + XV_ALIGN

    def free(self, handle: int, size: int | None = None) -> None:
        """Free the object at ``handle`` (``size`` is not needed: the header has it); merge
        with free neighbours; give the page back when it becomes entirely free. Raises
        XvError on a double free or a handle that is not 4-aligned."""
        if not handle & (PAGE_SIZE - 1):
            self._whole -= 1
            self._give(handle >> 12)
            return
        if handle & 3 or handle < XV_ALIGN:
            raise XvError(f"xvmalloc: bad handle {handle:#x}")
        w = self._w
        a = (handle - XV_ALIGN) >> 2
        h = w[a]
        if h & _HF:
            raise XvError(f"xvmalloc: double free of handle {handle:#x}")
        size = ((h & _SIZE) + 3) & ~3
        pbase = a & ~1023
        n = a + 1 + (size >> 2)
        if n & 1023:
            hn = w[n]
            if hn & _HF:  # merge next
                nsz = hn & _SIZE
                if nsz >= XV_MIN_ALLOC_SIZE:
                    self._remove(n, ((nsz & ~7) - 32) >> 3)
                size += nsz + 4
        if h & _HP:  # merge previous
            pa = pbase + ((h >> 18) & 1023)
            hp = w[pa]
            psz = hp & _SIZE
            if psz >= XV_MIN_ALLOC_SIZE:
                self._remove(pa, ((psz & ~7) - 32) >> 3)
            size += psz + 4
            a = pa
            h = hp
        if size == XV_MAX_ALLOC_SIZE:
            self._total[0] -= 1
            self._give(pbase >> 10)
            return
        w[a] = size | (h & 0xFFFF0000) | _HF
        if size >= XV_MIN_ALLOC_SIZE:
            # insert_block (inline); size <= 4088 here
            head = self._head
            idx = ((size & ~7) - 32) >> 3
            nh = head[idx]
            w[a + 1] = NIL
            w[a + 2] = nh
            head[idx] = a
            if nh != NIL:
                w[nh + 1] = a
            else:
                fli = idx >> 6
                self._sl[fli] |= 1 << (idx & 63)
                self._fl[0] |= 1 << fli
        n = a + 1 + (size >> 2)
        if n & 1023:
            w[n] = (w[n] & 0x1FFFF) | _HP | ((a & 1023) << 18)

    # ---- free lists

    def _remove(self, a: int, idx: int) -> None:
        """remove_block: unlink the free block at ``a`` from list ``idx``."""
        w = self._w
        prv = w[a + 1]
        nxt = w[a + 2]
        if self._head[idx] == a:
            self._head[idx] = nxt
            if nxt == NIL:
                fli = idx >> 6
                v = self._sl[fli] & ~(1 << (idx & 63))
                self._sl[fli] = v
                if not v:
                    self._fl[0] &= ~(1 << fli)
            else:
                w[nxt + 1] = NIL
            return
        w[prv + 2] = nxt
        if nxt != NIL:
            w[nxt + 1] = prv

    # ---- inspection (tests, invariant checks; not on the I/O path)

    def block_header(self, addr: int) -> tuple[int, int, int]:
        """(size, prev offset, flags) of the block whose header is at byte ``addr``."""
        h = self._w[addr >> 2]
        return h & _SIZE, (h >> 16) & ~3, (h >> 16) & 3

    def free_many(self, handles, sizes) -> None:
        """:meth:`free` of each handle in turn (the store's bulk interface; no faster here)."""
        for h in handles.tolist():
            self.free(h)

    def free_list(self, idx: int) -> list[int]:
        """Byte addresses of the free blocks on list ``idx``, head first."""
        out = []
        a = self._head[idx]
        while a != NIL:
            out.append(a << 2)
            a = self._w[a + 2]
            if len(out) > len(self._w):
                raise XvError(f"free list {idx} is cyclic")
        return out

    def check(self, objects: dict[int, int]) -> None:
        """Assert that ``objects`` ({address: size}: every live object, whole pages included)
        are exactly what this allocator holds (tests; slow)."""
        whole = {a for a, n in objects.items() if n == PAGE_SIZE and not a & (PAGE_SIZE - 1)}
        assert {p * PAGE_SIZE for p in self._pool.pages_of(WHOLE).tolist()} == whole, "whole pages disagree"
        assert self._whole == len(whole), f"{self._whole} whole pages counted, {len(whole)} held"
        rest = {a: n for a, n in objects.items() if a not in whole}
        live = self.walk(self._pool.pages_of(OBJECTS))
        assert live == rest, f"{len(rest)} objects given, {len(live)} live in the pool"

    def walk(self, pages) -> dict[int, int]:
        """Walk every block of ``pages`` (the pool's pages) and verify every
        invariant of the allocator. Returns {handle: object size} of the
        allocated objects. Raises AssertionError with a description on the
        first violation. Slow; for tests."""
        w = self._w
        pages = sorted(int(p) for p in pages)
        assert self._total[0] == len(pages), f"{self._total[0]} object pages counted, {len(pages)} given"
        live: dict[int, int] = {}
        free_listed: set[int] = set()
        for p in pages:
            off = 0
            prev_off = 0
            prev_free = None
            any_alloc = False
            while off < PAGE_SIZE:
                a = (p * PAGE_SIZE + off) >> 2
                h = w[a]
                size, poff, flags = h & _SIZE, (h >> 16) & ~3, (h >> 16) & 3
                where = f"page {p} offset {off}"
                if prev_free is None:
                    assert poff == 0 and not flags & PREV_FREE, f"{where}: first block has prev {poff} flags {flags}"
                else:
                    assert poff == prev_off, f"{where}: prev {poff} != {prev_off}"
                    assert bool(flags & PREV_FREE) == prev_free, f"{where}: PREV_FREE {flags & 2} but previous free={prev_free}"
                if flags & BLOCK_FREE:
                    assert size % 4 == 0, f"{where}: free block of unaligned size {size}"
                    assert not prev_free, f"{where}: two adjacent free blocks"
                    if size >= XV_MIN_ALLOC_SIZE:
                        free_listed.add(p * PAGE_SIZE + off)
                    end = off + 4 + size
                else:
                    assert 0 < size <= XV_MAX_ALLOC_SIZE, f"{where}: allocated size {size}"
                    live[p * PAGE_SIZE + off + 4] = size
                    any_alloc = True
                    end = off + 4 + ((size + 3) & ~3)
                assert end <= PAGE_SIZE, f"{where}: block of size {size} crosses the page end"
                prev_off, prev_free, off = off, bool(flags & BLOCK_FREE), end
            assert any_alloc, f"page {p} is entirely free but still in the pool"
        on_lists: set[int] = set()
        page_set = set(pages)
        for i in range(NUM_FREE_LISTS):
            blocks = self.free_list(i)
            bit = (self._sl[i >> 6] >> (i & 63)) & 1
            assert bit == (1 if blocks else 0), f"slbitmap bit {i} = {bit} but list has {len(blocks)} blocks"
            prev = NIL
            for b in blocks:
                h = w[b >> 2]
                assert h & _HF, f"list {i}: block {b:#x} not marked free"
                assert insert_index(h & _SIZE) == i, f"list {i}: block {b:#x} size {h & _SIZE} belongs on list {insert_index(h & _SIZE)}"
                assert w[(b >> 2) + 1] == prev, f"list {i}: block {b:#x} prev link broken"
                assert b not in on_lists, f"block {b:#x} on two lists"
                assert (b >> 12) in page_set, f"list {i}: block {b:#x} outside the pool's pages"
                on_lists.add(b)
                prev = b >> 2
        for j in range(MAX_FLI):
            bit = (self._fl[0] >> j) & 1
            assert bit == (1 if self._sl[j] else 0), f"flbitmap bit {j} = {bit}, slbitmap[{j}] = {self._sl[j]:#x}"
        assert self._fl[0] >> MAX_FLI == 0, "flbitmap has bits beyond MAX_FLI"
        assert on_lists == free_listed, (
            f"free lists and headers disagree: listed-only {sorted(on_lists - free_listed)[:5]}, "
            f"unlisted {sorted(free_listed - on_lists)[:5]}")
        return live
