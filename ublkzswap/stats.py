"""The counters: one table, named as zram/ramzswap name them, and its renderers.

Owns: the vocabulary of device statistics. :data:`COUNTERS` is the single table;
every other view is computed from it:

- :func:`render_text`: compcache 0.6.2 ``rzscontrol --stats`` output, byte for byte
  (``Label:`` TAB ``%8`` value; kB = bytes >> 10; the bracketed lines of the original
  -- BackingSwap, MemLimit, BDevNumReads, BDevNumWrites -- only with a backing swap);
- :func:`render_json`: the same numbers under zram/store names (plus the derived ones);
- :func:`help_text` / :func:`man_rows`: the ``--help`` epilogue and the man page STATS
  section (:mod:`ublkzswap.manpage`).

A store's ``stats()`` returns a dict keyed by the *raw* counter names (sizes in bytes,
``backing_swap`` a str, "" if none); :func:`empty` gives that dict with every counter
zero. Derived rows (GoodCompress %, NoCompress %, PagesUsed) are computed only when
rendering (:func:`derive`), with compcache's rules (reference section 1.8):
percentages are 0 unless ``num_writes - failed_writes > 0`` and ``pages_stored > 0``;
``PagesUsed = mem_used_total >> 12``.

Still naive: compcache printed several fields as u32 (``%8u``); we print Python ints
and do not reproduce the 32-bit wrap-around for enormous devices. Counters unknown to
the table are kept in JSON (after the known ones) but never shown in the text output.
"""

from __future__ import annotations

import json
import textwrap
from typing import NamedTuple

PAGE_SHIFT = 12


class Counter(NamedTuple):
    """One row of the table.

    name:  the key in a store's ``stats()`` dict (zram name), or the derived value's name;
    label: the compcache ``--stats`` label, or None when the original did not print it;
    unit:  ``bytes`` (shown as kB in the text), ``count``, ``pages``, ``percent``, ``path``;
    help:  one sentence for --help and the man page;
    backing_only: printed in the text output only when a backing swap is configured;
    derived: computed by :func:`derive` from raw counters, never stored.
    """

    name: str
    label: str | None
    unit: str
    help: str
    backing_only: bool = False
    derived: bool = False


# Order = compcache's --stats order, then the rows the original did not print.
COUNTERS: tuple[Counter, ...] = (
    Counter("backing_swap", "BackingSwap", "path",
            "Backing swap device or file that takes writes when the memory limit is reached "
            "or a page does not compress; empty when none.", backing_only=True),
    Counter("disksize", "DiskSize", "bytes",
            "Size of the device as seen by swapon (uncompressed capacity)."),
    Counter("mem_limit", "MemLimit", "bytes",
            "Limit on memory used for compressed pages; beyond it writes go to the backing swap "
            "(or fail without one).", backing_only=True),
    Counter("num_reads", "NumReads", "count",
            "Page reads served from memory (reads forwarded to the backing swap are counted "
            "in BDevNumReads instead)."),
    Counter("num_writes", "NumWrites", "count",
            "Page writes received (every page of a write request), including those "
            "forwarded to the backing swap."),
    Counter("failed_reads", "FailedReads", "count",
            "Reads that failed (decompression error)."),
    Counter("failed_writes", "FailedWrites", "count",
            "Page writes that failed: a compression error or no memory for the page, and "
            "the pages after it in the same request (the request fails as a whole)."),
    Counter("invalid_io", "InvalidIO", "count",
            "Requests rejected as out of range or not page aligned."),
    Counter("notify_free", "NotifyFree", "count",
            "Pages freed because the kernel freed their swap slot (swap-free notify: "
            "each slot as it is freed with ublkzswapd slot_free=on, the default, where the kernel allows it; "
            "whole discarded clusters with swapon --discard)."),
    Counter("zero_pages", "ZeroPages", "count",
            "Stored pages that are entirely zero (kept as a flag, no memory used)."),
    Counter("good_compress_pct", "GoodCompress", "percent",
            "Percentage of stored pages that compressed to half a page (2048 bytes) or less.",
            derived=True),
    Counter("no_compress_pct", "NoCompress", "percent",
            "Percentage of stored pages that did not compress and are kept uncompressed.",
            derived=True),
    Counter("pages_stored", "PagesStored", "pages",
            "Pages held in compressed or raw form (zero pages excluded)."),
    Counter("pages_used", "PagesUsed", "pages",
            "Memory pages used to hold them (MemUsedTotal in pages).", derived=True),
    Counter("orig_data_size", "OrigDataSize", "bytes",
            "Uncompressed size of the stored pages (zero pages excluded)."),
    Counter("compr_data_size", "ComprDataSize", "bytes",
            "Compressed size of the stored pages (a full page for each incompressible one)."),
    Counter("mem_used_total", "MemUsedTotal", "bytes",
            "Memory used in total, including allocator overhead and fragmentation."),
    Counter("bd_reads", "BDevNumReads", "count",
            "Reads forwarded to the backing swap.", backing_only=True),
    Counter("bd_writes", "BDevNumWrites", "count",
            "Writes forwarded to the backing swap.", backing_only=True),
    # Not in compcache's output; JSON and man page only.
    Counter("same_pages", None, "pages",
            "Stored pages filled with one repeated word, zero pages included (zram same_pages)."),
    Counter("good_compress", None, "pages",
            "Stored pages that compressed to 2048 bytes or less (GoodCompress as a count)."),
    Counter("huge_pages", None, "pages",
            "Stored pages kept uncompressed (zram huge_pages; NoCompress as a count)."),
    Counter("pages_compacted", None, "pages",
            "Pages given back by compaction since the device was initialised (zram "
            "pages_compacted; rzscontrol --compact, or in the background)."),
    Counter("mem_used_max", None, "bytes",
            "Highest MemUsedTotal seen since the device was initialised (zram mem_used_max)."),
    Counter("dup_data_size", None, "bytes",
            "Part of ComprDataSize that takes no memory of its own: swapped-out pages identical "
            "to one already stored share its copy (zram's dedup patches' dup_data_size); "
            "what the data takes is compr_data_size - dup_data_size."),
    Counter("pool_misses", None, "count",
            "Times a page write (or compaction, moving an object) found no memory ready. A "
            "swap-out then waits up to 20 ms "
            "for the keeper (not at all while it is held back, see growth_deferred) and fails "
            "with ENOSPC if still none is ready: the kernel keeps the page and writes it again "
            "later. Other writes wait longer. Each miss deepens the ready pool for a while. "
            "Counted since the serving daemon took the device."),
    Counter("growth_deferred", None, "count",
            "Keeper passes that brought in less memory than the ready pool wanted because free "
            "memory was at the daemon's watermark (growth is left to the kernel's reclaim of "
            "others, never forced). Counted since the serving daemon took the device."),
)

BY_NAME: dict[str, Counter] = {c.name: c for c in COUNTERS}
RAW_NAMES: tuple[str, ...] = tuple(c.name for c in COUNTERS if not c.derived)
DERIVED_NAMES: tuple[str, ...] = tuple(c.name for c in COUNTERS if c.derived)


def empty() -> dict:
    """A stats dict with every raw counter zero (``backing_swap`` = "")."""
    return {name: ("" if BY_NAME[name].unit == "path" else 0) for name in RAW_NAMES}


def derive(stats: dict) -> dict:
    """The derived values of ``stats`` (compcache 1.8 rules); missing counters count as 0."""
    g = lambda k: int(stats.get(k, 0) or 0)  # noqa: E731
    stored = g("pages_stored")
    if g("num_writes") - g("failed_writes") > 0 and stored > 0:
        good = g("good_compress") * 100 // stored
        nocomp = g("huge_pages") * 100 // stored
    else:
        good = nocomp = 0
    return {
        "good_compress_pct": good,
        "no_compress_pct": nocomp,
        "pages_used": g("mem_used_total") >> PAGE_SHIFT,
    }


def full(stats: dict) -> dict:
    """Raw counters (table order, missing ones filled from :func:`empty`) + derived + extras."""
    base = empty()
    out = {}
    derived = derive(stats)
    for c in COUNTERS:
        out[c.name] = derived[c.name] if c.derived else stats.get(c.name, base[c.name])
    for k, v in stats.items():
        if k not in out:
            out[k] = v
    return out


def _text_value(c: Counter, v) -> str:
    if c.unit == "path":
        return str(v)
    v = int(v)
    if c.unit == "bytes":
        return f"{v >> 10:>8} kB"
    if c.unit == "percent":
        return f"{v:>8} %"
    return f"{v:>8}"


def render_text(stats: dict) -> str:
    """compcache 0.6.2 ``show_stats`` output, byte-exact, ending with a newline."""
    values = full(stats)
    has_backing = bool(values.get("backing_swap"))
    lines = []
    for c in COUNTERS:
        if c.label is None or (c.backing_only and not has_backing):
            continue
        lines.append(f"{c.label}:\t{_text_value(c, values[c.name])}\n")
    return "".join(lines)


def render_json(stats: dict, *, indent: int | None = 2) -> str:
    """The stats as JSON under zram/store names (sizes in bytes), derived values included."""
    return json.dumps(full(stats), indent=indent)


def man_rows() -> list[tuple[str | None, str, str]]:
    """(label or None, name, text) per counter, for the man page STATS section."""
    rows = []
    for c in COUNTERS:
        text = c.help
        if c.unit == "bytes":
            text += " Shown in kB by --stats, in bytes by --json." if c.label else " In bytes."
        if c.backing_only:
            text += " Printed by --stats only when a backing swap is set."
        if c.derived:
            text += " Derived, not stored."
        if c.label is None:
            text += " --json only."
        rows.append((c.label, c.name, text))
    return rows


def help_text(width: int = 79) -> str:
    """Short counter glossary for ``rzscontrol --help`` (labels of --stats)."""
    lines = ["--stats counters (--json uses the names in parentheses; sizes are kB in --stats,",
             "bytes in --json):"]
    for c in COUNTERS:
        if c.label is None:
            continue
        head = f"{c.label} ({c.name})"
        lines.append(textwrap.fill(f"{head}: {c.help}", width=width,
                                   initial_indent="  ", subsequent_indent="      "))
    lines.append(textwrap.fill("--json also: " + ", ".join(c.name for c in COUNTERS
                                                          if c.label is None) + ".",
                               width=width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)
