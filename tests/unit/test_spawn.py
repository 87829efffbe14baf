"""libc.spawn: posix_spawn through ctypes (how a server starts its standby)."""
import errno
import os
import sys

import pytest

from ublkzswap.libc import spawn


def test_spawn_runs_the_program_with_exactly_the_given_environment(tmp_path):
    out = tmp_path / "env"
    pid = spawn(sys.executable, [sys.executable, "-c",
                                 f"import os; open({str(out)!r}, 'w').write(repr(sorted(os.environ)))"
                                 "; raise SystemExit(7)"],
                {"UBLKZSWAP_X": "1", "PATH": "/usr/bin:/bin"})
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
    assert "'UBLKZSWAP_X'" in out.read_text() and "'HOME'" not in out.read_text()


def test_spawn_of_a_missing_program_is_an_oserror():
    with pytest.raises(OSError) as e:
        spawn("/nonexistent/ublkzswapd", ["ublkzswapd"], {})
    assert e.value.errno == errno.ENOENT
