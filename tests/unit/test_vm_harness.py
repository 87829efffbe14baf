"""The test VM harness without booting: CLI parsing, guest scripts, cache stamp, image pieces,
and the kernel tests' side of its contract (scratch disk, cleanup policy in tests/kernel)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel import conftest as kconftest
from tests.kernel import daemonctl, scratch
from tools.vm import __main__ as cli
from tools.vm import guest, image, run

ROOT = Path(__file__).resolve().parents[2]


# --- CLI ---------------------------------------------------------------------------------------

def test_run_parses_options_and_command_after_double_dash():
    ns = cli.parse(["run", "--timeout", "60", "--mem", "256", "--smp", "1", "--disk", "64",
                    "--", "python3", "-c", "print(1)", "--mem", "9"])
    assert (ns.cmd, ns.timeout, ns.mem, ns.smp, ns.disk) == ("run", 60.0, 256, 1, 64)
    assert ns.argv == ["python3", "-c", "print(1)", "--mem", "9"]


def test_run_defaults():
    ns = cli.parse(["run", "--", "true"])
    assert (ns.mem, ns.smp, ns.disk, ns.results, ns.verbose) == (2048, 2, 0, None, False)
    assert ns.timeout > 0


@pytest.mark.parametrize("args", [["run"], ["run", "--"], ["run", "--mem", "64", "--", "true"],
                                  ["run", "--smp", "0", "--", "true"], ["run", "--timeout", "0", "--", "true"],
                                  []])
def test_run_rejects_bad_command_lines(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(args)
    assert e.value.code == 2


def test_build_and_selftest_parse():
    assert cli.parse(["build", "--force"]).force
    ns = cli.parse(["selftest", "--mem", "512"])
    assert ns.cmd == "selftest" and ns.mem == 512


# --- guest environment and job script ----------------------------------------------------------

def test_guest_env_passes_caller_env_and_puts_real_python_first():
    host = {"PATH": "/root/.pyenv/shims:/usr/bin:/opt/py/bin", "PYTHONPATH": "/work/main", "HOME": "/root",
            "UBLKZSWAP_X": "a b 'c'", "PWD": "/x", "OLDPWD": "/y", "SHLVL": "2", "_": "/usr/bin/env",
            "BASH_FUNC_f%%": "() { :; }", "weird-name": "1"}
    env = guest.guest_env(host, "/opt/py/bin", {"UBLKZSWAP_VM": "1"})
    assert env["PATH"] == "/opt/py/bin:/root/.pyenv/shims:/usr/bin"
    assert env["PYTHONPATH"] == "/work/main" and env["HOME"] == "/root" and env["UBLKZSWAP_X"] == "a b 'c'"
    assert env["UBLKZSWAP_VM"] == "1"
    for dropped in ("PWD", "OLDPWD", "SHLVL", "_", "BASH_FUNC_f%%", "weird-name"):
        assert dropped not in env


def test_guest_env_without_path_gets_a_default():
    assert guest.guest_env({}, "/py/bin")["PATH"].startswith("/py/bin:/usr/local/sbin:")


def test_job_script_quotes_and_execs(tmp_path):
    env = {"A": "x y", "B": "it's $HOME `id`", "PATH": os.environ["PATH"]}
    argv = ["sh", "-c", 'printf "%s|%s|%s|%s\\n" "$A" "$B" "$(pwd)" "$1"; exit 7', "arg0", "two words"]
    script = guest.job_script(env, str(tmp_path), argv)
    assert script.splitlines()[-1].startswith("exec sh -c ")
    (tmp_path / "job.sh").write_text(script)
    r = subprocess.run(["env", "-i", "/bin/sh", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 7
    assert r.stdout == f"x y|it's $HOME `id`|{tmp_path}|two words\n"


def test_job_script_missing_cwd_exits_125(tmp_path):
    (tmp_path / "job.sh").write_text(guest.job_script({}, str(tmp_path / "nope"), ["true"]))
    r = subprocess.run(["env", "-i", "/bin/sh", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 125 and "no such directory in the guest" in r.stdout


def test_job_script_rejects_empty_command():
    with pytest.raises(ValueError):
        guest.job_script({}, "/", [])


# --- the scratch disk: named to the job exactly when one is attached ---------------------------

def _job_env(tmp_path, opts: run.RunOptions) -> dict[str, str]:
    """Run the job.sh that ``run`` would write for ``opts`` (its command replaced by ``env``)
    under ``env -i /bin/sh`` and return the environment the job sees."""
    img = image.Image(tmp_path / "vmlinuz", tmp_path / "initrd", "6.12.0-test", "pkg")
    opts.argv, opts.cwd = ["env"], str(tmp_path)
    (tmp_path / "job.sh").write_text(run.job_script(img, opts, tty=False))
    r = subprocess.run(["env", "-i", "/bin/sh", str(tmp_path / "job.sh")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("disk_mib", [0, 64])
def test_scratch_disk_variable_set_exactly_when_a_disk_is_attached(tmp_path, disk_mib):
    # the caller's own values of the harness's names never reach the guest: a host's scratch
    # disk is not the guest's
    host = {"PATH": "/usr/bin:/bin", guest.SCRATCH_DISK_ENV: "/dev/sdz", guest.VM_ENV: "0"}
    env = _job_env(tmp_path, run.RunOptions(argv=[], disk_mib=disk_mib, env=host))
    assert env[guest.VM_ENV] == "1" and env["UBLKZSWAP_VM_KERNEL"] == "6.12.0-test"
    if disk_mib:
        assert env[guest.SCRATCH_DISK_ENV] == "/dev/vda" == guest.SCRATCH_DISK
    else:
        assert guest.SCRATCH_DISK_ENV not in env
    img = image.Image(Path("/k"), Path("/i"), "6.12.0", "pkg")
    argv = run.qemu_argv(img, run.RunOptions(argv=["true"], disk_mib=disk_mib), tmp_path, tmp_path / "m",
                         tmp_path / "disk.raw" if disk_mib else None)
    assert argv.count("-drive") == (1 if disk_mib else 0)   # one virtio disk: the guest's vda


def test_guest_facts_names_the_disk_only_when_asked():
    assert guest.SCRATCH_DISK_ENV not in guest.guest_facts("k", scratch_disk=False)
    assert guest.guest_facts("k", scratch_disk=True)[guest.SCRATCH_DISK_ENV] == "/dev/vda"
    assert set(guest.guest_facts("k", scratch_disk=True)) <= guest.FACT_NAMES


def test_cli_run_disk_reaches_the_job(monkeypatch, tmp_path):
    """`tools/vm run --disk N` end to end, with the boot replaced by reading the job script."""
    img = image.Image(tmp_path / "vmlinuz", tmp_path / "initrd", "6.12.0", "pkg")
    monkeypatch.setattr(image, "ensure", lambda *a, **k: img)
    seen = []
    monkeypatch.setattr(run, "run", lambda img, opts: seen.append(run.job_script(img, opts, tty=False)) or 0)
    monkeypatch.delenv(guest.SCRATCH_DISK_ENV, raising=False)
    assert cli.main(["run", "--disk", "2048", "--", "true"]) == 0
    assert cli.main(["run", "--", "true"]) == 0
    assert f"export {guest.SCRATCH_DISK_ENV}=/dev/vda\n" in seen[0]
    assert guest.SCRATCH_DISK_ENV not in seen[1]


def test_tools_test_boots_the_vm_with_a_scratch_disk():
    """The kernel suite in the VM must get a scratch disk: tools/test passes --disk."""
    text = (ROOT / "tools" / "test").read_text()
    m = re.search(r"-m tools\.vm run (.*?) -- ", text)
    assert m, "tools/test no longer runs the VM the way this test expects"
    assert cli.parse(["run", *m.group(1).split(), "--", "true"]).disk > 0


def test_kernel_tests_name_no_disk_of_their_own():
    """Only $UBLKZSWAP_SCRATCH_DISK may be written to; a guessed /dev/vda is a native host's root disk."""
    literal = re.compile(r"""["'](/dev/(?:vd|sd|hd|xvd|nvme|mmcblk)|/sys/block/(?:vd|sd|hd|xvd|nvme))""")
    for path in sorted((ROOT / "tests" / "kernel").glob("*.py")):
        found = literal.findall(path.read_text())
        assert not found, f"{path.name} names a disk: {found}"


@pytest.mark.parametrize("env, verdict", [
    ({}, "skip"),
    ({"UBLKZSWAP_REQUIRE_KERNEL": "1"}, "skip"),                     # native host: only its owner can name a disk
    ({"UBLKZSWAP_VM": "1"}, "skip"),
    ({"UBLKZSWAP_VM": "1", "UBLKZSWAP_REQUIRE_KERNEL": "1"}, "fail"),  # tools/test in the VM: a harness bug
    ({"UBLKZSWAP_VM": "0", "UBLKZSWAP_REQUIRE_KERNEL": "1"}, "skip"),
    ({"UBLKZSWAP_SCRATCH_DISK": "/dev/vdb"}, "use"),
    ({"UBLKZSWAP_SCRATCH_DISK": "/dev/vdb", "UBLKZSWAP_VM": "1", "UBLKZSWAP_REQUIRE_KERNEL": "1"}, "use"),
])
def test_scratch_disk_decision(env, verdict):
    got, what = scratch.decide(env)
    assert got == verdict
    if verdict == "use":
        assert what == "/dev/vdb"
    else:
        assert guest.SCRATCH_DISK_ENV in what
    raises = {"skip": pytest.skip.Exception, "fail": pytest.fail.Exception}.get(verdict)
    if raises:
        with pytest.raises(raises):
            scratch.require(env)


def test_scratch_disk_must_be_an_unused_block_device(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    assert "not a block device" in scratch.unusable(str(f))
    assert scratch.unusable(str(tmp_path / "missing"))
    with pytest.raises(pytest.fail.Exception, match="nothing was written"):
        scratch.require({guest.SCRATCH_DISK_ENV: str(f)})
    assert f.read_bytes() == b"x"


def test_scratch_disk_refuses_the_disk_under_root():
    """The host's own root filesystem's device, named by mistake, is refused (in use; or, in a
    container, not even openable)."""
    if os.geteuid() != 0:
        pytest.skip("opening a block device needs root")
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4] == "/":
            majmin = f[2]
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{majmin}"))
    dev = f"/dev/{name}"
    if not os.path.exists(f"/sys/dev/block/{majmin}") or not os.path.exists(dev):
        pytest.skip(f"/ is not on a block device here ({majmin})")
    why = scratch.unusable(dev)
    assert why and why.startswith(dev)


# --- the kernel tests' cleanup: a daemon that ignores SIGTERM is a test error ------------------

IGNORES_TERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(120)")


@pytest.mark.parametrize("ignore_term", [True, False])
def test_kernel_cleanup_errors_on_a_daemon_that_needed_sigkill(monkeypatch, ignore_term):
    monkeypatch.setattr(kconftest, "TERM_GRACE", 0.5)
    monkeypatch.setattr(kconftest, "NODE_GRACE", 0.1)
    monkeypatch.setattr(kconftest, "_ublk_nodes", lambda: set())
    monkeypatch.setattr(kconftest, "_stray_daemons", lambda since: [])   # never touch others' processes
    teardown = kconftest.cleanup_ublk.__wrapped__()
    next(teardown)
    code = IGNORES_TERM if ignore_term else "print('ready', flush=True); import time; time.sleep(120)"
    proc = kconftest.register_daemon(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
    try:
        assert proc.stdout.readline() == "ready\n"
        if ignore_term:
            with pytest.raises(pytest.fail.Exception, match=rf"were killed: pid {proc.pid} "):
                next(teardown)
        else:
            with pytest.raises(StopIteration):
                next(teardown)
        assert not kconftest._alive(proc.pid)       # killed either way: the next test starts clean
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


# --- init script ------------------------------------------------------------------------------

def test_init_script_loads_modules_in_order_with_params():
    order = [("netfs", ""), ("9pnet", ""), ("9pnet_virtio", ""), ("9p", ""), ("ublk_drv", ""),
             ("lz4_compress", ""), ("lz4hc_compress", ""), ("zram", "num_devices=1"), ("virtio_blk", "")]
    text = guest.init_script(order)
    positions = [text.index(f"\nload {n}{' ' + p if p else ''}\n") for n, p in order]
    assert positions == sorted(positions)
    # modules load before the 9p root is mounted, and the job runs after everything is set up
    assert positions[-1] < text.index("mount -t 9p")
    for needle in ("zswap/parameters/enabled", "kernel/sysrq", "hung_task_timeout_secs", "/dev/fd",
                   "$R/tmp", "$R/run", "$R/var/tmp", "$R/dev/shm", "cache=loose,msize=512000",
                   "poweroff -f", guest.MARK_START, guest.MARK_EXIT):
        assert needle in text, needle
    assert text.index(guest.MARK_START) < text.index("chroot $R") < text.rindex("poweroff -f")


def test_boot_modules_cover_the_verified_order():
    names = [n for n, _ in guest.BOOT_MODULES]
    verified = ["netfs", "9pnet", "9pnet_virtio", "9p", "ublk_drv"]
    assert [n for n in names if n in verified] == verified
    assert names.index("lz4_compress") < names.index("zram") and names.index("lz4hc_compress") < names.index("zram")
    assert "num_devices=1" in dict(guest.BOOT_MODULES)["zram"]
    for word in ("panic=-1", "zswap.enabled=0", "console=ttyS0"):
        assert word in guest.KERNEL_CMDLINE


def test_init_script_is_valid_shell(tmp_path):
    sh = shutil.which("busybox") or "/bin/sh"
    p = tmp_path / "init"
    p.write_text(guest.init_script(list(guest.BOOT_MODULES)))
    args = [sh, "sh", "-n", str(p)] if sh.endswith("busybox") else [sh, "-n", str(p)]
    assert subprocess.run(args, timeout=30).returncode == 0


# --- image pieces ---------------------------------------------------------------------------

def test_resolve_order_puts_dependencies_first():
    deps = {"9p": ["netfs", "9pnet"], "9pnet": ["netfs"], "9pnet_virtio": ["9pnet"],
            "zram": ["lz4hc_compress", "lz4_compress"], "null_blk": ["configfs"]}
    order = image.resolve_order(["9p", "9pnet_virtio", "zram"], deps)
    assert order == ["netfs", "9pnet", "9p", "9pnet_virtio", "lz4hc_compress", "lz4_compress", "zram"]
    with pytest.raises(image.BuildError):
        image.resolve_order(["a"], {"a": ["b"], "b": ["a"]})


def test_modinfo_depends():
    assert image.modinfo_depends(b"\0license=GPL\0depends=netfs,9pnet\0intree=Y\0") == ["netfs", "9pnet"]
    assert image.modinfo_depends(b"\0depends=\0name=x\0") == []
    assert image.modinfo_depends(b"nothing") == []


def test_pick_package_newest_with_candidate():
    out = "\n".join([
        "linux-image-6.12.107+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs",
        "linux-image-6.12.9+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs",
        "linux-image-6.12.117+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs",
        "linux-image-6.12.120+deb12-rt-amd64-unsigned - PREEMPT_RT",
        "linux-image-6.12.121+deb12-cloud-amd64-unsigned - cloud",
        "linux-image-6.12.107+deb12-amd64-dbg - Debug symbols",
    ])
    assert image.pick_package(out, lambda n: True) == "linux-image-6.12.117+deb12-amd64-unsigned"
    assert image.pick_package(out, lambda n: "117" not in n) == "linux-image-6.12.107+deb12-amd64-unsigned"
    assert image.pick_package(out, lambda n: False) is None


def test_is_static_elf():
    assert image.is_static_elf(Path("/bin/busybox").read_bytes()) if Path("/bin/busybox").exists() else True
    assert not image.is_static_elf(Path("/bin/sh").read_bytes() if Path("/bin/sh").exists() else b"")
    assert not image.is_static_elf(b"#!/bin/sh\n")


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    entries, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + filesize]
        off += filesize
        off += -off % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (f[1], body, f[9], f[10])


def test_initramfs_layout():
    blob = image.make_initramfs(b"BB", {"zram": b"Z" * 5, "netfs": b"N"}, "#!/bin/busybox sh\n")
    entries = _parse_newc(gzip.decompress(blob))
    assert entries["init"][0] == 0o100755 and entries["init"][1].startswith(b"#!/bin/busybox sh")
    assert entries["bin/busybox"][:2] == (0o100755, b"BB")
    assert entries["lib/modules/zram.ko"][1] == b"Z" * 5
    assert entries["dev/console"][0] == 0o020600 and entries["dev/console"][2:] == (5, 1)
    assert entries["mnt"][0] == 0o040755


def test_initramfs_is_readable_by_cpio(tmp_path):
    cpio = shutil.which("cpio")
    if not cpio:
        pytest.skip("no cpio binary")
    raw = gzip.decompress(image.make_initramfs(b"BB", {"m": b"x"}, "init"))
    r = subprocess.run([cpio, "-it", "--quiet"], input=raw, capture_output=True, timeout=30)
    assert r.returncode == 0
    assert {"init", "bin/busybox", "lib/modules/m.ko", "dev/console"} <= set(r.stdout.decode().split())


# --- cache stamp -------------------------------------------------------------------------------

def _fake_cache(d: Path, recipe: str | None = None) -> None:
    (d / "vmlinuz").write_bytes(b"kernel")
    (d / "initramfs.cpio.gz").write_bytes(b"initrd")
    stamp = {"recipe": recipe or image.recipe_stamp(), "package": "pkg", "kernel_version": "6.12.0",
             "sha256": {n: image._sha256(d / n) for n in image.FILES}}
    (d / image.STAMP).write_text(json.dumps(stamp))


def test_cache_valid(tmp_path):
    _fake_cache(tmp_path)
    img = image.check_cache(tmp_path)
    assert img and img.kernel == tmp_path / "vmlinuz" and img.kernel_version == "6.12.0"


def test_cache_other_recipe_is_stale(tmp_path):
    _fake_cache(tmp_path, recipe="0" * 16)
    assert image.check_cache(tmp_path) is None


def test_cache_corrupt_or_missing(tmp_path):
    assert image.check_cache(tmp_path) is None
    _fake_cache(tmp_path)
    (tmp_path / "initramfs.cpio.gz").write_bytes(b"truncated")
    assert image.check_cache(tmp_path) is None
    _fake_cache(tmp_path)
    (tmp_path / "vmlinuz").unlink()
    assert image.check_cache(tmp_path) is None
    _fake_cache(tmp_path)
    (tmp_path / image.STAMP).write_text("{not json")
    assert image.check_cache(tmp_path) is None


def test_recipe_stamp_follows_the_recipe(monkeypatch):
    a = image.recipe_stamp()
    assert a == image.recipe_stamp()
    monkeypatch.setattr(guest, "BOOT_MODULES", guest.BOOT_MODULES + (("null_blk", ""),))
    b = image.recipe_stamp()
    monkeypatch.setattr(image, "RECIPE_VERSION", image.RECIPE_VERSION + 1)
    c = image.recipe_stamp()
    monkeypatch.setattr(guest, "HUNG_TASK_SECS", 1)
    assert len({a, b, c, image.recipe_stamp()}) == 4


def test_ensure_uses_a_valid_cache_without_building(tmp_path, monkeypatch):
    _fake_cache(tmp_path)
    monkeypatch.setattr(image, "build", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    assert image.ensure(tmp_path).package == "pkg"


def test_ensure_rebuilds_a_stale_cache(tmp_path, monkeypatch):
    _fake_cache(tmp_path, recipe="stale")
    calls = []
    monkeypatch.setattr(image, "build", lambda cache, log, **k: calls.append(cache) or "built")
    assert image.ensure(tmp_path) == "built" and calls == [tmp_path]


def test_cache_dir_env(monkeypatch):
    monkeypatch.setenv("UBLKZSWAP_VM_CACHE", "/some/where")
    assert image.cache_dir() == Path("/some/where")
    monkeypatch.delenv("UBLKZSWAP_VM_CACHE")
    assert image.cache_dir() == Path(image.DEFAULT_CACHE)


# --- qemu command line ------------------------------------------------------------------------

def test_qemu_argv(tmp_path):
    img = image.Image(tmp_path / "vmlinuz", tmp_path / "initrd", "6.12.0", "pkg")
    opts = run.RunOptions(argv=["true"], mem_mib=256, smp=1)
    argv = run.qemu_argv(img, opts, tmp_path / "rundir", tmp_path / "mon.sock", tmp_path / "disk.raw")
    joined = " ".join(argv)
    for needle in ("-accel tcg,thread=multi", "-cpu max", "-m 256", "-smp 1", "-no-reboot",
                   "mount_tag=host,security_model=none,readonly=on,multidevs=remap",
                   f"path={tmp_path / 'rundir'},mount_tag=results", f"unix:{tmp_path / 'mon.sock'},server=on,wait=off",
                   f"file={tmp_path / 'disk.raw'},if=virtio,format=raw"):
        assert needle in joined, needle
    assert "kvm" not in joined
    assert "-drive" not in run.qemu_argv(img, opts, tmp_path, tmp_path / "m", None)


def test_writable_overlay_is_opt_in():
    img = image.Image(Path("/k"), Path("/i"), "6.12.0", "pkg")
    plain = run.qemu_argv(img, run.RunOptions(argv=["true"]), Path("/r"), Path("/m"), None)
    assert f"{guest.WRITABLE_ENV}=1" not in " ".join(plain)
    assert run.kernel_cmdline(run.RunOptions(argv=["true"], writable=True)).endswith(f" {guest.WRITABLE_ENV}=1")
    text = guest.init_script(list(guest.BOOT_MODULES))
    assert f'"${{{guest.WRITABLE_ENV}}}" = 1' in text and "mount -t overlay" in text and "load overlay" in text
    assert "overlay" in guest.EXTRA_MODULES
    assert cli.parse(["run", "--writable", "--", "true"]).writable


def test_systemd_boot_is_opt_in_and_implies_the_writable_root():
    plain = run.kernel_cmdline(run.RunOptions(argv=["true"]))
    assert guest.SYSTEMD_ENV not in plain
    words = run.kernel_cmdline(run.RunOptions(argv=["true"], systemd=True)).split()
    assert f"{guest.SYSTEMD_ENV}=1" in words and f"{guest.WRITABLE_ENV}=1" in words
    text = guest.init_script(list(guest.BOOT_MODULES))
    branch = text[text.index(f'"${{{guest.SYSTEMD_ENV}}}" = 1'):text.index("\nfi\n", text.index(guest.SYSTEMD_ENV))]
    # systemd replaces init as PID 1 (exec), booted into our target; the job is a unit whose
    # wrapper prints both markers, writes rc and powers off, as the plain init does
    assert f"exec chroot $R /lib/systemd/systemd --unit={guest.SYSTEMD_TARGET}" in branch
    assert f"Wants={guest.SYSTEMD_JOB}" in branch and f"/run/systemd/system/{guest.SYSTEMD_JOB}" in branch
    assert guest.MARK_START in branch and f"{guest.MARK_EXIT}$rc" in branch
    assert f"echo $rc >{guest.RESULTS_DIR}/rc" in branch and "poweroff -f" in branch
    assert text.index(guest.SYSTEMD_ENV) > text.index("mount -t overlay")   # after the root is up
    assert "rm -f $R/.dockerenv" in branch   # else systemd thinks it is in a container: no swap
    assert cli.parse(["run", "--systemd", "--", "true"]).systemd
    assert not cli.parse(["run", "--", "true"]).systemd


# --- console stream ---------------------------------------------------------------------------

def _feed(chunks, verbose=False):
    import io
    out = io.StringIO()
    con = run.Console(out, verbose)
    for c in chunks:
        con.feed(c)
    con.feed(b"", final=True)
    return con, out.getvalue()


def test_console_shows_only_the_job_and_reads_the_marker():
    stream = (b"[ 1.0] boot noise\r\n" + guest.MARK_START.encode() + b"\r\nhello\r\nworld\r\n"
              + guest.MARK_EXIT.encode() + b"3\r\n[ 9.0] reboot: Power down\r\n")
    for size in (1, 3, 7, len(stream)):  # any chunking gives the same result
        con, shown = _feed([stream[i:i + size] for i in range(0, len(stream), size)])
        assert shown == "hello\nworld\n", size
        assert con.marker_rc == 3 and con.ended and con.started_at is not None
        assert list(con.tail)[0] == "[ 1.0] boot noise" and "".join(con.log).count("\n") == 6


def test_console_echoes_partial_lines_live():
    import io
    out = io.StringIO()
    con = run.Console(out)
    con.feed(guest.MARK_START.encode() + b"\r\n...")
    assert out.getvalue() == "..."
    con.feed(b"F.\r")
    assert out.getvalue() == "...F."
    con.feed(b"\n" + "é".encode()[:1])  # a UTF-8 sequence split across reads
    con.feed("é".encode()[1:] + b"\r\n")
    assert out.getvalue() == "...F.\né\n"


def test_console_verbose_shows_boot_and_utf8_replacement():
    con, shown = _feed([b"boot\xff\r\n", guest.MARK_START.encode() + b"\r\nx\r\n"], verbose=True)
    assert shown == "boot\ufffd\nx\n"


def test_console_tail_is_bounded():
    con, _ = _feed([b"".join(b"%d\r\n" % i for i in range(run.TAIL_LINES + 50))])
    assert len(con.tail) == run.TAIL_LINES and con.tail[-1] == str(run.TAIL_LINES + 49)


def test_job_tail_leaves_kernel_messages_out():
    from tools.vm import run as vmrun
    lines = ["tests/kernel/test_swap.py::test_a PASSED\n", "tests/kernel/test_swap.py::test_b \n",
             "[ 2998.072275] task:python3.11 state:D\n", "[   1.5] x\n", "  [not kernel]\n"]
    assert vmrun.job_tail(lines) == ["tests/kernel/test_swap.py::test_a PASSED",
                                     "tests/kernel/test_swap.py::test_b ", "  [not kernel]"]
    assert vmrun.job_tail(lines, 1) == ["  [not kernel]"]


# --- the kernel tests turn off only their own swap -----------------------------------------------

PROC_SWAPS = """Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/zram0                              partition\t4194300\t\t0\t\t100
/dev/vda2                               partition\t1048572\t\t0\t\t-2
/swapfile                               file\t\t524284\t\t0\t\t-3
/dev/ublkb0                             partition\t65532\t\t0\t\t-4
/dev/ublkb1                             partition\t65532\t\t0\t\t-5
"""


def test_swapoff_all_touches_only_the_prefix(monkeypatch):
    import io
    monkeypatch.setattr(daemonctl, "open", lambda path, *a, **k: io.StringIO(PROC_SWAPS), raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **k: calls.append(argv))
    daemonctl.swapoff_all("/dev/ublkb")
    assert calls == [["swapoff", "/dev/ublkb0"], ["swapoff", "/dev/ublkb1"]]
    with pytest.raises(TypeError):
        daemonctl.swapoff_all()          # the host's swap is never "all"
    with pytest.raises(ValueError):
        daemonctl.swapoff_all("")
    assert len(calls) == 2


def test_a_kernel_that_panics_before_the_job_starts_is_booted_again(monkeypatch):
    from tools.vm import run as runmod
    results = [(runmod.EXIT_NO_STATUS, True), (0, False)]
    calls = []

    def once(img, opts, out):
        calls.append(1)
        return results.pop(0)
    monkeypatch.setattr(runmod, "_run_once", once)
    assert runmod.run(None, None) == 0 and len(calls) == 2
    results[:] = [(runmod.EXIT_NO_STATUS, True)] * 3           # a retry at most
    calls.clear()
    assert runmod.run(None, None) == runmod.EXIT_NO_STATUS and len(calls) == 2
    results[:] = [(runmod.EXIT_NO_STATUS, False), (0, False)]   # the job had begun: no retry
    calls.clear()
    assert runmod.run(None, None) == runmod.EXIT_NO_STATUS and len(calls) == 1
