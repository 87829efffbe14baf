"""daemon.Standby: with ``keep`` a standby is started at once and another when it dies; without
it (the default) none is started until one is needed (:meth:`ready`: a planned restart, a
server ending on purpose). The standby here is a Python that says it is prepared and sleeps."""
import os
import subprocess
import sys
import time

from ublkzswap import daemon


class SleeperStandby(daemon.Standby):
    def __init__(self, keep):
        super().__init__([], keep=keep)
        self.spawned = []

    def _spawn(self):
        r, w = os.pipe()
        p = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                              "os.write(int(sys.argv[1]), b'!'); time.sleep(60)", str(w)],
                             pass_fds=(w,))
        os.close(w)
        self.spawned.append(p.pid)
        return p.pid, r


def test_kept_standby_is_started_at_once_and_again_when_it_dies():
    s = SleeperStandby(keep=True)
    s.start()
    try:
        assert s.ready(10) and len(s.spawned) == 1
        first = s.pid
        os.kill(first, 9)
        deadline = time.monotonic() + 15           # back-off: 1 s
        while (s.pid == first or not s.ready(0.1)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.pid != first and len(s.spawned) == 2
    finally:
        s.stop()


def test_no_standby_until_one_is_needed():
    s = SleeperStandby(keep=False)
    s.start()
    try:
        time.sleep(0.5)
        assert s.spawned == [] and s.pid == 0
        assert s.ready(10) and len(s.spawned) == 1     # asked for: started, prepared
        assert s.ready(0.1) and len(s.spawned) == 1    # not a second one
    finally:
        s.stop()
    assert subprocess.run(["kill", "-0", str(s.spawned[0])], capture_output=True).returncode != 0
