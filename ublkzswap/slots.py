"""The slot table's format and the counters that follow its content.

Owns: how a slot is encoded (two uint64 words a slot, 16 bytes as zram's table entry: ``address
<< 16 | length << 2 | kind`` and, for a SAME slot, the fill word; for a slot holding an object
(RAW or COMP) the second word is ``tag << 32 | link``, see "Shared objects"), the slot kinds,
the store's counter record (:data:`COUNTERS`, zram's names; ``stats.py`` labels them) and the
one rule that moves counters with content (:func:`count`), and decoding for tests and tools
(:func:`decode`, :func:`decode_all`). The store (:mod:`ublkzswap.store`) is the only writer
of a table; it stores an entry word last, so a reader sees old or new content, never half.

A RAW entry with length 0 is page 0 as ``preformat`` left it (the swap header, kept apart and
counted nowhere). Length takes 13 bits (objects up to 4096 bytes), the address 48.

Shared objects (deduplication): slots of one kind (RAW or COMP) whose pages are identical may
point at one object. Such slots form a ring through the low 32 bits of their second word
(``link``: the next slot's index + 1; 0 = the slot holds its object alone), so the object is
freed only by the last of them (:func:`share`, :func:`unlink`, :func:`ring`). The high 32
bits hold the page's ``tag`` (a hash of the bytes stored) for the store's dedup index. The entry words are the truth:
a takeover rebuilds rings from addresses (:func:`rebuild_rings`), so a crash between a link
and its entry leaves nothing wrong but, at worst, an object counted twice (a leak compaction
moves away, never a free of data still pointed at). ``dup_data_size`` counts the bytes of
slots that share another's object: a ring of k slots holds (k - 1) x length of them.
"""

from __future__ import annotations

import numpy as np

from .uapi import PAGE_SIZE

EMPTY, SAME, RAW, COMP = 0, 1, 2, 3           # slot kinds (low two bits of an entry)
KIND_NAMES = ("empty", "same", "raw", "compressed")
GOOD_COMPRESS = PAGE_SIZE // 2                # clen <= 2048 counts as good_compress

#: The store's counters, in the order of its counter record.
COUNTERS = ("num_reads", "num_writes", "failed_reads", "failed_writes", "notify_free",
            "zero_pages", "same_pages", "good_compress", "huge_pages", "pages_stored",
            "compr_data_size", "mem_used_max", "bd_reads", "bd_writes", "pages_compacted",
            "dup_data_size")
(NUM_READS, NUM_WRITES, FAILED_READS, FAILED_WRITES, NOTIFY_FREE, ZERO_PAGES, SAME_PAGES,
 GOOD_COMPRESS_N, HUGE_PAGES, PAGES_STORED, COMPR_DATA_SIZE, MEM_USED_MAX, BD_READS,
 BD_WRITES, PAGES_COMPACTED, DUP_DATA_SIZE) = range(len(COUNTERS))
LINK = 0xFFFFFFFF                             # the ring link in a held slot's second word


def count(c, kind: int, length: int, value: int, d: int) -> None:
    """Move the counter record ``c`` by ``d`` (+1 or -1) slots of (kind, length, value)."""
    if kind == SAME:
        c[SAME_PAGES] += d
        if value:
            c[PAGES_STORED] += d
            c[GOOD_COMPRESS_N] += d
        else:
            c[ZERO_PAGES] += d
        return
    c[PAGES_STORED] += d
    c[COMPR_DATA_SIZE] += d * length
    if kind == RAW:
        c[HUGE_PAGES] += d
    elif length <= GOOD_COMPRESS:
        c[GOOD_COMPRESS_N] += d


def decode(entry: int, value: int) -> tuple[str, int, int, int]:
    """(kind name, address, length, fill word) of one slot's two words."""
    kind = entry & 3
    return KIND_NAMES[kind], entry >> 16, (entry >> 2) & 0x1FFF, value if kind == SAME else 0


def decode_all(tab: np.ndarray) -> dict[str, np.ndarray]:
    """A whole table (uint64, two words a slot) decoded: kind, address, length, value and link
    (a held slot's ring link, else 0) arrays."""
    t = tab.reshape(-1, 2)
    kind = t[:, 0] & np.uint64(3)
    return {"kind": kind.astype(np.uint8), "address": t[:, 0] >> np.uint64(16),
            "length": ((t[:, 0] >> np.uint64(2)) & np.uint64(0x1FFF)).astype(np.int64),
            "value": np.where(kind == SAME, t[:, 1], 0).astype(np.uint64),
            "link": np.where((kind >= RAW) & ((t[:, 0] & np.uint64(0x7FFC)) != 0),
                             t[:, 1] & np.uint64(LINK), 0).astype(np.int64)}


# ---- shared objects: rings through the second word of held slots (t: the table's words)

def share(t, i: int, c: int, tag: int) -> None:
    """Slot ``i`` joins the ring of slot ``c`` (it holds an object ``i`` is to point at):
    second words only, the caller stores ``i``'s entry word after."""
    j = 2 * c + 1
    w = t[j]
    t[2 * i + 1] = (tag << 32) | ((w & LINK) or c + 1)
    t[j] = (w >> 32 << 32) | (i + 1)


def unlink(t, i: int) -> bool:
    """Take slot ``i`` (RAW or COMP) out of its ring; False if it held its object alone (then
    the caller frees the object). Raises ValueError on a broken ring."""
    w = t[2 * i + 1]
    nxt = w & LINK
    if not nxt:
        return False
    p = nxt - 1
    for _ in range(len(t) >> 1):
        pw = t[2 * p + 1]
        if pw & LINK == i + 1:
            break
        p = (pw & LINK) - 1
    else:
        raise ValueError(f"slot {i}: broken shared-object ring")
    t[2 * p + 1] = (pw >> 32 << 32) | (0 if nxt == p + 1 else nxt)   # a ring of one is none
    t[2 * i + 1] = w >> 32 << 32
    return True


def ring(t, i: int) -> list[int]:
    """The slots sharing slot ``i``'s object, ``i`` first (``[i]`` if it holds it alone)."""
    out = [i]
    nxt = t[2 * i + 1] & LINK
    while nxt and nxt != i + 1:
        out.append(nxt - 1)
        if len(out) > len(t) >> 1:
            raise ValueError(f"slot {i}: broken shared-object ring")
        nxt = t[2 * nxt - 1] & LINK
    return out


def rebuild_rings(tab: np.ndarray, idx: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """Relink the rings of the held slots ``idx`` (pointing at ``addr``; every slot with a link
    a takeover found) from their addresses: slots at one address form one ring, a slot alone
    gets no link. Returns the addresses' group sizes (one per distinct address)."""
    if not len(idx):
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((idx, addr))
    idx, addr = idx[order], addr[order]
    starts = np.concatenate(([0], np.flatnonzero(addr[1:] != addr[:-1]) + 1))
    sizes = np.diff(np.concatenate((starts, [len(idx)])))
    group_end = np.repeat(starts + sizes, sizes)
    pos = np.arange(len(idx))
    nxt = np.where(pos + 1 < group_end, pos + 1, np.repeat(starts, sizes))   # the next, wrapping
    link = (idx[nxt] + 1).astype(np.uint64)
    link[np.repeat(sizes, sizes) == 1] = 0
    w = 2 * idx.astype(np.int64) + 1
    tab[w] = (tab[w] >> np.uint64(32) << np.uint64(32)) | link
    return sizes


def recount(c, tab: np.ndarray, scan: int = 8192) -> None:
    """Set the counters that follow content (same, zero, huge, stored, good, compressed size)
    from a whole table, as :func:`count` would have left them: a takeover's reconciliation.
    ``scan`` slots at a time, so that numpy's temporaries stay small."""
    nsame = zero = nraw = ncomp = good = size = 0
    for lo in range(0, len(tab) // 2, scan):
        e, v = tab[2 * lo:2 * (lo + scan):2], tab[2 * lo + 1:2 * (lo + scan):2]
        kind = e & np.uint64(3)
        length = ((e >> np.uint64(2)) & np.uint64(0x1FFF)).astype(np.int64)
        same, comp, raw = kind == SAME, kind == COMP, (kind == RAW) & (length > 0)
        zero += int(np.count_nonzero(same & (v == 0)))
        nsame += int(np.count_nonzero(same))
        nraw += int(np.count_nonzero(raw))
        ncomp += int(np.count_nonzero(comp))
        good += int(np.count_nonzero(comp & (length <= GOOD_COMPRESS)))
        size += int(length[comp].sum())
    c[SAME_PAGES], c[ZERO_PAGES], c[HUGE_PAGES] = nsame, zero, nraw
    c[PAGES_STORED] = ncomp + nraw + nsame - zero
    c[GOOD_COMPRESS_N] = good + nsame - zero
    c[COMPR_DATA_SIZE] = size + PAGE_SIZE * nraw
