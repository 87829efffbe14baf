"""A fake in-memory Manager (contract in docs/CONTRACTS.md) with compcache 0.6.2's state machine.

Used by the control and CLI tests; the tests in this file check the fake itself follows the
rules of the reference (section 1.5): SET_* and INIT -> EBUSY once initialised, STATS -> ENOTTY
before init, RESET -> EBUSY while active (swapon) and a no-op when uninitialised, unknown
device -> ENODEV; memlimit may change in any state (beyond compcache, as the contract says).
"""

import errno

import pytest

from ublkzswap import stats as statsmod

PAGE = 4096
FAKE_RAM = 1 << 30


class FakeManager:
    def __init__(self, num_devices=2):
        self.devs = {n: self._fresh() for n in range(num_devices)}
        self.calls = []

    @staticmethod
    def _fresh():
        return {"init": False, "active": False, "disksize": 0, "mem_limit": 0,
                "backing_swap": "", "stats": statsmod.empty()}

    def _get(self, dev):
        if dev not in self.devs:
            raise OSError(errno.ENODEV, f"no device {dev}")
        return self.devs[dev]

    def _uninit(self, dev, what):
        d = self._get(dev)
        if d["init"]:
            raise OSError(errno.EBUSY, f"{what}: device already initialised")
        return d

    def devices(self):
        self.calls.append(("devices",))
        return sorted(self.devs)

    def set_backing_swap(self, dev, path):
        self.calls.append(("set_backing_swap", dev, path))
        self._uninit(dev, "backing_swap")["backing_swap"] = path

    def set_memlimit_kb(self, dev, kb):
        self.calls.append(("set_memlimit_kb", dev, kb))
        self._get(dev)["mem_limit"] = kb << 10

    def set_disksize_kb(self, dev, kb):
        self.calls.append(("set_disksize_kb", dev, kb))
        self._uninit(dev, "disksize")["disksize"] = kb << 10

    def init(self, dev):
        self.calls.append(("init", dev))
        d = self._get(dev)
        if d["init"]:
            raise OSError(errno.EBUSY, "Device already initialized!")
        if d["backing_swap"]:
            d["disksize"] = 64 << 20  # "the backing device's size"
            if not d["mem_limit"] or d["mem_limit"] > d["disksize"]:
                d["mem_limit"] = min(FAKE_RAM * 15 // 100, d["disksize"])
        elif not d["disksize"]:
            d["disksize"] = FAKE_RAM // 4
        d["disksize"] &= ~(PAGE - 1)
        d["mem_limit"] &= ~(PAGE - 1)
        d["init"] = True

    def reset(self, dev):
        self.calls.append(("reset", dev))
        d = self._get(dev)
        if d["active"]:
            raise OSError(errno.EBUSY, "device is in use (swapon)")
        if d["init"]:
            self.devs[dev] = self._fresh()

    def stats(self, dev):
        self.calls.append(("stats", dev))
        d = self._get(dev)
        if not d["init"]:
            raise OSError(errno.ENOTTY, "device not initialised")
        return dict(d["stats"], disksize=d["disksize"], mem_limit=d["mem_limit"],
                    backing_swap=d["backing_swap"])

    def info(self, dev):
        self.calls.append(("info", dev))
        d = self._get(dev)
        state = "active" if d["active"] else "initialised" if d["init"] else "uninitialised"
        out = {"dev": dev, "state": state, "disksize": d["disksize"], "mem_limit": d["mem_limit"],
               "backing_swap": d["backing_swap"], "algorithm": "lzo"}
        if d["init"]:
            for k in ("orig_data_size", "compr_data_size", "mem_used_total"):
                out[k] = d["stats"][k]
        return out

    # test helpers (not part of the contract)
    def swapon(self, dev):
        d = self._get(dev)
        if not d["init"]:
            raise OSError(errno.EINVAL, "not initialised")
        d["active"] = True

    def swapoff(self, dev):
        self._get(dev)["active"] = False

    def store_pages(self, dev, n, zero=0, huge=0):
        s = self._get(dev)["stats"]
        s["num_writes"] += n + zero
        s["pages_stored"] += n
        s["zero_pages"] += zero
        s["same_pages"] += zero
        s["huge_pages"] += huge
        s["good_compress"] += (n - huge) // 2
        s["orig_data_size"] += n * PAGE
        s["compr_data_size"] += (n - huge) * 1500 + huge * PAGE
        s["mem_used_total"] = s["compr_data_size"] + 8192
        s["mem_used_max"] = max(s["mem_used_max"], s["mem_used_total"])


def _errno(fn, *a):
    with pytest.raises(OSError) as e:
        fn(*a)
    return e.value.errno


def test_fake_follows_compcache_state_machine():
    m = FakeManager()
    assert _errno(m.stats, 0) == errno.ENOTTY
    m.reset(0)  # no-op when uninitialised
    m.set_disksize_kb(0, 10240)
    m.init(0)
    assert m.stats(0)["disksize"] == 10240 << 10
    assert _errno(m.init, 0) == errno.EBUSY
    assert _errno(m.set_disksize_kb, 0, 1) == errno.EBUSY
    assert _errno(m.set_backing_swap, 0, "/dev/sda2") == errno.EBUSY
    m.set_memlimit_kb(0, 100)  # allowed in any state
    m.swapon(0)
    assert m.info(0)["state"] == "active"
    assert _errno(m.reset, 0) == errno.EBUSY
    m.swapoff(0)
    m.reset(0)
    assert m.info(0)["state"] == "uninitialised" and m.info(0)["disksize"] == 0
    assert _errno(m.info, 7) == errno.ENODEV


def test_fake_backing_swap_defaults():
    m = FakeManager()
    m.set_backing_swap(1, "/dev/sda2")
    m.init(1)
    s = m.stats(1)
    assert s["backing_swap"] == "/dev/sda2" and s["disksize"] == 64 << 20
    assert 0 < s["mem_limit"] <= s["disksize"]
