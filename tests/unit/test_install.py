"""The install on a stock Debian 12 (tools/install-deps): what it puts where, and -- once it
has run, as tools/test makes sure (UBLKZSWAP_REQUIRE_INSTALL=1) -- that the installed
commands work on Debian's own Python."""

import os
import subprocess
import tomllib

import pytest

from ublkzswap import __version__

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBIN = "/usr/local/sbin"
PREFIX = "/opt/ublkzswap"


def script() -> str:
    with open(os.path.join(REPO, "tools", "install-deps")) as f:
        return f.read()


def test_install_deps_installs_every_part_explicitly():
    text = script()
    assert "/usr/bin/python3 -m venv" in text                  # Debian's Python, a venv
    for part in ("systemd/ublkzswapd.service", "systemd/modules-load.conf",
                 "etc/ublkzswap.conf.example", "ublkzswap.manpage --install",
                 "system-generators/ublkzswap-generator"):
        assert part in text, part
        if "/" in part and not part.startswith("system-"):
            assert os.path.exists(os.path.join(REPO, part.split()[0])), part
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    # setuptools' data-files are deprecated: nothing installed through them
    assert "data-files" not in project["tool"]["setuptools"]
    assert set(project["project"]["scripts"]) == {"ublkzswapd", "rzscontrol", "ublkzswap-generator"}


def _installed():
    if not os.access(os.path.join(SBIN, "ublkzswapd"), os.X_OK):
        if os.environ.get("UBLKZSWAP_REQUIRE_INSTALL") == "1":
            pytest.fail("ublkzswap is not installed: tools/install-deps failed?")
        pytest.skip("not installed (tools/install-deps)")


def test_the_installed_commands_run_on_debians_python(tmp_path):
    _installed()
    python = os.path.realpath(os.path.join(PREFIX, "bin", "python"))
    assert python.startswith("/usr/bin/python3"), python
    assert os.path.realpath(os.path.join(SBIN, "ublkzswapd")) == os.path.join(PREFIX, "bin", "ublkzswapd")
    for cmd, prog in (("ublkzswapd", "ublkzswapd"), ("rzscontrol", "rzscontrol")):
        r = subprocess.run([os.path.join(SBIN, cmd), "--version"], capture_output=True,
                           text=True, cwd="/", timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{prog} from ublkzswap {__version__}"
    r = subprocess.run([os.path.join(PREFIX, "bin", "python"), "-c",
                        "import lzo, lz4.block, numpy, ublkzswap.store; print(lzo.__file__)"],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(PREFIX), (r.stdout, r.stderr)
    for path in ("/usr/local/lib/systemd/system/ublkzswapd.service",
                 "/etc/modules-load.d/ublkzswap.conf",
                 "/usr/local/lib/systemd/system-generators/ublkzswap-generator",
                 "/usr/local/share/doc/ublkzswap/ublkzswap.conf.example",
                 "/usr/local/share/man/man8/ublkzswapd.8", "/usr/local/share/man/man1/rzscontrol.1"):
        assert os.path.exists(path), path
    # the installed generator writes the swap unit of a configured device
    conf = tmp_path / "ublkzswap.conf"
    conf.write_text("[ublkb0]\ndisksize = 64M\nswap-priority = 7\n")
    (tmp_path / "units").mkdir()             # systemd makes the directories
    r = subprocess.run([os.path.join(PREFIX, "bin", "ublkzswap-generator"), "--config",
                        str(conf), str(tmp_path / "units")], capture_output=True, text=True,
                       cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Priority=7" in (tmp_path / "units" / "dev-ublkb0.swap").read_text()
