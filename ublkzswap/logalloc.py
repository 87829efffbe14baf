"""The log allocator: compressed pages appended into 64 KiB segments, holes closed by moving.

Owns: placing objects of 1..4096 bytes in the arena, as a log-structured memory does. The
page pool (:class:`ublkzswap.arena.Arena` with ``unit = SEGMENT_PAGES``) hands out whole
segments; an allocation is a bump of the current segment's fill pointer (two heads: one for
whole pages, so that they pack 16 to a segment, one for everything else), and a free only
lowers its segment's live byte count. A segment whose count reaches zero goes back to the pool.
Objects have no header and may cross the 4 KiB page boundaries inside a segment (the arena is
one contiguous mapping), so a sequential fill wastes at most the tail of each segment.

Overwrites and frees leave holes; they are closed by *moving* objects out of the emptiest
segments (:meth:`LogPool.victims` picks them; the owner of the objects, the store, moves them
with ``malloc`` + copy + ``free`` and rewrites its own pointers, since only it knows who points
where). That is zsmalloc's compaction, with the log's simplicity: a moved object goes to the
head, never back into a segment being emptied.

Interface (docs/CONTRACTS.md, "object allocator"): ``malloc(size, timeout) -> address`` or
MemoryError, ``free(address, size)``, ``pages_used()``, ``live_bytes()``, ``victims(...)``,
``check(objects)`` (tests).

Still naive: one segment size; victims are chosen greedily by live bytes (no age or cost-benefit
policy); the store's lock serialises every call.
"""

from __future__ import annotations

import numpy as np

from .memory import resident_array
from .uapi import PAGE_SIZE

SEGMENT_PAGES = 16
SEGMENT = SEGMENT_PAGES * PAGE_SIZE          # 64 KiB
OBJECTS = 2                                  # the page pool's kind for our segments
MAX_OBJECT = PAGE_SIZE


class LogPool:
    """Segments of ``pool`` (an Arena whose unit is :data:`SEGMENT_PAGES` pages)."""

    UNIT_PAGES = SEGMENT_PAGES

    def __init__(self, pool):
        if pool.unit != SEGMENT_PAGES:
            raise ValueError(f"the log allocator needs a pool of {SEGMENT_PAGES}-page units")
        self._take = pool.take
        self._give = pool.give
        self._live = resident_array(pool.nunits, np.uint32, "ublkzswap segment table")
        self._lv = memoryview(self._live)
        self._segments = 0                   # segments taken and not given back
        self._live_total = 0
        # heads: [segment or -1, fill offset]; 0 = small objects, 1 = whole pages
        self._heads = [[-1, SEGMENT], [-1, SEGMENT]]

    # ---- the I/O path

    def malloc(self, size: int, timeout: float = 0.0) -> int:
        """Room for ``size`` bytes (1..4096); returns its byte address in the pool. Raises
        MemoryError when a new segment is needed and none is ready within ``timeout`` s."""
        head = self._heads[size == MAX_OBJECT]
        off = head[1]
        if off + size > SEGMENT:
            seg = self._take(OBJECTS, timeout)
            if seg < 0:
                raise MemoryError("log allocator: no ready segment")
            self._segments += 1
            head[0], off = seg, 0
        seg = head[0]
        head[1] = off + size
        self._lv[seg] += size
        self._live_total += size
        return seg * SEGMENT + off

    def free(self, address: int, size: int) -> None:
        """The ``size`` bytes at ``address`` are no longer used; an emptied segment goes back."""
        seg = address // SEGMENT
        left = self._lv[seg] - size
        self._lv[seg] = left
        self._live_total -= size
        if not left:
            for head in self._heads:
                if head[0] == seg:              # an emptied head starts afresh next time
                    head[0], head[1] = -1, SEGMENT
            self._drop(seg)

    def free_many(self, addresses: np.ndarray, sizes: np.ndarray) -> None:
        """:meth:`free` of every (address, size) pair at once (a discard's): live bytes per
        segment in bulk, then each emptied segment goes back."""
        if not len(addresses):
            return
        # grouped by segment with one in-place sort of (segment, size) keys: the sort the
        # keeper and compaction use, so its code is resident (np.unique's argsort is not)
        keys = (addresses // SEGMENT) << 13 | sizes          # sizes are 1..4096 < 2**13
        keys.sort()
        segs = keys >> 13
        starts = np.flatnonzero(segs[1:] != segs[:-1]) + 1
        starts = np.concatenate(([0], starts))
        uniq = segs[starts]
        gone = np.add.reduceat(keys & 0x1FFF, starts)
        left = self._live[uniq].astype(np.int64) - gone
        if (left < 0).any():
            raise ValueError("log allocator: more bytes freed than a segment holds")
        self._live[uniq] = left
        self._live_total -= int(gone.sum())
        for seg in uniq[left == 0].tolist():
            for head in self._heads:
                if head[0] == seg:              # an emptied head starts afresh next time
                    head[0], head[1] = -1, SEGMENT
            self._drop(seg)

    def _drop(self, seg: int) -> None:
        self._segments -= 1
        self._give(seg)

    def adopt(self, live: np.ndarray, ends: np.ndarray | None = None) -> None:
        """Start from the live bytes per segment a previous process left (rebuilt from the
        store's table), every segment with live bytes in use. ``ends``: per segment, the
        offset just past its last live object: the two with the most room after it become
        the heads (the roomiest for small objects), so that the first writes after a
        takeover go into memory the dead server already had -- the new server's keeper
        starts only a moment after the kernel's requests flow again, and until then a write
        needing a new segment fails. Without ``ends``, fresh heads."""
        self._live[:] = live[:len(self._live)]
        self._segments = int(np.count_nonzero(self._live))
        self._live_total = int(live.sum())
        self._heads = [[-1, SEGMENT], [-1, SEGMENT]]
        if ends is None:
            return
        used = np.flatnonzero(self._live)
        fill = ends[used].astype(np.int64)
        for head, k in zip(self._heads, np.argsort(fill, kind="stable")[:2].tolist()):
            if fill[k] < SEGMENT:
                head[0], head[1] = int(used[k]), int(fill[k])

    # ---- numbers and compaction

    def pages_used(self) -> int:
        """Pages of the segments in use (zs_get_total_pages)."""
        return self._segments * SEGMENT_PAGES

    def live_bytes(self) -> int:
        """Bytes of the objects allocated and not freed."""
        return self._live_total

    def victims(self, max_fill: float = 0.9, limit: int = 64,
                budget: int | None = None) -> tuple[int, list[int]]:
        """(SEGMENT, the numbers of up to ``limit`` segments worth emptying, emptiest first):
        live bytes at most ``max_fill`` of a segment, heads excluded; none unless moving their
        live bytes into fresh segments frees at least one segment net. With a ``budget``
        (bytes) it stops taking more once their live bytes would pass it and they free a
        segment net: a round that takes only what it can move finishes its victims, where one
        that takes many and moves part of each frees none."""
        heads = {h[0] for h in self._heads}
        snapshot = self._live.astype(np.int64)       # a copy: writers change it meanwhile
        used = np.flatnonzero(snapshot)
        if len(used) == 0:
            return SEGMENT, []
        live = snapshot[used]
        ok = live <= max_fill * SEGMENT
        used, live = used[ok], live[ok]
        order = np.argsort(live, kind="stable")
        out, moved = [], 0
        for i in order[:limit + len(heads)].tolist():
            seg, n = int(used[i]), int(live[i])
            if seg in heads:
                continue
            if (budget is not None and moved + n > budget
                    and len(out) * SEGMENT - moved >= SEGMENT):
                break
            moved += n
            out.append(seg)
            if len(out) >= limit:
                break
        return SEGMENT, (out if len(out) * SEGMENT - moved >= SEGMENT else [])

    def check(self, objects: dict[int, int]) -> None:
        """Assert that ``objects`` ({address: size}, every live object) are what this pool
        counts: live bytes per segment, segments in use, no overlaps (tests; slow)."""
        per = np.zeros(len(self._live), dtype=np.int64)
        last_end = {}
        for a in sorted(objects):
            size = objects[a]
            seg = a // SEGMENT
            assert 0 < size <= MAX_OBJECT and (a + size - 1) // SEGMENT == seg, f"object {a:#x}+{size} crosses a segment"
            assert last_end.get(seg, 0) <= a, f"object {a:#x} overlaps the one before it"
            last_end[seg] = a + size
            per[seg] += size
        assert np.array_equal(per, self._live.astype(np.int64)), "live bytes per segment disagree"
        assert self._live_total == int(per.sum()), "total live bytes disagree"
        in_use = set(np.flatnonzero(per).tolist()) | {h[0] for h in self._heads if h[0] >= 0}
        assert self._segments == len(in_use), f"{self._segments} segments counted, {len(in_use)} in use"
        for seg, off in self._heads:
            if seg >= 0:
                assert last_end.get(seg, 0) <= seg * SEGMENT + off, f"an object of head segment {seg} lies past its fill"
