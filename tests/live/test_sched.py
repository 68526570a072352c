"""exec and exit of processes the agent has seen do XSTATE or KVM work, from
sched:sched_process_exec/exit: real child processes, single- and
multi-threaded; exit only when the whole thread group is gone. Also the VM
names taken from the VMM's command line, and forgotten at its exit."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from agent.events.model import Exec, Exit, Perm, VcpuCreate
from livecheck import require, require_bpf, require_kvm

LIVE_DIR = os.path.dirname(os.path.abspath(__file__))

# Child programs. Each prints a line when ready, then waits for a line on stdin.
PRCTL = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
mask = ctypes.c_uint64()
assert libc.syscall(158, 0x1021, ctypes.byref(mask)) == 0  # ARCH_GET_XCOMP_SUPP
"""
READY_WAIT = """
print("ready", flush=True)
sys.stdin.readline()
"""
PLAIN = "import sys\n" + READY_WAIT
WATCHED = PRCTL + READY_WAIT
# The group leader leaves first (the raw exit syscall ends one thread, with no
# unwinding), the process lives on in its second thread until told to go.
THREADED = PRCTL + """
import threading
def second():
    print(threading.get_native_id(), flush=True)
    sys.stdin.readline()
threading.Thread(target=second).start()
libc.syscall(60, 0)  # SYS_exit: this thread only
"""
# A VMM: one VM with one vCPU.
VMM = f"""
import sys
sys.path.insert(0, {LIVE_DIR!r})
from agent.kvmctl import Vm
vm = Vm()
assert vm.create_vcpu(0) >= 0
""" + READY_WAIT


class Child:
    def __init__(self, code: str, *args: str, follow=None):
        self.p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        for c in follow or ():
            c.follow(self.p.pid)
        self.line = self.p.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self.p.pid

    def go(self) -> int:
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        return self.p.wait(10)


@pytest.fixture(scope="module")
def fallback():
    """A second backend (arch_prctl + sched only) that finds whole-group exits
    through signal->live, as on kernels whose sched_process_exit lacks group_dead."""
    require_bpf()
    from agent.probes.tracepoint_backend import TracepointBackend
    from livecollector import Collector
    c = Collector()
    c.start(TracepointBackend(c, groups=("arch_prctl", "sched"), exit_has_group_dead=False))
    yield c
    c.close()


@pytest.fixture(params=["group_dead", "signal_live"])
def watcher(request, live, group):
    """The session backend (group_dead where the kernel has it) or the fallback."""
    group("sched")
    if request.param == "group_dead":
        require(live.backend.exit_has_group_dead, "this kernel's sched_process_exit has no group_dead")
        return live
    c = request.getfixturevalue("fallback")
    require(c.backend.status["sched"].attached, f"sched (signal->live): {c.backend.status['sched'].reason}")
    return c


def _kinds(got):
    return [type(e) for e, _ in got]


def test_exit_of_a_watched_process(watcher):
    mark = watcher.mark()
    child = Child(WATCHED, follow=[watcher])
    assert child.go() == 0
    got = watcher.of(child.pid, mark, 2)
    assert _kinds(got) == [Perm, Exit]
    exit_ = got[1][0]
    assert (exit_.tgid, exit_.tid) == (child.pid, child.pid)


def test_unwatched_process_exit_stays_in_the_kernel(watcher):
    mark = watcher.mark()
    child = Child(PLAIN, follow=[watcher])
    assert child.go() == 0
    time.sleep(0.2)
    assert watcher.of(child.pid, mark, 1, timeout=0.3) == []


def test_exit_waits_for_the_last_thread(watcher):
    mark = watcher.mark()
    child = Child(THREADED, follow=[watcher])
    second = int(child.line)
    time.sleep(0.2)  # the leader has exited by now: not the group's end
    assert _kinds(watcher.of(child.pid, mark, 2, timeout=0.3)) == [Perm]
    assert child.go() == 0
    got = watcher.of(child.pid, mark, 2)
    assert _kinds(got) == [Perm, Exit]
    assert got[1][0].tid == second != child.pid


def test_exec_then_exit(live, group):
    group("sched")
    mark = live.mark()
    # The watched program execs a new one, which is watched again only once
    # it does XSTATE work itself: here it does, so its exit is reported.
    again = PRCTL
    code = PRCTL + f"import os\nos.execv(sys.executable, [sys.executable, '-c', {again!r}])\n"
    p = subprocess.Popen([sys.executable, "-c", code])
    live.follow(p.pid)
    assert p.wait(10) == 0
    got = live.of(p.pid, mark, 4)
    assert _kinds(got) == [Perm, Exec, Perm, Exit]


def test_exec_forgets_the_process(live, group):
    group("sched")
    mark = live.mark()
    code = PRCTL + "import os\nos.execv('/bin/true', ['/bin/true'])\n"
    p = subprocess.Popen([sys.executable, "-c", code])
    live.follow(p.pid)
    assert p.wait(10) == 0
    time.sleep(0.2)
    # /bin/true did nothing the agent watches: its exit stays in the kernel.
    assert _kinds(live.of(p.pid, mark, 3, timeout=0.5)) == [Perm, Exec]


# ---- VM names from the VMM's command line ------------------------------------

@pytest.mark.parametrize("args, name", [
    (("-name", "guest=web-01,debug-threads=on"), "web-01"),
    (("-name", "db,,primary,process=qemu-db"), "db,primary"),
    (("-uuid", "5d8f3a4e-0000-4000-8000-00000000abcd"), "5d8f3a4e-0000-4000-8000-00000000abcd"),
    ((), None),
])
def test_vm_name_from_the_vmm_command_line(live, group, args, name):
    require_kvm()
    group("kvm_ioctl")
    mark = live.mark()
    child = Child(VMM, *args, follow=[live])
    (e, _), = live.of(child.pid, mark, 1)
    assert isinstance(e, VcpuCreate)
    assert live.names[e.vm] == name == live.backend.vms.name(e.vm)
    assert child.go() == 0
    got = live.of(child.pid, mark, 2)
    assert _kinds(got) == [VcpuCreate, Exit]
    # Forgotten at the exit.
    assert live.backend.vms.name(e.vm) is None


def test_vmm_started_before_the_agent_has_its_exit_reported(live, group):
    """A VMM already holding a VM when the backend starts is watched from
    the start (the loader scans /proc), though it does nothing afterwards."""
    require_kvm()
    group("sched")
    from agent.probes.tracepoint_backend import TracepointBackend
    from livecollector import Collector
    child = Child(VMM)
    c = Collector()
    c.follow(child.pid)
    c.start(TracepointBackend(c, groups=("arch_prctl", "sched")))
    try:
        assert child.go() == 0
        got = c.of(child.pid, 0, 1)
        assert _kinds(got) == [Exit]
    finally:
        c.close()


def test_nothing_lost(live):
    live.assert_nothing_lost()


def test_live_events_are_valid(live):
    """Every event the backend made this session for the tests' processes
    (this one and its children) is one the strict spec reader takes back
    unchanged."""
    assert live.invalid == []
