"""Live tests run against the real kernel: they need root, BCC and (some)
/dev/kvm. Without them they skip with the reason, except in CI (CI=true),
where a missing prerequisite is a failure: CI must run them for real."""

import pytest

from livecheck import require, require_bpf, require_kvm
from livecollector import Collector


@pytest.fixture(scope="session")
def live():
    """One backend for the whole session (compiling takes a few seconds)."""
    require_bpf()
    from agent.probes.tracepoint_backend import TracepointBackend
    c = Collector()
    c.start(TracepointBackend(c))
    yield c
    c.close()


@pytest.fixture
def kvm(live):
    """Makes VMs (kvmctl.Vm) that are closed after the test."""
    require_kvm()
    require(live.backend.status["kvm_ioctl"].attached, f"kvm_ioctl probes: {live.backend.status['kvm_ioctl'].reason}")
    from agent.kvmctl import Vm
    vms = []

    def make():
        vms.append(Vm())
        return vms[-1]
    yield make
    for vm in vms:
        vm.close()


@pytest.fixture
def group(live):
    """require(group attached): group("fpu_load")."""
    def need(name: str):
        st = live.backend.status[name]
        require(st.attached, f"probe group {name} not attached: {st.reason}")
    return need
