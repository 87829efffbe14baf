"""The configuration file (ublkzswap.config), the words over it (params.configure), the
devices initialised from it at start (daemon.init_configured, on the fake ublk) and the swap
units made of it (ublkzswap.generator)."""
import os
import shutil
import subprocess
import sys

import pytest

from ublkzswap import compress, config, generator, params

from fakeublk import RecordingManager

RAM = 8 << 30
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def conf_file(tmp_path, text, name="ublkzswap.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def read(tmp_path, text, ram=RAM):
    return config.read(conf_file(tmp_path, text), required=True, ram=ram)


# ----------------------------------------------------------------------------- good files
@pytest.mark.parametrize("value,kb", [
    ("20480", 20480), ("64K", 64), ("64k", 64), ("512M", 512 << 10), ("1G", 1 << 20),
    ("2g", 2 << 20), ("1T", 1 << 30), ("25%", (RAM // 100 * 25) >> 10),
    ("150%", (RAM // 100 * 150) >> 10), ("8 M", 8 << 10),
])
def test_sizes_in_every_form(tmp_path, value, kb):
    c = read(tmp_path, f"[ublkb0]\ndisksize = {value}\nmemlimit = {value}\n")
    assert c.devices[0].disksize_kb == kb and c.devices[0].memlimit_kb == kb


def test_percent_is_of_the_ram_given(tmp_path):
    c = read(tmp_path, "[ublkb0]\ndisksize=50%\n", ram=1 << 30)
    assert c.devices[0].disksize_kb == (1 << 30) // 100 * 50 // 1024


def test_defaults_comments_blank_lines_and_spacing(tmp_path):
    c = read(tmp_path, "# a comment\n; another\n\n   [ublkb3]   \n\tdisksize\t=\t1G   \n"
                       "  ; indented comment\n[ublkb1]\n")
    assert sorted(c.devices) == [1, 3]
    d = c.devices[1]
    assert (d.disksize_kb, d.memlimit_kb, d.backing_swap, d.compressor, d.swap_priority,
            d.options) == (0, 0, "", "", 100, "discard")
    assert c.devices[3].disksize_kb == 1 << 20 and c.devices[3].bdev == "/dev/ublkb3"
    assert c.devices[3].where.endswith("ublkzswap.conf:4") and c.daemon == {}


def test_every_device_key(tmp_path):
    c = read(tmp_path, "[ublkb0]\nbacking-swap = /dev/sda2\nmemlimit = 10M\n"
                       "compression-algorithm = lz4\nswap-priority = -1\n"
                       "options = discard=pages,nofail\n")
    d = c.devices[0]
    assert (d.backing_swap, d.memlimit_kb, d.compressor, d.swap_priority, d.options) == \
        ("/dev/sda2", 10240, "lz4", -1, "discard=pages,nofail")


def test_daemon_section(tmp_path):
    c = read(tmp_path, "[ublkzswapd]\nnum-devices = 4\ncompression-algorithm = deflate\n"
                       "allocator = xvmalloc\nstandby = yes\nqueues = 2\n")
    assert c.daemon == {"num_devices": 4, "compressor": "deflate", "allocator": "xvmalloc",
                        "standby": True, "queues": 2}
    assert c.devices == {}


def test_drop_ins_in_file_name_order_later_wins(tmp_path):
    main = conf_file(tmp_path, "[ublkb0]\ndisksize = 1G\nswap-priority = 10\n"
                               "compression-algorithm = lz4\n[ublkb1]\ndisksize = 64M\n")
    d = tmp_path / "ublkzswap.conf.d"
    d.mkdir()
    (d / "20-late.conf").write_text("[ublkb0]\nswap-priority = 30\n")
    (d / "10-early.conf").write_text("[ublkb0]\nswap-priority = 20\noptions =\n"
                                     "compression-algorithm =\n[ublkb2]\n")
    (d / "30-ignored.conf.bak").write_text("garbage")
    (d / ".hidden.conf").write_text("garbage")
    (d / "40-size.conf").write_text("[ublkb1]\nbacking-swap = /swapfile\n")
    c = config.read(main, ram=RAM)
    assert c.files == (main, str(d / "10-early.conf"), str(d / "20-late.conf"),
                       str(d / "40-size.conf"))
    assert c.devices[0].swap_priority == 30 and c.devices[0].disksize_kb == 1 << 20
    assert c.devices[0].options == "" and c.devices[0].compressor == ""   # emptied: none, default
    assert sorted(c.devices) == [0, 1, 2]
    # a later file's backing swap replaces an earlier file's disksize
    assert (c.devices[1].disksize_kb, c.devices[1].backing_swap) == (0, "/swapfile")
    assert c.where[("ublkb0", "swap-priority")] == f"{d / '20-late.conf'}:2"


def test_drop_ins_without_the_main_file_and_no_file_at_all(tmp_path):
    path = str(tmp_path / "ublkzswap.conf")
    assert config.read(path) == config.Config()
    os.mkdir(path + ".d")
    conf_file(tmp_path, "[ublkb5]\n", "ublkzswap.conf.d/a.conf")
    assert list(config.read(path, ram=RAM).devices) == [5]


def test_text_and_write_round_trip(tmp_path):
    path = str(tmp_path / "x.conf")
    c = config.write(path, {1: {"disksize": "64M", "compression-algorithm": "lz4"},
                            0: {"disksize": "32M", "swap-priority": 7}},
                     daemon={"num-devices": 3}, ram=RAM)
    assert open(path).read().startswith("[ublkzswapd]\nnum-devices = 3\n\n[ublkb0]\n")
    assert c.daemon == {"num_devices": 3}
    assert (c.devices[0].disksize_kb, c.devices[0].swap_priority) == (32 << 10, 7)
    assert (c.devices[1].disksize_kb, c.devices[1].compressor) == (64 << 10, "lz4")
    with pytest.raises(config.ConfigError, match=r"x\.conf:2: unknown key 'size'"):
        config.write(path, {0: {"size": "1G"}})


def test_constants_agree_with_params():
    from ublkzswap import store
    assert config.ALLOCATORS == params.ALLOCATORS == tuple(store.ALLOCATORS)
    assert config.MAX_DEVICES == params.MAX_NUM_DEVICES
    assert config.DEFAULT_PATH == "/etc/ublkzswap.conf"


# ----------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("text,line,needle", [
    ("[ublkb0]\nsize = 1G\n", 2, "unknown key 'size' in [ublkb0]"),
    ("[ublkzswapd]\ndisksize = 1G\n", 2, "unknown key 'disksize' in [ublkzswapd]"),
    ("[ublkb0]\ndisksize = 1.5G\n", 2, "disksize: '1.5G' is not a size"),
    ("[ublkb0]\ndisksize = 1P\n", 2, "disksize: '1P' is not a size"),
    ("[ublkb0]\ndisksize = 4K\n", 2, "smaller than two pages"),
    ("[ublkb0]\ndisksize = 0\n", 2, "smaller than two pages"),
    ("[ublkb0]\ndisksize = 99999999999999999999T\n", 2, "too large"),
    ("[ublkb0]\nmemlimit = -1\n", 2, "memlimit: '-1' is not a size"),
    ("[ublkb0]\ndisksize = 1G # comment\n", 2, "is not a size"),
    ("[ublkb0]\nbacking-swap = sda2\n", 2, "not an absolute path"),
    ("[ublkb0]\ncompression-algorithm = zstd\n", 2, "'zstd' is not one of lzo"),
    ("[ublkb0]\nswap-priority = 32768\n", 2, "not a swap priority (-1..32767)"),
    ("[ublkb0]\nswap-priority = -2\n", 2, "not a swap priority"),
    ("[ublkb0]\nswap-priority = high\n", 2, "not a swap priority"),
    ("[ublkb0]\noptions = discard,,nofail\n", 2, "comma-separated"),
    ("[ublkb0]\noptions = pri=5\n", 2, "swap-priority, not pri="),
    ("[ublkzswapd]\nnum-devices = 0\n", 2, "1..32"),
    ("[ublkzswapd]\nnum-devices = 33\n", 2, "1..32"),
    ("[ublkzswapd]\nallocator = slab\n", 2, "'slab' is not one of log, xvmalloc"),
    ("[ublkzswapd]\nstandby = maybe\n", 2, "'maybe' is not yes or no"),
    ("[ublkzswapd]\nqueues = 0\n", 2, "queues: '0' is not a number of queues (1..8)"),
    ("[ublkzswapd]\nqueues = 9\n", 2, "(1..8)"),
    ("[ublkb0]\n[ublkb1]\n\n[ublkb0]\n", 4, "[ublkb0] given twice in this file"),
    ("[ublkb0]\ndisksize = 1G\ndisksize = 2G\n", 3, "'disksize' given twice in [ublkb0]"),
    ("[ublkb0]\ndisksize = 1G\nbacking-swap = /dev/sda2\n", 3, "exclude each other"),
    ("[zram0]\n", 1, "unknown section [zram0]"),
    ("[ublkb01]\n", 1, "unknown section [ublkb01]"),
    ("[ublkb32]\n", 1, "device numbers are 0 to 31"),
    ("[ublkb0\n", 1, "is not a [section] line"),
    ("[ublkb0]\ndisksize 1G\n", 2, "'disksize 1G' is not key = value"),
    ("[ublkb0]\n= 1G\n", 2, "is not key = value"),
    ("\n\ndisksize = 1G\n", 3, "'disksize' is outside a section"),
    ("[ublkb0]\n# \xe9\ndisksize = \udcff\n", 3, "not UTF-8 text"),
])
def test_a_bad_file_is_one_line_with_its_place(tmp_path, text, line, needle):
    path = tmp_path / "ublkzswap.conf"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(config.ConfigError) as e:
        config.read(str(path), ram=RAM)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:{line}: ") and needle in msg, msg


def test_a_bad_drop_in_is_named(tmp_path):
    main = conf_file(tmp_path, "[ublkb0]\n")
    conf_file(tmp_path.joinpath("ublkzswap.conf.d").mkdir() or tmp_path,
              "[ublkb0]\n\nswap-priority = x\n", "ublkzswap.conf.d/50-x.conf")
    with pytest.raises(config.ConfigError,
                       match=r"^.*ublkzswap\.conf\.d/50-x\.conf:3: swap-priority: 'x'"):
        config.read(main, ram=RAM)


def test_unreadable_files(tmp_path):
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(config.ConfigError) as e:
        config.read(missing, required=True)
    assert str(e.value) == f"{missing}: cannot read: No such file or directory"
    main = conf_file(tmp_path, "[ublkb0]\n")
    os.makedirs(main + ".d/dir.conf")
    with pytest.raises(config.ConfigError) as e:
        config.read(main)
    assert str(e.value) == f"{main}.d/dir.conf: cannot read: Is a directory"


def test_the_example_file_is_valid():
    c = config.read(os.path.join(REPO, "etc", "ublkzswap.conf.example"), required=True,
                    ram=RAM)
    assert sorted(c.devices) == [0, 1] and c.daemon["num_devices"] == 4
    assert c.devices[0].compressor in compress.names() and c.devices[1].backing_swap


# ----------------------------------------------------------------------------- the words over it
def configure(tmp_path, text, *words):
    path = conf_file(tmp_path, text) if text is not None else "none"
    return params.configure(params.parse_params([f"config={path}", *words]), ram=RAM)


def test_num_devices_is_one_past_the_highest_configured(tmp_path):
    assert configure(tmp_path, "[ublkb0]\n[ublkb5]\n")["num_devices"] == 6
    assert configure(tmp_path, "")["num_devices"] == 1
    assert configure(tmp_path, "[ublkb2]\n", "num_devices=8")["num_devices"] == 8


def test_num_devices_too_small(tmp_path):
    with pytest.raises(params.UsageError, match=r"num_devices=2: too small for \[ublkb3\] "
                                                r"\(.*ublkzswap\.conf:2\)"):
        configure(tmp_path, "[ublkb0]\n[ublkb3]\n", "num_devices=2")
    with pytest.raises(config.ConfigError, match=r"ublkzswap\.conf:2: num-devices = 1 is too "
                                                 r"small for \[ublkb1\]"):
        configure(tmp_path, "[ublkzswapd]\nnum-devices = 1\n[ublkb1]\n")
    # the word wins over the file's number, then checked
    assert configure(tmp_path, "[ublkzswapd]\nnum-devices = 1\n[ublkb1]\n",
                     "num_devices=2")["num_devices"] == 2


def test_words_win_over_the_file(tmp_path):
    text = ("[ublkzswapd]\nnum-devices = 3\ncompression-algorithm = lz4\nallocator = xvmalloc\n"
            "[ublkb0]\ndisksize = 1G\nmemlimit = 1M\ncompression-algorithm = deflate\n"
            "swap-priority = 5\n")
    cfg = configure(tmp_path, text)
    assert (cfg["num_devices"], cfg["compressor"], cfg["allocator"]) == (3, "lz4", "xvmalloc")
    assert cfg["devices"][0].disksize_kb == 1 << 20
    cfg = configure(tmp_path, text, "compressor=lzo", "allocator=log", "disksize_kb=20480",
                    "standby")
    assert (cfg["compressor"], cfg["allocator"], cfg["standby"]) == ("lzo", "log", True)
    d = cfg["devices"][0]
    # key by key: what the words did not set stays the file's
    assert (d.disksize_kb, d.memlimit_kb, d.compressor, d.swap_priority) == \
        (20480, 1024, "deflate", 5)
    assert params.compressors(cfg) == ["lzo", "deflate"]
    assert configure(tmp_path, text, "memlimit_kb=77")["devices"][0].memlimit_kb == 77


def test_queues_from_the_file_unless_a_word_sets_them(tmp_path):
    assert configure(tmp_path, "")["queues"] == 1
    assert configure(tmp_path, "[ublkzswapd]\nqueues = 4\n")["queues"] == 4
    assert configure(tmp_path, "[ublkzswapd]\nqueues = 4\n", "queues=2")["queues"] == 2


def test_disksize_and_backing_swap_words_replace_each_other(tmp_path):
    cfg = configure(tmp_path, "[ublkb0]\nbacking-swap = /dev/sda2\n", "disksize_kb=20480")
    assert (cfg["devices"][0].disksize_kb, cfg["devices"][0].backing_swap) == (20480, "")
    cfg = configure(tmp_path, "[ublkb0]\ndisksize = 1G\n", "backing_swap=/dev/sdb1")
    assert (cfg["devices"][0].disksize_kb, cfg["devices"][0].backing_swap) == (0, "/dev/sdb1")


def test_words_alone_configure_device_zero(tmp_path):
    cfg = configure(tmp_path, None, "disksize_kb=20480", "memlimit_kb=100")
    assert list(cfg["devices"]) == [0] and cfg["devices"][0].where == "command line"
    assert (cfg["devices"][0].disksize_kb, cfg["devices"][0].memlimit_kb) == (20480, 100)
    with pytest.raises(params.UsageError, match="memlimit_kb parameter is valid only when"):
        configure(tmp_path, "[ublkb1]\n", "memlimit_kb=100")
    assert configure(tmp_path, None)["devices"] == {}


def test_which_file(tmp_path, monkeypatch):
    # the default file is read only if it exists; a named one must exist; none reads nothing
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "default.conf"))
    assert params.configure(params.parse_params([]))["devices"] == {}
    conf_file(tmp_path, "[ublkb1]\n", "default.conf")
    assert list(params.configure(params.parse_params([]), ram=RAM)["devices"]) == [1]
    assert params.configure(params.parse_params(["config=none"]))["devices"] == {}
    with pytest.raises(config.ConfigError, match="absent.conf: cannot read: No such file"):
        params.configure(params.parse_params([f"config={tmp_path / 'absent.conf'}"]))
    with pytest.raises(params.UsageError, match="config: empty value"):
        params.parse_params(["config="])


def test_the_daemon_refuses_a_bad_file_with_one_line_and_status_2(tmp_path, capsys):
    from ublkzswap import daemon
    bad = conf_file(tmp_path, "[ublkb0]\ndisksize = lots\n")
    assert daemon.main([f"config={bad}", "--foreground"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == \
        f"ublkzswapd: {bad}:2: disksize: 'lots' is not a size (kB, or a number with K, M, G, " \
        "T or %)\n"
    assert daemon.main([f"config={tmp_path}/absent.conf"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert daemon.main(["num_devices=1", f"config={conf_file(tmp_path, '[ublkb4]')}"]) == 2
    assert "num_devices=1: too small for [ublkb4]" in capsys.readouterr().err


def test_the_file_is_checked_before_the_root_check():
    p = subprocess.run([sys.executable, "-c",
                        "import os, sys; from ublkzswap import daemon; "
                        "os.setgid(65534); os.setuid(65534); "
                        "sys.exit(daemon.main(['config=/nonexistent/ublkzswap.conf']))"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2
    assert p.stderr == ("ublkzswapd: /nonexistent/ublkzswap.conf: cannot read: No such file "
                        "or directory\n")


# ----------------------------------------------------------------------------- at start
def start_config(tmp_path, text, *words):
    return configure(tmp_path, text, *words)["devices"]


@pytest.fixture
def m():
    mgr = RecordingManager(4)
    yield mgr
    mgr.teardown()


def test_every_configured_device_is_initialised_with_its_settings(tmp_path, m):
    from ublkzswap.daemon import init_configured
    devs = start_config(tmp_path, "[ublkb0]\ndisksize = 1M\n[ublkb2]\ndisksize = 2M\n"
                                  "memlimit = 512K\ncompression-algorithm = lz4\n")
    assert init_configured(m, devs) == [0, 2]
    assert [m.info(i)["state"] for i in range(4)] == \
        ["initialised", "uninitialised", "initialised", "uninitialised"]
    assert (m.stats(0)["disksize"], m.stats(2)["disksize"]) == (1 << 20, 2 << 20)
    assert m.stats(2)["mem_limit"] == 512 << 10
    assert m.store(0).comp.name == "lzo" and m.store(2).comp.name == "lz4"
    assert ("set_disksize_kb", 2, 2048) in m.calls and ("init", 2) in m.calls


def test_a_device_already_initialised_is_left_as_it_is(tmp_path, m):
    from ublkzswap.daemon import init_configured
    m.set_disksize_kb(0, 4096)
    m.init(0)
    devs = start_config(tmp_path, "[ublkb0]\ndisksize = 1M\n[ublkb1]\ndisksize = 1M\n")
    assert init_configured(m, devs) == [1]
    assert m.stats(0)["disksize"] == 4096 << 10


def test_a_failed_init_resets_what_this_start_initialised(tmp_path, m):
    from ublkzswap.daemon import init_configured
    devs = start_config(tmp_path, "[ublkb0]\ndisksize = 1M\n[ublkb1]\ndisksize = 1M\n"
                                  "[ublkb3]\nbacking-swap = /nonexistent/swap\n")
    with pytest.raises(OSError) as e:
        init_configured(m, devs)
    msg = str(e.value.strerror)
    assert msg.startswith("cannot initialise /dev/ublkb3 (") and "ublkzswap.conf:5)" in msg
    assert "No such file or directory" in msg and "\n" not in msg
    assert [m.info(i)["state"] for i in range(4)] == ["uninitialised"] * 4
    assert ("reset", 0) in m.calls and ("reset", 1) in m.calls


def test_the_device_init_refusal_is_named(tmp_path, m):
    from ublkzswap.daemon import init_configured
    m.ublks[1].fail_start = OSError(5, "Input/output error")
    devs = start_config(tmp_path, "[ublkb0]\ndisksize = 1M\n[ublkb1]\ndisksize = 1M\n")
    with pytest.raises(OSError, match=r"cannot initialise /dev/ublkb1 \(.*\): Input/output"):
        init_configured(m, devs)
    assert m.info(0)["state"] == "uninitialised"


def test_set_compressor():
    import errno
    mgr = RecordingManager(1)
    try:
        with pytest.raises(OSError) as e:
            mgr.set_compressor(0, "zstd")
        assert e.value.errno == errno.EINVAL
        mgr.set_compressor(0, "deflate")
        assert mgr.info(0)["algorithm"] == "deflate"      # what --list shows, before init
        mgr.set_disksize_kb(0, 1024)
        mgr.init(0)
        assert mgr.store(0).comp.name == "deflate"
        assert mgr.info(0)["algorithm"] == "deflate"      # and after: the store's own
        with pytest.raises(OSError) as e:
            mgr.set_compressor(0, "lzo")
        assert e.value.errno == errno.EBUSY
    finally:
        mgr.teardown()


# ----------------------------------------------------------------------------- swap units
UNIT0 = """\
# Generated by ublkzswap-generator from the ublkzswap configuration; do not edit.

[Unit]
Description=Compressed swap on /dev/ublkb0 (ublkzswap)
Documentation=man:ublkzswapd(8)
Wants=ublkzswapd.service
After=ublkzswapd.service

[Swap]
What=/dev/ublkb0
Priority=100
Options=discard
"""

GEN_CONF = ("[ublkb0]\ndisksize = 64M\n[ublkb2]\nswap-priority = 5\n"
            "options = discard=pages,nofail\n[ublkb3]\nswap-priority = -1\noptions =\n")


def test_units_and_links(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    c = read(tmp_path, GEN_CONF)
    assert generator.generate(str(out), c) == [str(out / f"dev-ublkb{i}.swap") for i in (0, 2, 3)]
    assert (out / "dev-ublkb0.swap").read_text() == UNIT0
    u2 = (out / "dev-ublkb2.swap").read_text()
    assert "What=/dev/ublkb2\nPriority=5\nOptions=discard=pages,nofail\n" in u2
    u3 = (out / "dev-ublkb3.swap").read_text()
    assert u3.endswith("What=/dev/ublkb3\n")            # the kernel's priority, no options
    for i in (0, 2, 3):
        link = out / "swap.target.wants" / f"dev-ublkb{i}.swap"
        assert os.readlink(link) == f"../dev-ublkb{i}.swap" and link.resolve().is_file()
    generator.generate(str(out), c)                     # again (daemon-reload): same result
    assert sorted(os.listdir(out)) == ["dev-ublkb0.swap", "dev-ublkb2.swap", "dev-ublkb3.swap",
                                       "swap.target.wants"]


def test_swapon_argv_as_the_unit(tmp_path):
    c = read(tmp_path, GEN_CONF + "[ublkb4]\noptions = discard\n")
    assert generator.swapon_argv(c.devices[0]) == ["swapon", "-p", "100", "--discard",
                                                   "/dev/ublkb0"]
    assert generator.swapon_argv(c.devices[2]) == ["swapon", "-p", "5", "--discard=pages",
                                                   "-o", "nofail", "/dev/ublkb2"]
    assert generator.swapon_argv(c.devices[3]) == ["swapon", "/dev/ublkb3"]


def test_generator_command(tmp_path):
    path = conf_file(tmp_path, GEN_CONF)
    out = tmp_path / "normal"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "ublkzswap.generator", "--config", path, str(out),
                        str(tmp_path / "early"), str(tmp_path / "late")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (p.returncode, p.stderr) == (0, "")
    assert (out / "dev-ublkb0.swap").read_text() == UNIT0
    bad = conf_file(tmp_path, "[ublkb0]\nbogus = 1\n", "bad.conf")
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "ublkzswap.generator", f"--config={bad}",
                        str(empty)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 1 and os.listdir(empty) == []
    assert p.stderr.startswith(f"ublkzswap-generator: {bad}:2: unknown key 'bogus'")
    assert p.stderr.count("\n") == 1
    assert generator.main([]) == 2 and generator.main(["a", "b"]) == 2


STUB_SERVICE = """\
[Unit]
Description=stand-in for ublkzswapd
DefaultDependencies=no

[Service]
ExecStart=/bin/true
"""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_the_units(tmp_path):
    """systemd-analyze verify loads each unit with its dependencies from the same directory
    (a stand-in ublkzswapd.service: started before swap.target, so no default dependencies):
    no warning at all, and a unit whose name does not match What= would fail."""
    out = tmp_path / "units"
    out.mkdir()
    (out / "ublkzswapd.service").write_text(STUB_SERVICE)
    generator.generate(str(out), read(tmp_path, GEN_CONF))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{out}:", SYSTEMD_LOG_COLOR="0")
    for name in ("dev-ublkb0.swap", "dev-ublkb2.swap", "dev-ublkb3.swap"):
        p = subprocess.run(["systemd-analyze", "verify", str(out / name)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stdout + p.stderr) == (0, ""), name
    broken = out / "dev-ublkb9.swap"
    broken.write_text(UNIT0)
    p = subprocess.run(["systemd-analyze", "verify", str(broken)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "What= and unit name do not match" in p.stderr
