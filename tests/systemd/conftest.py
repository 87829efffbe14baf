"""Tests of what systemd does with ublkzswap's units: systemd must be PID 1 (tools/test boots
the test VM with ``--systemd`` for them), the kernel must have ublk, and the project must be
installed (tools/install-deps: the unit, the generator, /usr/local/sbin/ublkzswapd). They
write /etc/ublkzswap.conf and start and stop the system's units, so outside the test VM they
run only when UBLKZSWAP_SYSTEMD_TESTS=1 says this host may be used so. Missing any of this,
they skip with the reason -- or fail with it under UBLKZSWAP_REQUIRE_KERNEL=1 in the VM."""
from __future__ import annotations

import os

import pytest


def _missing() -> str | None:
    if not os.path.isdir("/run/systemd/system"):
        return "systemd is not PID 1 here (tools/test runs these in the VM booted with --systemd)"
    if not os.path.exists("/dev/ublk-control"):
        return "no /dev/ublk-control: this kernel has no ublk_drv loaded"
    for path in ("/usr/local/lib/systemd/system/ublkzswapd.service", "/usr/local/sbin/ublkzswapd",
                 "/usr/local/lib/systemd/system-generators/ublkzswap-generator"):
        if not os.path.exists(path):
            return f"{path} is not installed: run tools/install-deps"
    if os.environ.get("UBLKZSWAP_VM") != "1" and os.environ.get("UBLKZSWAP_SYSTEMD_TESTS") != "1":
        return ("these tests change /etc/ublkzswap.conf and the system's units: set "
                "UBLKZSWAP_SYSTEMD_TESTS=1 to run them on this host")
    return None


@pytest.fixture(scope="session", autouse=True)
def systemd_pid1():
    why = _missing()
    if why:
        if os.environ.get("UBLKZSWAP_REQUIRE_KERNEL") == "1" and os.environ.get("UBLKZSWAP_VM") == "1":
            pytest.fail(why)
        pytest.skip(why)
