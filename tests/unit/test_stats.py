"""stats.py: the counter table and its renderers (compcache --stats byte-exact, JSON)."""

import json

from ublkzswap import stats

SAMPLE = {
    "disksize": 262144 * 1024, "mem_limit": 0, "backing_swap": "",
    "num_reads": 1234, "num_writes": 56789, "failed_reads": 0, "failed_writes": 3,
    "invalid_io": 1, "notify_free": 4321, "zero_pages": 100, "same_pages": 120,
    "good_compress": 7000, "huge_pages": 250, "pages_stored": 10000,
    "orig_data_size": 10000 * 4096, "compr_data_size": 15_000_000,
    "mem_used_total": 16_388_096, "mem_used_max": 20_000_000, "bd_reads": 0, "bd_writes": 0,
}

GOLDEN = (
    "DiskSize:\t  262144 kB\n"
    "NumReads:\t    1234\n"
    "NumWrites:\t   56789\n"
    "FailedReads:\t       0\n"
    "FailedWrites:\t       3\n"
    "InvalidIO:\t       1\n"
    "NotifyFree:\t    4321\n"
    "ZeroPages:\t     100\n"
    "GoodCompress:\t      70 %\n"
    "NoCompress:\t       2 %\n"
    "PagesStored:\t   10000\n"
    "PagesUsed:\t    4001\n"
    "OrigDataSize:\t   40000 kB\n"
    "ComprDataSize:\t   14648 kB\n"
    "MemUsedTotal:\t   16004 kB\n"
)


def test_golden_text_no_backing():
    assert stats.render_text(SAMPLE) == GOLDEN


def test_golden_text_with_backing():
    s = dict(SAMPLE, backing_swap="/dev/sda2", mem_limit=10240 * 1024, bd_reads=7, bd_writes=99999999)
    out = stats.render_text(s)
    assert out == (
        "BackingSwap:\t/dev/sda2\n"
        "DiskSize:\t  262144 kB\n"
        "MemLimit:\t   10240 kB\n"
        + GOLDEN.split("\n", 1)[1]
        + "BDevNumReads:\t       7\n"
        "BDevNumWrites:\t99999999\n"
    )


def test_memlimit_without_backing_prints_no_backing_rows():
    """compcache prints BackingSwap, MemLimit, BDevNumReads and BDevNumWrites only when a backing
    swap is set (backing_swap_name[0]); a memory limit alone (ublkzswap's memlimit without backing
    swap: writes beyond it fail) changes nothing in the text."""
    s = dict(SAMPLE, mem_limit=8192 * 1024, backing_swap="", bd_reads=7, bd_writes=9)
    assert stats.render_text(s) == GOLDEN
    # and the same device with a backing swap shows all four, each in its place
    lines = stats.render_text(dict(s, backing_swap="/dev/sdb")).splitlines()
    assert lines[:3] == ["BackingSwap:\t/dev/sdb", "DiskSize:\t  262144 kB", "MemLimit:\t    8192 kB"]
    assert lines[3:-2] == GOLDEN.splitlines()[1:]
    assert lines[-2:] == ["BDevNumReads:\t       7", "BDevNumWrites:\t       9"]


def test_wide_values_not_truncated():
    out = stats.render_text(dict(SAMPLE, num_reads=123456789012))
    assert "NumReads:\t123456789012\n" in out


def test_label_order_is_compcaches():
    labels = [c.label for c in stats.COUNTERS if c.label]
    assert labels == ["BackingSwap", "DiskSize", "MemLimit", "NumReads", "NumWrites", "FailedReads",
                      "FailedWrites", "InvalidIO", "NotifyFree", "ZeroPages", "GoodCompress",
                      "NoCompress", "PagesStored", "PagesUsed", "OrigDataSize", "ComprDataSize",
                      "MemUsedTotal", "BDevNumReads", "BDevNumWrites"]


def test_raw_names_match_helpers_contract():
    assert set(stats.RAW_NAMES) == {
        "disksize", "mem_limit", "backing_swap", "num_reads", "num_writes", "failed_reads",
        "failed_writes", "invalid_io", "notify_free", "zero_pages", "same_pages", "good_compress",
        "huge_pages", "pages_stored", "orig_data_size", "compr_data_size", "mem_used_total",
        "mem_used_max", "bd_reads", "bd_writes", "pages_compacted", "dup_data_size",
        "pool_misses", "growth_deferred"}


def test_percentages_zero_unless_successful_writes_and_pages():
    assert stats.derive(dict(SAMPLE, num_writes=3, failed_writes=3))["good_compress_pct"] == 0
    assert stats.derive(dict(SAMPLE, pages_stored=0))["no_compress_pct"] == 0
    d = stats.derive(SAMPLE)
    assert d == {"good_compress_pct": 70, "no_compress_pct": 2, "pages_used": 16_388_096 >> 12}


def test_empty_renders_all_zero():
    out = stats.render_text(stats.empty())
    assert "BackingSwap" not in out and out.startswith("DiskSize:\t       0 kB\n")
    assert len(out.splitlines()) == 15


def test_json_uses_zram_names_in_bytes():
    d = json.loads(stats.render_json(SAMPLE))
    assert d["orig_data_size"] == 10000 * 4096
    assert d["pages_used"] == 4001 and d["good_compress_pct"] == 70
    assert list(d)[:len(stats.COUNTERS)] == [c.name for c in stats.COUNTERS]
    assert set(SAMPLE) <= set(d)


def test_json_keeps_unknown_counters():
    d = json.loads(stats.render_json(dict(SAMPLE, zz_extra=5)))
    assert d["zz_extra"] == 5


def test_help_and_man_cover_every_counter():
    h = stats.help_text()
    for c in stats.COUNTERS:
        assert c.name in h
        assert c.help
    assert len(stats.man_rows()) == len(stats.COUNTERS)
