"""cli.py (rzscontrol): parsing, fixed order, compcache messages and output, extras, via a real
ControlServer on a temp socket in front of the real Manager over fake ublk devices
(fakeublk.RecordingManager) with real stores: the numbers shown are those of pages written."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from ublkzswap import cli, compress, stats as statsmod
from ublkzswap.ctlserver import ControlServer

sys.path.insert(0, os.path.dirname(__file__))
from fakeublk import (PAGE, RAM, RecordingManager, backing_through_the_filesystem,  # noqa: E402
                      make_swapfile, medium_page, random_page, read_page, same_page, text_page,
                      write_pages)

SWAPS_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = "/dev/ublkb0"


@pytest.fixture
def env(monkeypatch):
    d = tempfile.mkdtemp(prefix="ublkzswap-cli-", dir="/tmp")
    monkeypatch.setattr(cli, "SWAPS", os.path.join(d, "no-swaps"))   # never the host's
    m = RecordingManager(3)
    path = os.path.join(d, "control.sock")
    srv = ControlServer(m, path).start()
    monkeypatch.setenv("UBLKZSWAP_SOCKET", path)
    yield m, path
    srv.close()
    m.teardown()
    shutil.rmtree(d, ignore_errors=True)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def ops(m):
    return [c[0] for c in m.calls if c[0] not in ("devices", "info")]


def clen(*pages):
    """Compressed size of pages, as the store compresses them (lzo, the devices' compressor)."""
    return sum(len(compress.get("lzo").compress(p)) for p in pages)


@pytest.fixture
def swapfile(tmp_path, monkeypatch):
    """A 4 MiB backing swap file the Manager opens through the filesystem."""
    backing_through_the_filesystem(monkeypatch)
    return make_swapfile(tmp_path / "swap", 1024)


# ---------------------------------------------------------------- compcache compatibility

@pytest.mark.parametrize("argv", [[], [DEV], ["/dev/sda"], ["--init"]])
def test_fewer_than_two_args_print_usage_exit_0(capsys, argv):
    assert run(capsys, *argv) == (0, cli.USAGE, "")


def test_usage_text_is_compcaches_translated():
    assert cli.USAGE == ("Usage: rzscontrol {<ublkzswap device>} [<options>]\n"
                         "Example: rzscontrol /dev/ublkb0 --init\n"
                         "See rzscontrol manpage for details.\n")


def test_fixed_order_whatever_the_order_given(env, capsys, swapfile):
    m, _ = env
    rc, out, err = run(capsys, DEV, "-s", "-r", "-i", "-d", "10240", "-m", "2048", "-b", swapfile)
    # reset runs before stats, so stats finds the device uninitialised, as in compcache
    assert (rc, out, err) == (1, "", "stats: Inappropriate ioctl for device\n")
    assert ops(m) == ["set_backing_swap", "set_memlimit_kb", "set_disksize_kb", "init", "reset", "stats"]
    assert m.calls[0] == ("set_backing_swap", 0, swapfile)
    assert ("set_memlimit_kb", 0, 2048) in m.calls and ("set_disksize_kb", 0, 10240) in m.calls


def test_first_failure_stops_with_compcache_message(env, capsys):
    m, _ = env
    assert run(capsys, DEV, "-d", "10240", "-i")[0] == 0
    m.calls.clear()
    rc, out, err = run(capsys, DEV, "--init", "--stats")
    assert (rc, out, err) == (1, "", "init: Device or resource busy\n")
    assert ops(m) == ["init"]  # stats never sent
    rc, out, err = run(capsys, DEV, "-d", "4", "-s")
    assert (rc, err) == (1, "disksize_kb: Device or resource busy\n")
    rc, out, err = run(capsys, DEV, "-b", "/dev/sda2")
    assert (rc, err) == (1, "backing_swap: Device or resource busy\n")


def test_stats_before_init_is_enotty(env, capsys):
    assert run(capsys, "/dev/ublkb1", "-s") == (1, "", "stats: Inappropriate ioctl for device\n")


def test_reset_while_swapon_is_ebusy_and_noop_when_uninitialised(env, capsys):
    m, _ = env
    assert run(capsys, "/dev/ublkb2", "-r") == (0, "", "")  # uninitialised: no-op, success
    run(capsys, "/dev/ublkb2", "-i")
    m.swapon(2)
    assert run(capsys, "/dev/ublkb2", "-r") == (1, "", "reset: Device or resource busy\n")
    m.swapoff(2)
    assert run(capsys, "/dev/ublkb2", "-r") == (0, "", "")
    assert m.info(2)["state"] == "uninitialised"


def test_unknown_device_number(env, capsys):
    assert run(capsys, "/dev/ublkb7", "-s") == (1, "", "stats: No such device\n")


def test_a_path_longer_than_path_max_is_a_usage_error(env, capsys):
    code, out, err = run(capsys, DEV, "--backing_swap=" + "a" * 70000)
    assert code == 2 and out == "" and err.count("\n") == 1 and "too long" in err
    m, _ = env
    assert m.info(0)["state"] == "uninitialised"


@pytest.mark.parametrize("args", [["--list"], [DEV, "--stats"], [DEV, "--init"]])
def test_a_closed_stdout_is_one_line_and_what_needs_no_output_still_works(env, args):
    m, path = env
    p = subprocess.run([sys.executable, "-m", "ublkzswap.cli", *args], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, cwd=REPO,
                       env=dict(os.environ, UBLKZSWAP_SOCKET=path),
                       preexec_fn=lambda: os.close(1))
    if "--init" in args:
        assert p.returncode == 0 and p.stderr == "" and m.info(0)["state"] != "uninitialised"
    else:
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "Traceback" not in p.stderr
        assert "write error: Bad file descriptor" in p.stderr or "stats:" in p.stderr


def test_version_with_and_without_a_device(env, capsys):
    from ublkzswap import __version__
    assert run(capsys, "--version") == (0, f"rzscontrol from ublkzswap {__version__}\n", "")
    code, out, _ = run(capsys, DEV, "-V", "-i")
    assert code == 0 and out == f"rzscontrol from ublkzswap {__version__}\n"


@pytest.mark.parametrize("number", ["1048576", "9" * 5000])
def test_device_number_beyond_ublk_is_a_usage_error(env, capsys, number):
    code, out, err = run(capsys, "/dev/ublkb" + number, "-s")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "not a ublkzswap device" in err and "1048575" in err and len(err) < 200


def test_memlimit_on_initialised_device_is_forwarded(env, capsys):
    m, _ = env
    run(capsys, DEV, "-i")
    assert run(capsys, DEV, "-m", "4096")[0] == 0
    assert m.info(0)["mem_limit"] == 4096 << 10 and m.store(0).memlimit == 4096 << 10


@pytest.mark.parametrize("opt,name", [("-m", "memlimit_kb"), ("-d", "disksize_kb"),
                                      ("--disksize_kb", "disksize_kb")])
def test_size_over_10_digits_is_eoverflow(env, capsys, opt, name):
    m, _ = env
    rc, out, err = run(capsys, DEV, opt, "12345678901", "-i")
    assert (rc, out, err) == (2, "", f"{name}: Value too large for defined data type\n")
    assert ops(m) == []


@pytest.mark.parametrize("value", ["12q", "-5", "0x10", "1e3", " 12", "", "١٢", "M", "1.5G"])
def test_non_decimal_size_one_line(env, capsys, value):
    m, _ = env
    rc, out, err = run(capsys, DEV, "-d", value, "-i")
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("rzscontrol: ")
    assert ops(m) == []


@pytest.mark.parametrize("value, kb", [("12k", 12), ("12K", 12), ("512M", 512 << 10),
                                       ("1g", 1 << 20), ("2T", 2 << 30), ("4096", 4096)])
def test_sizes_take_zramctl_suffixes(env, capsys, value, kb):
    m, _ = env
    assert run(capsys, DEV, "-d", value)[0] == 0
    assert m.info(0)["disksize"] == kb << 10


def test_ten_digit_size_accepted(env, capsys):
    m, _ = env
    assert run(capsys, DEV, "--disksize_kb=9999999999")[0] == 0
    assert m.info(0)["disksize"] == 9999999999 << 10


@pytest.mark.parametrize("argv", [["/dev/sda", "-s"], ["/dev/ublkb", "-s"], ["/dev/ublkb01", "-s"],
                                  ["ublkb0", "-s"], ["/dev/ublkb0p1", "-s"]])
def test_bad_device_path(env, capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "/dev/ublkbN" in err


def test_device_must_come_first(env, capsys):
    rc, out, err = run(capsys, "-s", DEV)
    assert rc == 2 and "first argument" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [[DEV, "--bogus"], [DEV, "-x"], [DEV, "-s", "extra"], [DEV, "-d"]])
def test_bad_options_one_line(env, capsys, argv):
    m, _ = env
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert ops(m) == []


def test_long_option_abbreviation_like_getopt(env, capsys):
    m, _ = env
    assert run(capsys, DEV, "--disk=1024", "--ini")[0] == 0
    assert ops(m) == ["set_disksize_kb", "init"]


def test_verbose(env, capsys):
    rc, out, err = run(capsys, "/dev/ublkb1", "-v", "-m", "100", "-d", "200", "-i")
    assert (rc, err) == (0, "")
    assert out == "device: /dev/ublkb1\nmemlimit_kb: 100\ndisksize_kb: 200\n"


def test_help_prints_and_carries_on(env, capsys):
    run(capsys, DEV, "-i")
    rc, out, err = run(capsys, DEV, "-h", "-s")
    assert rc == 0 and out.startswith("usage: rzscontrol DEVICE [options]")
    assert out.endswith(statsmod.render_text(env[0].stats(0)))
    rc, out, err = run(capsys, "--help")
    assert rc == 0 and "--backing_swap" in out and "MemUsedTotal" in out


def test_unreachable_daemon_one_line(capsys, monkeypatch):
    monkeypatch.setenv("UBLKZSWAP_SOCKET", "/nonexistent-dir/control.sock")
    rc, out, err = run(capsys, DEV, "-s")
    assert (rc, out) == (1, "")
    assert err == ("rzscontrol: cannot reach ublkzswapd at /nonexistent-dir/control.sock: "
                   "No such file or directory\n")
    rc, out, err = run(capsys, DEV, "-s", "--socket", "/tmp/nothing-here.sock")
    assert err.startswith("rzscontrol: cannot reach ublkzswapd at /tmp/nothing-here.sock: ")


# ---------------------------------------------------------------- output

def mixed_pages():
    """Pages of every kind, 67 in all."""
    text = [text_page(i) for i in range(40)]         # compress to ~100 bytes: good
    medium = [medium_page() for _ in range(5)]       # compress to > 2048 bytes: stored, not good
    huge = [random_page() for _ in range(10)]        # incompressible
    zero = [same_page(0)] * 8                        # ZeroPages, no memory
    same = [same_page(0x5A5A + i) for i in range(4)]  # same-filled: stored (and good), no memory
    return text, medium, huge, zero, same


def test_stats_golden_text(env, capsys):
    m, _ = env
    run(capsys, DEV, "-d", "10240", "-i")
    base = m.stats(0)                    # what init left behind (it wrote the swap header)
    text, medium, huge, zero, same = mixed_pages()
    write_pages(m.store(0), 1, text + medium + huge + zero + same)
    # stored: text, medium, huge, same = 59; good: text, same = 44; kept raw: huge = 10
    writes, stored = base["num_writes"] + 67, base["pages_stored"] + 59
    good, raw = base["good_compress"] + 44, base["huge_pages"] + 10
    compr = base["compr_data_size"] + clen(*text, *medium) + 10 * PAGE
    st = m.stats(0)
    assert (st["compr_data_size"], st["pages_stored"]) == (compr, stored)
    total = st["mem_used_total"]
    assert total % PAGE == 0 and total >= compr
    assert run(capsys, DEV, "-s") == (0, (
        "DiskSize:\t   10240 kB\n"
        "NumReads:\t       0\n"
        f"NumWrites:\t{writes:8}\n"
        "FailedReads:\t       0\n"
        "FailedWrites:\t       0\n"
        "InvalidIO:\t       0\n"
        "NotifyFree:\t       0\n"
        f"ZeroPages:\t{base['zero_pages'] + 8:8}\n"
        f"GoodCompress:\t{good * 100 // stored:8} %\n"
        f"NoCompress:\t{raw * 100 // stored:8} %\n"
        f"PagesStored:\t{stored:8}\n"
        f"PagesUsed:\t{total >> 12:8}\n"
        f"OrigDataSize:\t{(base['orig_data_size'] >> 10) + 59 * 4:8} kB\n"
        f"ComprDataSize:\t{compr >> 10:8} kB\n"
        f"MemUsedTotal:\t{total >> 10:8} kB\n"
    ), "")


def test_stats_golden_text_with_backing_swap(env, capsys, swapfile):
    m, _ = env
    run(capsys, DEV, "-b", swapfile, "-m", "1024", "-i")
    s = m.store(0)
    base = m.stats(0)
    text, medium, huge, zero, same = mixed_pages()
    write_pages(s, 1, text + medium + huge + zero + same)
    # with a backing swap, what compresses to more than 2048 bytes goes there: medium and huge
    # (15 written there, not stored); three of them read back come from it, a text and a zero
    # page from RAM. Stored: text, same = 44, all good.
    for i in range(3):
        assert read_page(s, 1 + 40 + 5 + i) == huge[i]
    assert read_page(s, 1) == text[0] and read_page(s, 1 + 55) == zero[0]
    stored, good = base["pages_stored"] + 44, base["good_compress"] + 44
    compr = base["compr_data_size"] + clen(*text)
    st = m.stats(0)
    assert (st["compr_data_size"], st["pages_stored"]) == (compr, stored)
    total = st["mem_used_total"]
    assert total % PAGE == 0 and total >= compr
    rc, out, err = run(capsys, DEV, "--stats")
    assert (rc, err) == (0, "")
    assert out == (
        f"BackingSwap:\t{swapfile}\n"
        "DiskSize:\t    4096 kB\n"
        "MemLimit:\t    1024 kB\n"
        f"NumReads:\t{base['num_reads'] + 2:8}\n"
        f"NumWrites:\t{base['num_writes'] + 67:8}\n"
        "FailedReads:\t       0\n"
        "FailedWrites:\t       0\n"
        "InvalidIO:\t       0\n"
        "NotifyFree:\t       0\n"
        f"ZeroPages:\t{base['zero_pages'] + 8:8}\n"
        f"GoodCompress:\t{good * 100 // stored:8} %\n"
        f"NoCompress:\t{base['huge_pages'] * 100 // stored:8} %\n"
        f"PagesStored:\t{stored:8}\n"
        f"PagesUsed:\t{total >> 12:8}\n"
        f"OrigDataSize:\t{(base['orig_data_size'] >> 10) + 44 * 4:8} kB\n"
        f"ComprDataSize:\t{compr >> 10:8} kB\n"
        f"MemUsedTotal:\t{total >> 10:8} kB\n"
        f"BDevNumReads:\t{base['bd_reads'] + 3:8}\n"
        f"BDevNumWrites:\t{base['bd_writes'] + 15:8}\n"
    )


def test_stats_json(env, capsys):
    m, _ = env
    run(capsys, DEV, "-i")
    before = m.stats(0)
    write_pages(m.store(0), 1, [text_page(i) for i in range(10)])
    rc, out, err = run(capsys, DEV, "--json")  # device + --json alone implies --stats
    d = json.loads(out)
    assert rc == 0 and d["pages_stored"] == before["pages_stored"] + 10
    assert d["orig_data_size"] == before["orig_data_size"] + 40960 == d["pages_stored"] * PAGE
    assert set(statsmod.RAW_NAMES) <= set(d) and "pages_used" in d
    st = m.stats(0)
    assert {k: d[k] for k in statsmod.RAW_NAMES} == {k: st[k] for k in statsmod.RAW_NAMES}
    rc, out2, err = run(capsys, DEV, "-s", "-j")
    assert json.loads(out2) == d


def test_list_table(env, capsys):
    m, _ = env
    run(capsys, DEV, "-d", "8192", "-i")
    base = m.info(0)                     # what init left behind (it wrote the swap header)
    text, huge = [text_page(i) for i in range(900)], [random_page() for _ in range(300)]
    write_pages(m.store(0), 1, text + huge)
    m.swapon(0)
    run(capsys, "/dev/ublkb2", "-d", "1024")
    info = m.info(0)
    data = base["orig_data_size"] + 1200 * PAGE
    compr = base["compr_data_size"] + clen(*text) + 300 * PAGE
    assert (info["orig_data_size"], info["compr_data_size"]) == (data, compr)
    total = info["mem_used_total"]
    assert total % PAGE == 0 and total >= compr
    # 4.7M, 1.xM, 1.xM: as wide as their column titles at most
    hdata, hcompr, htotal = cli.human_size(data), cli.human_size(compr), cli.human_size(total)
    rc, out, err = run(capsys, "--list")        # the initialised devices only, as zramctl
    assert (rc, err) == (0, "")
    assert out == (
        "NAME        DISKSIZE DATA COMPR TOTAL MEM-LIMIT ALGORITHM STATE\n"
        f"/dev/ublkb0       8M {hdata:>4} {hcompr:>5} {htotal:>5}        0B lzo       active\n"
    )
    rc, out, err = run(capsys, "--list", "--all")
    assert (rc, err) == (0, "")
    assert out == (
        "NAME        DISKSIZE DATA COMPR TOTAL MEM-LIMIT ALGORITHM STATE\n"
        f"/dev/ublkb0       8M {hdata:>4} {hcompr:>5} {htotal:>5}        0B lzo       active\n"
        "/dev/ublkb1       0B    -     -     -        0B lzo       uninitialised\n"
        "/dev/ublkb2       1M    -     -     -        0B lzo       uninitialised\n"
    )
    rc, out, err = run(capsys, "-l", "--bytes")
    assert out.splitlines()[1].split() == ["/dev/ublkb0", str(8 << 20), str(data), str(compr),
                                           str(total), "0", "lzo", "active"]
    rc, out, err = run(capsys, "--list", "--json", "--all")
    d = json.loads(out)
    assert list(d) == ["ublkbdevices"]
    assert [x["name"] for x in d["ublkbdevices"]] == ["/dev/ublkb0", "/dev/ublkb1", "/dev/ublkb2"]
    assert d["ublkbdevices"][0]["state"] == "active" and d["ublkbdevices"][0]["data"] == data
    assert d["ublkbdevices"][1]["data"] is None and d["ublkbdevices"][2]["disksize"] == 1 << 20


# ---------------------------------------------------------------- the device table (zramctl's)

def _fill_and_compact(m, dev):
    """Pages of every kind on ``dev``, half of them discarded and compacted: every counter
    of the table non-zero, MEM-USED (the peak) above TOTAL."""
    s = m.store(dev)
    write_pages(s, 1, [medium_page() for _ in range(600)] + [same_page(0)] * 3
                + [same_page(0x77)] * 2)
    for i in range(1, 601, 2):
        s.discard(i * PAGE, PAGE)
    assert m.compact(dev) > 0


@pytest.fixture
def table(env, capsys, swapfile, monkeypatch, tmp_path):
    """Device 0 initialised, filled, compacted and swapped on (in a fake /proc/swaps); device 1
    initialised with a backing swap; device 2 reserved only."""
    m, _ = env
    run(capsys, DEV, "-d", "8192", "-i")
    _fill_and_compact(m, 0)
    m.swapon(0)
    run(capsys, "/dev/ublkb1", "-b", swapfile, "-m", "1024", "-i")
    swaps = tmp_path / "swaps"
    swaps.write_text(SWAPS_HEADER + "/dev/ublkb0                             partition\t8188"
                     "\t\t0\t\t-2\n/dev/ublkb10                            partition\t4092"
                     "\t\t0\t\t-3\n")
    monkeypatch.setattr(cli, "SWAPS", str(swaps))
    return m, swapfile


def test_every_column_renders(table, capsys):
    m, swapfile = table
    rc, out, err = run(capsys, "--output-all", "--bytes", "--all")
    assert (rc, err) == (0, "")
    lines = [ln.split() for ln in out.splitlines()]
    assert lines[0] == [c.name for c in cli.COLUMNS]
    i0, i1 = m.info(0), m.info(1)
    assert i0["same_pages"] == 5 and i0["mem_used_max"] > i0["mem_used_total"] and i0["pages_compacted"] > 0
    assert lines[1] == ["/dev/ublkb0", str(8 << 20), str(i0["orig_data_size"]),
                        str(i0["compr_data_size"]), "lzo", "1", "5", str(i0["mem_used_total"]),
                        "0", str(i0["mem_used_max"]), str(i0["pages_compacted"]),
                        f"{i0['orig_data_size'] / i0['mem_used_total']:.2f}", "[SWAP]",
                        "active", "-"]
    assert i1["disksize"] == 4 << 20 and i1["mem_used_total"] == 0   # nothing stored yet
    assert lines[2] == ["/dev/ublkb1", str(4 << 20), "0", "0", "lzo", "1", "0", "0",
                        str(1024 << 10), "0", "0", "-", "-", "initialised", swapfile]
    assert lines[3] == ["/dev/ublkb2", "0", "-", "-", "lzo", "1", "-", "-", "0", "-", "-", "-",
                        "-", "uninitialised", "-"]
    # without --bytes the sizes are zramctl's K/M/G
    rc, out, err = run(capsys, "-o", "name,mem-used,total")
    assert out.splitlines()[1].split() == ["/dev/ublkb0", cli.human_size(i0["mem_used_max"]),
                                           cli.human_size(i0["mem_used_total"])]


def test_plus_appends_to_the_default_and_names_are_case_insensitive(table, capsys):
    rc, out, err = run(capsys, "-o", "+Comp-Ratio,MOUNTPOINT")
    assert (rc, err) == (0, "")
    default = [c.name for c in cli.DEFAULT_COLUMNS]
    assert default == ["NAME", "DISKSIZE", "DATA", "COMPR", "TOTAL", "MEM-LIMIT", "ALGORITHM",
                       "STATE"]
    assert out.splitlines()[0].split() == default + ["COMP-RATIO", "MOUNTPOINT"]
    rc, out, err = run(capsys, "--output", "state,name")
    assert [ln.split() for ln in out.splitlines()] == [
        ["STATE", "NAME"], ["active", "/dev/ublkb0"], ["initialised", "/dev/ublkb1"]]


def test_noheadings_and_raw(table, capsys):
    rc, out, err = run(capsys, "-n", "-o", "name,state,mountpoint")
    assert (rc, err) == (0, "")
    assert out == ("/dev/ublkb0 active      [SWAP]\n"
                   "/dev/ublkb1 initialised -\n")
    rc, out, err = run(capsys, "--raw", "-o", "name,state,mountpoint,backing")
    assert (rc, err) == (0, "")
    assert out == ("NAME STATE MOUNTPOINT BACKING\n"
                   "/dev/ublkb0 active [SWAP] -\n"
                   f"/dev/ublkb1 initialised - {table[1]}\n")
    rc, out, err = run(capsys, "--raw", "-n", "--all", "-o", "name,disksize")
    assert out == "/dev/ublkb0 8M\n/dev/ublkb1 4M\n/dev/ublkb2 0B\n"


def test_raw_escapes_whitespace_and_backslashes_as_libsmartcols_does(env, capsys, tmp_path,
                                                                     monkeypatch):
    backing_through_the_filesystem(monkeypatch)
    path = make_swapfile(tmp_path / "my swap\\file", 1024)
    run(capsys, DEV, "-b", path, "-i")
    rc, out, err = run(capsys, "--raw", "-n", "-o", "backing")
    assert out == path.replace("\\", "\\x5c").replace(" ", "\\x20") + "\n"
    assert cli._raw_cell("a\tb\u00e9\x01") == "a\\x09b\u00e9\\x01"


def test_json_keys_are_the_lower_case_column_names(table, capsys):
    m, swapfile = table
    rc, out, err = run(capsys, "--json")
    assert (rc, err) == (0, "")
    d = json.loads(out)["ublkbdevices"]
    assert [list(x) for x in d] == [[c.name.lower() for c in cli.DEFAULT_COLUMNS]] * 2
    rc, out, err = run(capsys, "--json", "--output-all", "--all")
    d = json.loads(out)["ublkbdevices"]
    assert list(d[0]) == ["name", "disksize", "data", "compr", "algorithm", "streams",
                          "zero-pages", "total", "mem-limit", "mem-used", "migrated",
                          "comp-ratio", "mountpoint", "state", "backing"]
    i0 = m.info(0)
    assert d[0]["mem-used"] == i0["mem_used_max"] and d[0]["migrated"] == i0["pages_compacted"]
    assert d[0]["comp-ratio"] == round(i0["orig_data_size"] / i0["mem_used_total"], 2)
    assert (d[0]["mountpoint"], d[0]["backing"], d[0]["zero-pages"]) == ("[SWAP]", None, 5)
    assert (d[1]["mountpoint"], d[1]["backing"]) == (None, swapfile)
    assert d[2]["data"] is None and d[2]["streams"] == 1 and d[2]["state"] == "uninitialised"


def test_mountpoint_comes_from_proc_swaps_by_exact_name(env, capsys, tmp_path, monkeypatch):
    m, _ = env
    for dev in (0, 1):
        m.set_disksize_kb(dev, 1024)
        m.init(dev)
    swaps = tmp_path / "swaps"
    monkeypatch.setattr(cli, "SWAPS", str(swaps))
    rc, out, err = run(capsys, "-n", "-o", "name,mountpoint")       # no /proc/swaps: no swap
    assert (rc, out) == (0, "/dev/ublkb0 -\n/dev/ublkb1 -\n")
    swaps.write_text(SWAPS_HEADER + "/dev/ublkb10  partition  1020  0  -2\n"
                     "/dev/ublkb1  partition  1020  0  -3\n")
    rc, out, err = run(capsys, "-n", "-o", "name,mountpoint")
    assert (rc, out) == (0, "/dev/ublkb0 -\n/dev/ublkb1 [SWAP]\n")
    assert cli.swap_devices(str(swaps)) == {"/dev/ublkb10", "/dev/ublkb1"}


def test_a_device_argument_lists_just_that_device_in_any_state(env, capsys):
    m, _ = env
    run(capsys, DEV, "-i")
    rc, out, err = run(capsys, "/dev/ublkb2", "-o", "name,state")
    assert (rc, out, err) == (0, "NAME        STATE\n/dev/ublkb2 uninitialised\n", "")
    rc, out, err = run(capsys, "/dev/ublkb1", "-d", "2048", "-i", "-n", "-o", "name,disksize")
    assert (rc, out, err) == (0, "/dev/ublkb1 2M\n", "")          # the requests, then its row
    rc, out, err = run(capsys, DEV, "--bytes")                      # --bytes alone: its row
    assert rc == 0 and out.splitlines()[1].split()[:2] == [DEV, str(m.info(0)["disksize"])]
    assert run(capsys, "/dev/ublkb7", "--list") == (1, "", "list: No such device\n")


@pytest.mark.parametrize("argv", [["-n"], ["--raw"], ["--bytes"], ["--all"], ["-o", "name"],
                                  ["--output-all"]])
def test_table_options_imply_list(env, capsys, argv):
    m, _ = env
    run(capsys, DEV, "-d", "1024", "-i")
    rc, out, err = run(capsys, *argv)
    assert (rc, err) == (0, "") and "/dev/ublkb0" in out
    assert ("/dev/ublkb1" in out) == (argv == ["--all"])


def test_no_initialised_device_prints_nothing_or_an_empty_json_list(env, capsys):
    assert run(capsys, "--list") == (0, "", "")
    rc, out, err = run(capsys, "--list", "--json")
    assert (rc, json.loads(out)) == (0, {"ublkbdevices": []})


@pytest.mark.parametrize("spec,bad", [("name,bogus", "bogus"), ("+SIZE", "SIZE"), ("", ""),
                                      ("name,,state", "")])
def test_an_unknown_column_is_a_one_line_usage_error(env, capsys, spec, bad):
    m, _ = env
    rc, out, err = run(capsys, "--list", "-o", spec)
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert err.startswith(f"rzscontrol: unknown column {bad!r} (columns: NAME,DISKSIZE,")
    assert all(c.name in err for c in cli.COLUMNS)
    assert m.calls == []                                   # the daemon was never asked


def test_output_and_output_all_exclude_each_other(env, capsys):
    rc, out, err = run(capsys, "-o", "name", "--output-all")
    assert (rc, out) == (2, "") and "--output-all" in err and err.count("\n") == 1


def test_every_column_is_in_help(capsys):
    rc, out, err = run(capsys, "--help")
    text = " ".join(out.split())
    for c in cli.COLUMNS:
        assert f"{c.name} {' '.join(c.help.split())}" in text
    assert "default: " + " ".join(c.name for c in cli.DEFAULT_COLUMNS) in text

@pytest.mark.parametrize("n,text", [(0, "0B"), (1023, "1023B"), (1024, "1K"), (1536, "1.5K"),
                                    (256 << 20, "256M"), (int(1.25 * (1 << 30)), "1.2G"),
                                    (1 << 40, "1T")])
def test_human_size(n, text):
    assert cli.human_size(n) == text


def test_shim_runs_from_checkout(env):
    m, path = env
    r = subprocess.run([os.path.join(REPO, "tools", "rzscontrol"), "/dev/ublkb1", "-i", "-s"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, UBLKZSWAP_SOCKET=path))
    assert r.returncode == 0, r.stderr
    quarter = (25 * (RAM // 100)) & ~(PAGE - 1)        # no size given: 25% of RAM, page-aligned
    assert m.stats(1)["disksize"] == quarter
    assert r.stdout.startswith(f"DiskSize:\t{quarter >> 10:8} kB\n")
    r = subprocess.run([sys.executable, "-m", "ublkzswap.cli", "/dev/ublkb1", "-i"], cwd=REPO,
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, UBLKZSWAP_SOCKET=path))
    assert (r.returncode, r.stderr) == (1, "init: Device or resource busy\n")


def test_every_parser_option_documented_in_help():
    text = cli.build_parser().format_help()
    for a in cli.build_parser()._actions:
        for s in a.option_strings:
            assert s in text


from hypothesis import given, settings, strategies as st  # noqa: E402

_words = st.sampled_from(["-b", "-m", "-d", "-i", "-r", "-s", "-v", "-h", "-l", "-j", "--json",
                          "--list", "--bytes", "--init", "--stats", "--disksize_kb=5", "--mem",
                          "-o", "+name", "name,STATE", "--output-all", "-n", "--raw", "--all",
                          "/dev/ublkb0", "/dev/ublkb12", "/dev/sda", "12", "99999999999", "x",
                          "--", "-", "--socket", "=", ""])


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(st.one_of(_words, st.text(max_size=12)), max_size=6))
def test_fuzz_argv_never_crashes(argv):
    old = os.environ.get("UBLKZSWAP_SOCKET")
    os.environ["UBLKZSWAP_SOCKET"] = "/nonexistent-ublkzswap/control.sock"
    try:
        rc = cli.main(argv)
    finally:
        if old is None:
            os.environ.pop("UBLKZSWAP_SOCKET", None)
        else:
            os.environ["UBLKZSWAP_SOCKET"] = old
    assert rc in (0, 1, 2)


# ---------------------------------------------------------------- driven by the op table

def test_request_order_is_the_op_tables():
    from ublkzswap import control
    _, _, requests = cli.plan([DEV, "-s", "--compact", "-r", "-i", "-d", "1", "-m", "2", "-b", "/x"])
    table = [op.option for op in control.OPS.values() if op.option]
    assert [name for name, _, _ in requests] == table
    assert table == ["backing_swap", "memlimit_kb", "disksize_kb", "init", "reset", "compact",
                     "stats"]
    assert [op for _, op, _ in requests] == [op.name for op in cli.REQUESTS]
    assert ", ".join(table) in " ".join(cli.build_parser().description.split())


def test_every_request_option_is_a_parser_option():
    dests = {a.dest: a.option_strings for a in cli.build_parser()._actions}
    for op in cli.REQUESTS:
        assert "--" + op.option in dests[op.option]


def test_socket_help_uses_control_constants():
    from ublkzswap import control
    text = " ".join(cli.build_parser().format_help().split())
    assert f"${control.ENV_SOCKET} or {control.DEFAULT_PATH}" in text


def test_cli_does_not_load_the_daemon_or_its_memory_machinery():
    code = "import json, sys, ublkzswap.cli; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout)
    assert "ublkzswap.cli" in loaded
    for mod in ("ublkzswap.memory", "ublkzswap.daemon", "ublkzswap.ctlserver"):
        assert mod not in loaded


def test_compact_through_the_cli(env, capsys):
    m, _ = env
    m.set_disksize_kb(0, 4096)
    m.init(0)
    rc, out, err = run(capsys, DEV, "--compact", "-v")
    assert rc == 0 and "compact: 0 pages given back" in out, (out, err)
    assert ("compact", 0) in m.calls
    rc, out, err = run(capsys, "/dev/ublkb1", "--compact")
    assert rc == 1 and err.strip() == "compact: Inappropriate ioctl for device"


# ---------------------------------------------------------------- the bad-input corpus

BAD_INPUTS = [
    ["/dev/ublkb" + "9" * 5000, "-s"],                 # past ublk's last id
    [DEV, "--backing_swap=" + "a" * 70000],            # longer than PATH_MAX
    [DEV, "--disksize_kb=-1"],
    [DEV, "--disksize_kb=12345678901"],                # 11 digits: EOVERFLOW, as compcache
    [DEV, "--memlimit_kb=1e9"],
    [DEV, "--disksize_kb=" + "\udcff"],                # undecodable argument bytes
    ["/dev/ublkb0\udcff", "-s"],
    ["/dev/sda", "--init"],
    [DEV, "--frobnicate"],
    [DEV, "-s", "-o", "NAME"],                         # columns without --list
    ["--list", "-o", "NAME,NOPE"],
    ["--list", "-o", ""],
    ["--list", "--output-all", "-o", "NAME"],
    [DEV, "--stats", "--socket"],
    ["-s", DEV],
]


@pytest.mark.parametrize("argv", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_corpus_one_line_no_traceback(argv, tmp_path):
    """The real command (a process of its own): a non-zero exit and one line, never a
    traceback, whether or not a daemon is there."""
    env = dict(os.environ, UBLKZSWAP_SOCKET=str(tmp_path / "nobody.sock"))
    r = subprocess.run([sys.executable, "-m", "ublkzswap.cli", *argv], capture_output=True,
                       env=env, timeout=60)
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0, (argv[:3], r.stdout, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert len(err) > 20, err                      # says something (compcache's words or ours)
