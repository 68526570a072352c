"""Tests that run only inside a tests/vm/run-kernel guest (XSTATE_VM set):
the kprobe backend on Debian's stock kernels, which have kprobes (the CI
machines' kernel has none). tests/vm/test_kprobe_backend.py boots each kernel
and runs this directory there; anywhere else it is not collected.

Inside, both backends run at once in this process, each with its own
collector (tests/live/conftest.py's), so that every action is seen by the
two and their events can be compared one for one.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LIVE = ROOT / "tests" / "live"

collect_ignore_glob = [] if os.environ.get("XSTATE_VM") else ["test_*.py"]

if str(LIVE) not in sys.path:
    sys.path.insert(0, str(LIVE))
_spec = importlib.util.spec_from_file_location("live_conftest", LIVE / "conftest.py")
live_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live_conftest)
Collector = live_conftest.Collector

FEP_PARAM = "/sys/module/kvm/parameters/force_emulation_prefix"


@pytest.fixture(scope="session")
def backends(keeper):
    """{"tp": Collector on a TracepointBackend, "kp": Collector on a KprobeBackend}, both attached."""
    from livecheck import require_bpf
    require_bpf()
    from agent.probes.kprobe_backend import KprobeBackend
    from agent.probes.tracepoint_backend import TracepointBackend
    made = {}
    try:
        for name, cls in (("tp", TracepointBackend), ("kp", KprobeBackend)):
            c = Collector()
            made[name] = c
            c.start(cls(c))
        yield made
    finally:
        for c in made.values():
            if c.backend is not None:
                c.close()


@pytest.fixture(scope="session")
def keeper():
    """One VM open for the whole session, made before any backend or thread.

    KVM turns a static key in the scheduler's context-switch path on at the
    first VM (preempt_notifier_inc) and off when the last goes: each flip
    patches __schedule's code while the other vCPU runs it. Under QEMU's
    software emulation that went wrong once on 6.12 (a kernel panic in
    __schedule, in the middle of the patched instruction) while the tests
    made and closed VMs with the ring readers switching every 2 ms. With
    this VM open the key stays on, and nothing is patched mid-test."""
    from agent.kvmctl import Vm
    vm = Vm()
    yield vm
    vm.close()


@pytest.fixture(scope="session")
def fep():
    """KVM's forced-emulation prefix, on for the session. Under QEMU's TCG the
    nested SVM it emulates lets a guest's XSETBV run without a VM exit (KVM
    never sees it); prefixed with ud2 'kvm', KVM emulates the instruction
    itself and its XCR0 handler runs, as for an intercepted XSETBV."""
    try:
        with open(FEP_PARAM) as f:
            old = f.read().strip()
        with open(FEP_PARAM, "w") as f:
            f.write("1")
    except OSError as e:
        pytest.skip(f"cannot turn on kvm.force_emulation_prefix: {e}")
    yield bytes.fromhex("0f0b6b766d")  # ud2; .ascii "kvm"
    with open(FEP_PARAM, "w") as f:
        f.write("1" if old in ("Y", "1") else "0")
