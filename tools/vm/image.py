"""Builds and validates the cached guest image: Debian's 6.12 kernel + a busybox initramfs.

Cache directory (default /var/cache/ublkzswap/vm, env UBLKZSWAP_VM_CACHE)::

    vmlinuz              the kernel from linux-image-6.12.*-amd64-unsigned
    initramfs.cpio.gz    busybox-static, decompressed modules in /lib/modules/<name>.ko, /init
    stamp.json           written last: recipe hash, package, kernel version, sha256 of both files

The cache is valid only if stamp.json names the current recipe hash (:func:`recipe_stamp`: the
recipe version, module lists, init script template) and both files still hash as recorded; anything
else (missing, corrupt, other recipe) rebuilds. A lock file serialises concurrent builders.
The .deb is fetched with ``apt-get download`` (newest 6.12 amd64-unsigned with an apt candidate,
``apt-get update`` once if none) and deleted after extraction. Every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import guest

#: Bump when the build procedure changes in a way the hashed inputs below do not capture.
RECIPE_VERSION = 1
DEFAULT_CACHE = "/var/cache/ublkzswap/vm"
PACKAGE_RE = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb\d+)-amd64-unsigned$")
BUSYBOX = "/bin/busybox"
STAMP = "stamp.json"
FILES = ("vmlinuz", "initramfs.cpio.gz")

T_APT_UPDATE = 300
T_DOWNLOAD = 900
T_EXTRACT = 300
T_XZ = 60
T_LOCK = 1800


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    kernel_version: str
    package: str


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("UBLKZSWAP_VM_CACHE") or DEFAULT_CACHE)


def recipe_stamp() -> str:
    """Hash of everything that defines the image besides the kernel package itself."""
    recipe = {
        "version": RECIPE_VERSION,
        "boot_modules": guest.BOOT_MODULES,
        "extra_modules": guest.EXTRA_MODULES,
        "init": guest.init_script([(n, p) for n, p in guest.BOOT_MODULES]),
        "package_re": PACKAGE_RE.pattern,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_cache(cache: Path) -> Image | None:
    """The cached image if it is complete, uncorrupted and built by the current recipe."""
    try:
        stamp = json.loads((cache / STAMP).read_text())
        if stamp.get("recipe") != recipe_stamp():
            return None
        for name in FILES:
            if _sha256(cache / name) != stamp["sha256"][name]:
                return None
        return Image(cache / FILES[0], cache / FILES[1], stamp["kernel_version"], stamp["package"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, timeout=timeout, check=True, **kw)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{argv[0]} timed out after {timeout}s: {' '.join(argv)}") from None
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise BuildError(f"{' '.join(argv)} failed (exit {e.returncode}) {err[-2000:]}") from None
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} not found (tools/install-deps installs what the VM needs)") from None


def pick_package(search_output: str, has_candidate) -> str | None:
    """Newest linux-image-6.12.N+debX-amd64-unsigned in ``apt-cache search`` output that apt can
    actually fetch (``has_candidate(name)``)."""
    found = []
    for line in search_output.splitlines():
        m = PACKAGE_RE.match(line.split(" - ", 1)[0].strip())
        if m:
            found.append((int(m.group(2)), m.group(0)))
    for _, name in sorted(found, reverse=True):
        if has_candidate(name):
            return name
    return None


def _apt_candidate(name: str) -> bool:
    out = _run(["apt-cache", "policy", name], 60, capture_output=True, text=True).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    return bool(m) and m.group(1) != "(none)"


def find_package() -> str:
    override = os.environ.get("UBLKZSWAP_VM_KERNEL_PKG")
    if override:
        return override
    for attempt in range(2):
        out = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.12\..*-amd64-unsigned$"], 60,
                   capture_output=True, text=True).stdout
        name = pick_package(out, _apt_candidate)
        if name:
            return name
        if attempt == 0:
            _log("tools.vm: no 6.12 kernel package known to apt; running apt-get update")
            _run(["apt-get", "update", "-q"], T_APT_UPDATE, capture_output=True)
    raise BuildError("apt knows no linux-image-6.12.*-amd64-unsigned (Debian 12 needs bookworm-security in sources)")


def modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo section (found by scanning the bytes)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def resolve_order(wanted: list[str], depends: dict[str, list[str]]) -> list[str]:
    """``wanted`` in order, each preceded by its not-yet-listed dependencies (depth first)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise BuildError(f"module dependency cycle: {' -> '.join(path + (name,))}")
        for dep in depends.get(name, []):
            visit(dep, path + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def is_static_elf(data: bytes) -> bool:
    """True if ``data`` is a 64-bit little-endian ELF without a PT_INTERP (no dynamic loader)."""
    if data[:5] != b"\x7fELF\x02" or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


class Cpio:
    """A minimal newc (SVR4, no CRC) archive writer: enough for an initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def make_initramfs(busybox: bytes, modules: dict[str, bytes], init: str) -> bytes:
    """The gzip'd newc archive: /bin/busybox, /init, /dev/console, /lib/modules/<name>.ko."""
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", busybox, 0o755)
    c.file("init", init.encode(), 0o755)
    for name, data in sorted(modules.items()):
        c.file(f"lib/modules/{name}.ko", data)
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


def _module_index(modroot: Path) -> dict[str, Path]:
    index = {}
    for p in modroot.rglob("*.ko*"):
        name = p.name.split(".ko", 1)[0].replace("-", "_")
        index[name] = p
    return index


def _read_module(path: Path) -> bytes:
    if path.name.endswith(".ko.xz"):
        return _run(["xz", "-dc", str(path)], T_XZ, capture_output=True).stdout
    if path.name.endswith(".ko"):
        return path.read_bytes()
    raise BuildError(f"unsupported module compression: {path}")


def build(cache: Path, log=None) -> Image:
    """Build the image into ``cache`` (replacing whatever is there) and return it."""
    log = log or _log
    cache.mkdir(parents=True, exist_ok=True)
    bb = Path(BUSYBOX).read_bytes() if Path(BUSYBOX).exists() else b""
    if not is_static_elf(bb):
        raise BuildError(f"{BUSYBOX} is missing or not statically linked: install busybox-static")
    package = find_package()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
        work = Path(tmp)
        log(f"tools.vm: downloading {package}")
        _run(["apt-get", "download", package], T_DOWNLOAD, cwd=work, capture_output=True)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise BuildError(f"apt-get download {package} left {debs}")
        root = work / "x"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], T_EXTRACT, capture_output=True)
        debs[0].unlink()
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        versions = sorted(p.name for p in (root / "lib/modules").iterdir())
        if len(kernels) != 1 or len(versions) != 1:
            raise BuildError(f"unexpected package layout: {kernels} {versions}")
        index = _module_index(root / "lib/modules" / versions[0] / "kernel")
        blobs: dict[str, bytes] = {}
        depends: dict[str, list[str]] = {}

        def need(name: str) -> None:
            if name in blobs:
                return
            if name not in index:
                raise BuildError(f"module {name} not in {package}")
            blobs[name] = _read_module(index[name])
            depends[name] = modinfo_depends(blobs[name])
            for d in depends[name]:
                need(d)

        for name, _ in guest.BOOT_MODULES:
            need(name)
        for name in guest.EXTRA_MODULES:
            need(name)
        params = dict(guest.BOOT_MODULES)
        order = resolve_order([n for n, _ in guest.BOOT_MODULES], depends)
        init = guest.init_script([(n, params.get(n, "")) for n in order])
        log(f"tools.vm: initramfs with {len(blobs)} modules; boot load order: {' '.join(order)}")
        (work / "initramfs.cpio.gz").write_bytes(make_initramfs(bb, blobs, init))
        shutil.copyfile(kernels[0], work / "vmlinuz")
        with contextlib.suppress(FileNotFoundError):
            (cache / STAMP).unlink()
        for name in FILES:
            os.replace(work / name, cache / name)
        stamp = {
            "recipe": recipe_stamp(),
            "package": package,
            "kernel_version": versions[0],
            "modules": order + sorted(set(blobs) - set(order)),
            "sha256": {name: _sha256(cache / name) for name in FILES},
        }
        (work / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        os.replace(work / STAMP, cache / STAMP)
    img = check_cache(cache)
    if img is None:
        raise BuildError(f"built image in {cache} does not validate")
    return img


def ensure(cache: Path | None = None, log=None, force: bool = False) -> Image:
    """The cached image, built first if missing, stale or corrupt (serialised by a lock file)."""
    cache = cache or cache_dir()
    img = None if force else check_cache(cache)
    if img:
        return img
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        deadline = time.monotonic() + T_LOCK
        while True:  # another builder finishes first (its steps are bounded); then we re-check
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(f"{cache}/.lock held by another build for over {T_LOCK}s") from None
                time.sleep(1)
        img = None if force else check_cache(cache)
        return img or build(cache, log)
