"""The configuration file (ublkzswap.config), the words over it (params.configure), the
devices initialised from it at start (daemon.init_configured, on the fake ublk) and the swap
units made of it (ublkzswap.generator)."""
import os
import shutil
import subprocess
import sys

import pytest

from ublkzswap import compress, config, generator, params

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
                       "allocator = xvmalloc\nstandby = yes\n")
    assert c.daemon == {"num_devices": 4, "compressor": "deflate", "allocator": "xvmalloc",
                        "standby": True}
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


# ----------------------------------------------------------------------------- swap units
UNIT0 = """\
# Generated by ublkzswap-generator from the ublkzswap configuration; do not edit.

[Unit]
Description=Compressed swap on /dev/ublkb0 (ublkzswap)
Documentation=man:ublkzswapd(8)
Requires=ublkzswapd.service
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
