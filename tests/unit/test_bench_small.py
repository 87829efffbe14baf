"""bench_small's profile report: py-spy's raw stacks split per thread by the innermost frame
of ours."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.bench_small import SPY_RATE, spy_report  # noqa: E402


def test_spy_report_splits_each_thread_by_its_innermost_frame_of_ours(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.write_text(
        "thread (7): ublkq0:0;run (ublkzswap/queue.py:258);"
        "submit_and_wait (ublkzswap/uring.py:191) 30\n"
        "thread (7): ublkq0:0;run (ublkzswap/queue.py:258);_write_pages (ublkzswap/store.py:863);"
        "compress (lzo.py:1) 10\n"
        f"thread (8): arena-keeper;wait (threading.py:331) {4 * SPY_RATE}\n")
    spy_report(str(raw))
    out = capsys.readouterr().out.splitlines()
    assert out[0].strip() == "thread (8): arena-keeper: 4 s sampled"     # the most sampled first
    assert out[1].split() == ["100.0%", "wait", "(threading.py:331)"]
    assert out[2].strip() == "thread (7): ublkq0:0: 1 s sampled"
    assert out[3].split()[:2] == ["75.0%", "submit_and_wait"]
    assert out[4].split()[:2] == ["25.0%", "_write_pages"]        # not lzo's own frame
