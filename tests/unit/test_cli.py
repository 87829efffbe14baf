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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = "/dev/ublkb0"


@pytest.fixture
def env(monkeypatch):
    d = tempfile.mkdtemp(prefix="ublkzswap-cli-", dir="/tmp")
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


@pytest.mark.parametrize("value", ["12k", "-5", "0x10", "1e3", " 12", "", "١٢"])
def test_non_decimal_size_one_line(env, capsys, value):
    m, _ = env
    rc, out, err = run(capsys, DEV, "-d", value, "-i")
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("rzscontrol: ")
    assert ops(m) == []


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
    rc, out, err = run(capsys, "--list")
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
    rc, out, err = run(capsys, "--list", "--json")
    d = json.loads(out)
    assert [x["name"] for x in d["devices"]] == ["/dev/ublkb0", "/dev/ublkb1", "/dev/ublkb2"]
    assert d["devices"][0]["state"] == "active"

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
