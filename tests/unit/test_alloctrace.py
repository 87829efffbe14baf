"""The parser and the classifier behind the kernel tests' no-reclaim-on-the-I/O-path check."""
from tests.kernel import alloctrace as at

SAMPLE = """\
# tracer: nop
      ublkq0:0-184     [000] ..... 120.1: kmalloc: call_site=virtqueue_add_split+0xb0/0x7b0 ptr=000000001 bytes_req=64 bytes_alloc=64 gfp_flags=GFP_ATOMIC node=-1 accounted=false
      ublkq0:0-184     [000] ..... 120.2: kmalloc: call_site=io_alloc_async_data+0x2c/0x60 ptr=000000002 bytes_req=200 bytes_alloc=256 gfp_flags=GFP_KERNEL node=-1 accounted=false
      ublkq0:0-184     [000] ..... 120.3: kmem_cache_alloc: call_site=mempool_alloc_noprof+0x86/0x1b0 ptr=000000003 bytes_req=1 bytes_alloc=1 gfp_flags=GFP_KERNEL|__GFP_NOWARN|__GFP_NORETRY|__GFP_NOMEMALLOC node=-1 accounted=false
      ublkq0:0-184     [000] ..... 120.4: mm_page_alloc: page=000000004 pfn=0x1 order=0 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_ZERO
      iou-wrk-184-190  [001] ..... 120.5: kmem_cache_alloc: call_site=bvec_alloc+0x6a/0xc0 ptr=000000005 bytes_req=1 bytes_alloc=1 gfp_flags=GFP_NOWAIT|__GFP_FS|__GFP_NORETRY|__GFP_NOMEMALLOC node=-1 accounted=false
"""


def test_parse_reads_event_flags_and_call_site():
    ev = at.parse(SAMPLE)
    assert len(ev) == 5
    assert ev[0] == ("kmalloc", "GFP_ATOMIC", "virtqueue_add_split+0xb0/0x7b0")
    assert ev[3] == ("mm_page_alloc", "GFP_HIGHUSER_MOVABLE|__GFP_ZERO", "")


def test_may_reclaim_keeps_only_unbounded_reclaiming_allocations():
    bad = at.may_reclaim(at.parse(SAMPLE))
    assert [e[2] for e in bad] == ["io_alloc_async_data+0x2c/0x60", ""]
    assert "io_alloc_async_data" in at.summary(bad)
