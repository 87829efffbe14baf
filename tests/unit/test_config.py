"""The configuration file (ublkzswap.config), the words over it (params.configure), the
devices initialised from it at start (daemon.init_configured, on the fake ublk) and the swap
units made of it (ublkzswap.generator)."""
import os

import pytest

from ublkzswap import compress, config, params

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
