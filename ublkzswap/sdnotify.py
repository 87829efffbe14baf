"""systemd's readiness protocol (sd_notify(3)) for ``Type=notify`` units, without libsystemd.

Owns: :func:`notify` -- one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path, or
an abstract name written ``@name``); nothing happens when the variable is unset (not started
by systemd). The daemon says ``READY=1`` once its configured devices are up, ``STOPPING=1``
when it tears them down, ``STATUS=`` for what ``systemctl status`` should show, and
``MAINPID=`` when the server's role passes to another process (a standby taking over, a
background child), which is why the unit sets ``NotifyAccess=all``.

The variable is left in the environment on purpose: a standby inherits it, and it is the
one that reports the new main pid after a hand-over.

Still naive: no watchdog (``WATCHDOG=1``) and no file-descriptor store.
"""

from __future__ import annotations

import os
import socket

ENV = "NOTIFY_SOCKET"


def address() -> str | None:
    """Where notifications go (abstract names with a leading NUL), or None."""
    path = os.environ.get(ENV, "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    if not path.startswith("/"):
        return None                       # sd_notify(3) takes only these two forms
    return path


def notify(**fields) -> bool:
    """Send ``KEY=VALUE`` lines (``ready=1`` -> ``READY=1``); True if a manager was told.
    Never raises: a manager that went away must not end the daemon."""
    addr = address()
    if addr is None:
        return False
    text = "".join(f"{k.upper()}={v}\n" for k, v in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(text.encode(), addr)
        return True
    except OSError:
        return False
