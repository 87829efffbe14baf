#!/usr/bin/env python3
"""Compile every module the daemon can import -- ublkzswap's own, numpy's and lzo's, and the
standard library's they pull in -- to ``.pyc`` files at the two optimisation levels ublkzswap
runs at: 0 (rzscontrol, the tests) and 2 (the daemon: ``ublkzswap.daemon.DAEMON_FLAGS``).

Without them the daemon compiles each module from source at every start (pip writes level-0
files only, and a root read-only or PYTHONDONTWRITEBYTECODE writes none): slower, and the
compiler's peak stays in the daemon's heap, which is locked and never trimmed. Run by
tools/install-deps with each Python it installs for; writes where it may, skips the rest.

    python3 tools/precompile.py      # prints: precompile: N files written, M skipped
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import py_compile
import sys


def modules() -> list[str]:
    """The source files of every module loaded once all of ublkzswap is imported."""
    import ublkzswap
    for m in pkgutil.walk_packages(ublkzswap.__path__, "ublkzswap."):
        importlib.import_module(m.name)
    out = []
    for mod in list(sys.modules.values()):
        spec = getattr(mod, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py") and getattr(spec, "cached", None):
            out.append(origin)
    return sorted(set(out))


def main() -> int:
    written = skipped = 0
    for src in modules():
        for opt in (0, 2):
            cfile = importlib.util.cache_from_source(src, optimization="" if opt == 0 else opt)
            try:
                py_compile.compile(src, cfile=cfile, optimize=opt, doraise=True)
                written += 1
            except (OSError, py_compile.PyCompileError):
                skipped += 1
    print(f"precompile: {written} files written, {skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
