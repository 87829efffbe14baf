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


def test_memlimit_workload_verdict_accepts_only_a_clean_end_or_the_tests_own_kill():
    """The memlimit kernel test's judgement of how its workload ended (tests/kernel/workload.py)."""
    import signal

    from tests.kernel.workload import workload_verdict as v
    ok = "swapload: 65536 pages\nswapload: OK: 65536 pages checked after 1 passes, 0 bad, 9.0s\n"
    partial = "swapload: 65536 pages\n"
    bad = partial + "swapload: MISMATCH page 17 (kind text, version 0)\n"
    kill = -signal.SIGKILL
    assert v(0, ok, killed_by_test=False) is None
    assert v(0, ok, killed_by_test=True) is None            # finished just as the time ran out
    assert v(kill, partial, killed_by_test=True) is None     # thrashing, ended by the test
    assert "OOM" in v(kill, partial, killed_by_test=False)   # a SIGKILL the test did not send
    assert "wrong page" in v(kill, bad, killed_by_test=True)
    assert "wrong page" in v(1, bad, killed_by_test=False)
    assert "SIGSEGV" in v(-signal.SIGSEGV, partial, killed_by_test=True)
    assert "exit status 1" in v(1, partial, killed_by_test=True)
    assert "exit status 2" in v(2, "usage", killed_by_test=False)
    assert "without 'swapload: OK'" in v(0, partial, killed_by_test=False)
    assert v(-40, partial, killed_by_test=False) == "the workload ended by signal 40"
