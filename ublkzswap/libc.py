"""The C library, once: one ctypes handle and the prototype of every call the daemon makes.

Owns: :data:`libc` (``CDLL(None)``, errno kept) with ``argtypes``/``restype`` declared here and
nowhere else, and :func:`check` / :func:`oserror`, which turn a -1 return into an OSError that
names the call. ctypes releases the GIL around every call, so a call that blocks (a page being
populated, say) never stalls the other threads' Python.
"""

from __future__ import annotations

import ctypes as C
import os

libc = C.CDLL(None, use_errno=True)

_PROTOTYPES = {
    # name: (restype, argtypes)
    "prctl": (C.c_int, [C.c_int, C.c_ulong, C.c_ulong, C.c_ulong, C.c_ulong]),
    "mlock": (C.c_int, [C.c_void_p, C.c_size_t]),
    "munlock": (C.c_int, [C.c_void_p, C.c_size_t]),
    "mlock2": (C.c_int, [C.c_void_p, C.c_size_t, C.c_uint]),
    "mlockall": (C.c_int, [C.c_int]),
    "mincore": (C.c_int, [C.c_void_p, C.c_size_t, C.c_void_p]),
    "madvise": (C.c_int, [C.c_void_p, C.c_size_t, C.c_int]),
    "mallopt": (C.c_int, [C.c_int, C.c_int]),
    "malloc": (C.c_void_p, [C.c_size_t]),
    "free": (None, [C.c_void_p]),
    "sbrk": (C.c_void_p, [C.c_ssize_t]),
    "sysinfo": (C.c_int, [C.c_void_p]),
    "fstatfs": (C.c_int, [C.c_int, C.c_void_p]),
    "pthread_self": (C.c_ulong, []),
    "pthread_getattr_np": (C.c_int, [C.c_ulong, C.c_void_p]),
    "pthread_attr_getstack": (C.c_int, [C.c_void_p, C.c_void_p, C.c_void_p]),
    "pthread_attr_destroy": (C.c_int, [C.c_void_p]),
    "posix_spawn": (C.c_int, [C.POINTER(C.c_int), C.c_char_p, C.c_void_p, C.c_void_p,
                              C.POINTER(C.c_char_p), C.POINTER(C.c_char_p)]),
    "syscall": (C.c_long, None),   # variadic: callers pass C.c_long and pointers
}
for _name, (_res, _args) in _PROTOTYPES.items():
    _f = getattr(libc, _name)
    _f.restype, _f.argtypes = _res, _args


def oserror(what: str) -> OSError:
    """OSError for the errno the last call left, as ``what: strerror``."""
    err = C.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def spawn(path: str, argv: list[str], env: dict[str, str]) -> int:
    """``posix_spawn`` (glibc: clone with CLONE_VM|CLONE_VFORK, then exec; nothing shared
    copy-on-write) through ctypes, which releases the GIL: the calling thread waits for the
    child's exec, which may wait on reclaim, and must not hold up the queue threads meanwhile
    (``os.posix_spawn`` holds the GIL). Returns the child's pid; raises OSError."""
    def strings(items):
        return (C.c_char_p * (len(items) + 1))(*[os.fsencode(x) for x in items], None)
    pid = C.c_int()
    rc = libc.posix_spawn(C.byref(pid), os.fsencode(path), None, None, strings(argv),
                          strings([f"{k}={v}" for k, v in env.items()]))
    if rc:
        raise OSError(rc, f"posix_spawn {path}: {os.strerror(rc)}")
    return pid.value


def check(rc: int, what: str) -> None:
    """Raise :func:`oserror` if ``rc`` is not 0."""
    if rc != 0:
        raise oserror(what)
