"""ublkzswapd's parameters and the pieces of the lifecycle that need no kernel."""
import os
import struct
import subprocess
import sys

import pytest

from ublkzswap import backing, params


def test_compcache_words_and_dashed_form():
    cfg = params.parse_params(["num_devices=4", "--disksize_kb=20480", "target=ram", "--foreground"])
    assert cfg["num_devices"] == 4 and cfg["disksize_kb"] == 20480
    assert cfg["target"] == "ram" and cfg["foreground"] is True


def test_defaults():
    cfg = params.parse_params([])
    assert cfg["num_devices"] == 1 and cfg["target"] == "compressed" and "disksize_kb" not in cfg
    assert cfg["standby"] is False          # a warm standby is asked for: it costs a second image
    assert cfg["queues"] == 1               # until the VM shows more queues pay for their memory


def test_queues_word_and_its_clamp_to_the_cpus():
    assert params.parse_params(["queues=4"])["queues"] == 4
    assert params.parse_params(["--queues=2"])["queues"] == 2
    assert params.queue_count({"queues": 4}, cpus=2) == 2      # a queue no CPU maps to idles
    assert params.queue_count({"queues": 2}, cpus=8) == 2
    assert params.queue_count({"queues": 3}, cpus=1) == 1
    assert params.queue_count({}, cpus=4) == 1
    assert params.MAX_QUEUES == 8


def test_target_zswap_is_a_deprecated_alias_of_compressed():
    assert params.parse_params(["target=zswap"])["target"] == "compressed"
    assert params.parse_params(["--target=compressed"])["target"] == "compressed"
    target = next(p for p in params.PARAMETERS if p.name == "target")
    assert "target=zswap is a deprecated alias" in target.help
    assert "zswap" not in params.TARGETS and "zswap" not in target.metavar


def test_version(capsys):
    from ublkzswap import __version__, daemon
    assert daemon.main(["--version"]) == 0
    assert capsys.readouterr().out == f"ublkzswapd from ublkzswap {__version__}\n"


def test_standby_is_a_flag():
    assert params.parse_params(["standby"])["standby"] is True
    assert params.parse_params(["--standby"])["standby"] is True
    with pytest.raises(params.UsageError):
        params.parse_params(["standby=1"])


@pytest.mark.parametrize("words,needle", [
    (["bogus=1"], "unknown parameter 'bogus'"),
    (["disksize_kb=12x"], "not a decimal number"),
    (["disksize_kb=-5"], "not a decimal number"),
    (["num_devices=0"], "must be 1..32"),
    (["num_devices=33"], "must be 1..32"),
    (["queues=0"], "queues=0: must be 1..8"),
    (["queues=9"], "queues=9: must be 1..8"),
    (["queues=two"], "not a decimal number"),
    (["target=disk"], "must be compressed, ram or null"),
    (["num_devices"], "is not key=value"),
    (["disksize_kb=1"], "smaller than one page"),
])
def test_bad_input_is_refused(words, needle):
    with pytest.raises(params.UsageError) as e:
        params.parse_params(words)
    assert needle in str(e.value)


def test_memlimit_alone_needs_a_device_zero():
    # checked once the configuration file is known: it may configure [ublkb0]
    with pytest.raises(params.UsageError) as e:
        params.configure(params.parse_params(["memlimit_kb=100", "config=none"]))
    assert "valid only when backing_swap" in str(e.value)


@pytest.mark.parametrize("words", [["bogus=1"], ["num_devices=0"], ["num_devices=33"],
                                   ["disksize_kb=abc"]])
def test_cli_bad_input_one_line_nonzero_exit(words):
    p = subprocess.run([sys.executable, "-m", "ublkzswap.daemon", *words],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ublkzswapd: ")
    assert p.stdout == ""


def test_no_ublk_in_kernel_is_one_line(tmp_path):
    import os
    if os.path.exists("/dev/ublk-control"):
        pytest.skip("this kernel has ublk; the refusal can't be observed here")
    if os.geteuid() != 0:
        pytest.skip("needs root to get past the root check")
    p = subprocess.run([sys.executable, "-m", "ublkzswap.daemon", "--foreground"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "ublkzswapd: this kernel has no ublk driver (/dev/ublk-control missing; modprobe ublk_drv)"]


def test_not_root_is_one_line():
    p = subprocess.run([sys.executable, "-c",
                        "import os, sys; from ublkzswap import daemon; "
                        "os.setgid(65534); os.setuid(65534); "
                        "sys.exit(daemon.main(['num_devices=1']))"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip() == "ublkzswapd: must run as root (ublk devices and memory locking need it)"


def test_swap_header_layout():
    h = backing.swap_header(64 << 20)
    assert len(h) == 4096 and h[-10:] == b"SWAPSPACE2"
    version, last_page, nr_bad = struct.unpack_from("<III", h, 1024)
    assert (version, last_page, nr_bad) == (1, (64 << 20) // 4096 - 1, 0)
    assert h[:1024] == bytes(1024)


def test_parameters_table_drives_help():
    p = subprocess.run([sys.executable, "-m", "ublkzswap.daemon", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for param in params.PARAMETERS:
        assert param.name in p.stdout


def test_allocator_words_are_the_stores():
    from ublkzswap import store
    assert params.ALLOCATORS == tuple(store.ALLOCATORS)
    assert params.parse_params(["allocator=xvmalloc"])["allocator"] == "xvmalloc"
    with pytest.raises(params.UsageError):
        params.parse_params(["allocator=slab"])


def test_slot_free_is_on_by_default_and_takes_on_or_off():
    assert params.parse_params([])["slot_free"] == "on"
    assert params.parse_params(["slot_free=off"])["slot_free"] == "off"
    assert params.parse_params(["slot_free=on"])["slot_free"] == "on"
    with pytest.raises(params.UsageError, match="slot_free=maybe: must be on or off"):
        params.parse_params(["slot_free=maybe"])


def test_the_daemon_cannot_run_without_its_control_socket_module():
    """No silent fallback: if the control server does not import, the daemon does not start."""
    code = ("import sys; sys.modules['ublkzswap.ctlserver'] = None\n"
            "try:\n    import ublkzswap.daemon\nexcept ImportError:\n    print('refused')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "refused", p.stderr


SAY = ("import sys; from ublkzswap import daemon\n"
       "if sys.argv[1] == 'kmsg': sys.stderr = daemon._KmsgLines()\n"
       "daemon.say('not stopping: in use', daemon.WARNING)\n"
       "daemon._StderrHandler().emit(__import__('logging').makeLogRecord("
       "{'msg': 'bad thing', 'levelno': 40, 'levelname': 'ERROR'}))\n"
       "print('Traceback line', file=sys.stderr)\n")


@pytest.mark.parametrize("where", ["terminal", "journald", "kmsg"])
def test_log_lines_carry_their_level_where_a_reader_takes_it(tmp_path, where):
    # stderr a plain file standing for: a terminal, journald's stream (JOURNAL_STREAM names
    # it), /dev/kmsg (a background daemon's fd 2)
    path = tmp_path / "err"
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if where == "journald":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        p = subprocess.run([sys.executable, "-c", SAY, where], stderr=f, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                               os.path.abspath(__file__)))))
    assert p.returncode == 0
    lines = path.read_text().splitlines()
    if where == "terminal":
        assert lines[:2] == ["ublkzswapd: not stopping: in use", "ublkzswapd: bad thing"]
    elif where == "journald":
        assert lines[:2] == ["<4>not stopping: in use", "<3>bad thing"]
    else:
        pid = p.args and lines[0].split("[", 1)[1].split("]", 1)[0]
        assert lines == [f"<4>ublkzswapd[{pid}]: not stopping: in use",
                         f"<3>ublkzswapd[{pid}]: bad thing",
                         f"<3>ublkzswapd[{pid}]: Traceback line"]


def test_the_daemons_interpreter_runs_without_site_and_docstrings_and_finds_its_modules():
    # what the re-exec runs (daemon_argv, daemon_env): every module the server imports found
    # through PYTHONPATH alone, no site (nor what its .pth files import), docstrings dropped
    from ublkzswap import daemon
    argv = daemon.daemon_argv(["--version"])
    assert argv[:3] == [sys.executable, "-S", "-OO"] and argv[3:5] == ["-m", "ublkzswap.daemon"]
    probe = ("import sys, lzo, lz4.block, numpy; "
             "import ublkzswap.daemon, ublkzswap.store, ublkzswap.ctlserver, ublkzswap.devices; "
             "print(sys.flags.no_site, sys.flags.optimize, 'site' in sys.modules, "
             "ublkzswap.store.__doc__ is None)")
    p = subprocess.run([sys.executable, *daemon.DAEMON_FLAGS, "-c", probe], capture_output=True,
                       text=True, timeout=120, env=daemon.daemon_env(), cwd="/")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["1", "2", "False", "True"]
    env = daemon.daemon_env(EXTRA="1")
    assert env["PYTHONMALLOC"] == "malloc" and env["EXTRA"] == "1"
