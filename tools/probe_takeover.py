"""VM probe (diagnostic, not a test): two kills of the server under swap pressure, as test_swap_survives_two_kills; prints the standby's thread stacks until it has taken over."""
import ctypes, glob, os, signal, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.kernel.daemonctl import PY, start, standby_of   # stdlib only
libc = ctypes.CDLL(None, use_errno=True)
assert libc.mlockall(3) == 0
open("/proc/sys/kernel/printk", "w").write("8")
open("/proc/sys/kernel/hung_task_timeout_secs", "w").write("30")
SWAPLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "swapload.py")
sock = "/tmp/take.sock"
mem = int(open("/proc/meminfo").readline().split()[1]) // 1024
mib = int(mem * 1.5)
pid, _ = start("num_devices=1", f"socket={sock}")
subprocess.run([PY, "-m", "ublkzswap.cli", "/dev/ublkb0", f"--disksize_kb={3 * mib * 1024}", "--init", "--socket", sock], check=True)
subprocess.run(["swapon", "--discard", "/dev/ublkb0"], check=True)
load = subprocess.Popen([PY, SWAPLOAD, "--mib", str(mib), "--passes", "2", "--quiet", "--mix", "zero=50,same=15,text=32,random=3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
t0 = time.monotonic()
sb = pid                                  # the server to kill next
for delay in (60, 90):
    time.sleep(delay)
    server = sb
    print(f"t={time.monotonic()-t0:.0f} waiting for the standby of {server}", flush=True)
    sb = standby_of(server)
    print(f"t={time.monotonic()-t0:.0f} killing {server}, standby {sb}", flush=True)
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 150
    ok = False
    while time.monotonic() < deadline and not ok:
        time.sleep(5)
        ok = f"{sb} took over" in subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        if not ok:
            for t in sorted(glob.glob(f"/proc/{sb}/task/*")) + sorted(glob.glob(f"/proc/{server}/task/*")):
                try:
                    comm = open(f"{t}/comm").read().strip()
                    st = open(f"{t}/stack").read().strip().splitlines()
                    state = open(f"{t}/stat").read().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                print(f"  {t.split('/')[-1]} {comm} {state}: " + " <- ".join(l.split()[-1].split("+")[0] for l in st[:16]), flush=True)
    print(f"t={time.monotonic()-t0:.0f} taken over: {ok}", flush=True)
    if not ok:
        open("/proc/sysrq-trigger", "w").write("w")
        time.sleep(20)
        os._exit(1)
print("waiting for the workload", flush=True)
print("workload rc", load.wait(), flush=True)
os._exit(0)
