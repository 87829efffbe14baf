"""The swap workload's own checking: it must notice a wrong page, or the swap tests prove nothing."""
import numpy as np

from tools import swapload


def test_contents_are_deterministic_and_versions_differ():
    pat = swapload.Pattern(4 * swapload.CHUNK_PAGES, {"zero": 1, "same": 1, "text": 1, "random": 1}, 7)
    a, b = pat.chunk(2, 0), pat.chunk(2, 0)
    assert np.array_equal(a, b)
    v1 = pat.chunk(2, 1)
    nonzero = pat.kind[2 * swapload.CHUNK_PAGES:3 * swapload.CHUNK_PAGES] != 0
    assert ((a != v1).any(axis=1) == nonzero).all()     # every non-zero page changes with the version
    assert set(np.unique(pat.kind).tolist()) == {0, 1, 2, 3}


def test_check_chunk_finds_a_single_flipped_bit(capsys):
    pat = swapload.Pattern(2 * swapload.CHUNK_PAGES, {"text": 1, "random": 1}, 3)
    mem = np.stack([pat.chunk(0, 0), pat.chunk(1, 0)])
    assert swapload.check_chunk(mem, pat, 1, 0) == 0
    mem[1, 5, 100] ^= 1 << 17
    assert swapload.check_chunk(mem, pat, 1, 0) == 1
    assert f"MISMATCH page {swapload.CHUNK_PAGES + 5}" in capsys.readouterr().out
    assert swapload.check_chunk(mem, pat, 0, 1) > 0      # stale version is noticed too


def test_small_run_passes():
    assert swapload.main(["--mib", "4", "--passes", "2", "--quiet"]) == 0
