"""manpage.py: the committed pages are current, complete, and render without warnings."""

import os
import shutil
import subprocess

import pytest

from ublkzswap import cli, manpage, stats as statsmod
from ublkzswap.params import PARAMETERS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def page(name):
    with open(os.path.join(REPO, "man", name), encoding="utf-8") as f:
        return f.read()


def test_committed_pages_are_current():
    assert manpage.stale(os.path.join(REPO, "man")) == [], \
        "a man page is stale: run python3 -m ublkzswap.manpage and commit man/"


def test_check_mode(capsys, tmp_path):
    assert manpage.main(["--check"]) == 0
    assert manpage.stale(str(tmp_path)) == list(manpage.PAGES)  # missing pages count as stale


def test_generation_is_reproducible():
    for fn in manpage.PAGES.values():
        assert fn() == fn()


def test_every_parser_option_is_in_rzscontrol_1():
    text = page("rzscontrol.1")
    for action in cli.build_parser()._actions:
        for s in action.option_strings:
            assert "\\fB" + manpage.esc(s) + "\\fR" in text, s
        if action.metavar:
            assert action.metavar in text


def test_every_counter_is_in_stats_section():
    text = page("rzscontrol.1")
    stats_sec = text.split(".SH STATS\n", 1)[1].split(".SH ", 1)[0]
    for c in statsmod.COUNTERS:
        assert manpage.esc(c.name) in stats_sec, c.name
        if c.label:
            assert "\\fB" + c.label + "\\fR" in stats_sec


def test_required_sections():
    text = page("rzscontrol.1")
    for sec in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "STATS", "EXAMPLES", "NOTES",
                "SEE ALSO"):
        assert f".SH {sec}\n" in text
    for ref in ("swapon (8)", "zramctl (8)", "ublkzswapd (8)"):
        assert ".BR " + ref in text
    assert "swapon \\-\\-discard /dev/ublkb0" in text
    assert "deadlock" in text


def test_every_list_column_is_in_the_columns_section():
    text = page("rzscontrol.1")
    cols = text.split(".SH COLUMNS\n", 1)[1].split(".SH ", 1)[0]
    for c in cli.COLUMNS:
        assert f".TP\n\\fB{manpage.esc(c.name)}\\fR\n" in cols, c.name
        assert manpage.esc(c.help[1:]) in cols
    assert manpage.esc(", ".join(c.name for c in cli.DEFAULT_COLUMNS)) in cols
    assert manpage.esc(cli.JSON_KEY) in text.split(".SH OPTIONS", 1)[1]


@pytest.mark.parametrize("name", list(manpage.PAGES))
def test_both_pages_say_to_disable_the_kernels_zswap(name):
    text = " ".join(page(name).split())
    assert manpage.esc("echo 0 > /sys/module/zswap/parameters/enabled") in text
    assert manpage.esc("zswap.enabled=0") in text
    assert "compress them again" in text        # why: double compression, and RAM competed for
    assert "compete" in text


def test_every_daemon_parameter_is_in_ublkzswapd_8():
    text = page("ublkzswapd.8")
    for p in PARAMETERS:
        assert manpage.esc(p.name) in text.split(".SH PARAMETERS", 1)[1], p.name


def test_install_writes_pages(tmp_path):
    paths = manpage.install(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in paths) == ["man1/rzscontrol.1",
                                                                    "man8/ublkzswapd.8"]


@pytest.mark.skipif(not shutil.which("groff"), reason="groff not installed")
@pytest.mark.parametrize("name", list(manpage.PAGES))
def test_renders_without_warnings(name):
    r = subprocess.run(["groff", "-man", "-ww", "-z", os.path.join(REPO, "man", name)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    r = subprocess.run(["groff", "-man", "-Tutf8", "-rLL=80n", os.path.join(REPO, "man", name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "rzscontrol" in r.stdout


def test_esc():
    assert manpage.esc(".foo\n'bar\nbaz-x a\\b") == "\\&.foo\n\\&'bar\nbaz\\-x a\\eb"
