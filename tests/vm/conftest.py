"""Tests that boot Debian kernels under QEMU (tests/vm/run-kernel).

Marked `vm` (deselect with `-m "not vm"` for a quick local run). Without
QEMU, busybox-static or a writable kernel cache they skip with the reason,
which in CI (CI=true) is a failure (tests/conftest.py).
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

# Inside a guest (a whole pytest session run by the harness), these tests
# would boot QEMU under emulated QEMU: not collected there.
collect_ignore_glob = ["test_*.py"] if os.environ.get("XSTATE_VM") else []


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: boots a Debian kernel under QEMU software emulation (slow)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def vm_harness():
    """The harness module, once this machine can run it (else skip: a failure in CI)."""
    why = harness.missing()
    if why:
        pytest.skip(f"kernel VM harness unavailable: {why}")
    return harness


@pytest.fixture(scope="session")
def run_in_kernel(vm_harness):
    """run_in_kernel(pkg, *cmd, timeout=...) -> (status, output); see harness.py."""
    return vm_harness.run_in_kernel
