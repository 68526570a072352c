"""The kprobe backend, proven on Debian's stock 6.1 and 6.12 kernels: one
boot per kernel (tests/vm/run-kernel under QEMU), running tests/vm/guest/
there as one pytest session (both backends compiled once, attached side by
side). What the guest tests check, and what emulation cannot show, is in
tests/vm/guest/test_kprobe_backend.py."""

import re

import pytest

from harness import KERNELS

# Boot, two BCC compiles and `python -m agent.probes --backend kprobe` (a
# third) under TCG: about 4-5 minutes per kernel on the 2-core machines.
TIMEOUT = 1200


@pytest.mark.parametrize("line", KERNELS)
def test_kprobe_backend_in_kernel(line, vm_harness):
    status, output = vm_harness.run_pytest_in_kernel(line, "tests/vm/guest", "-q", "-rA",
                                                     "--durations=5", timeout=TIMEOUT)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert status == 0, output[-12000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 17, summary
    assert "skipped" not in summary and "failed" not in summary and "error" not in summary, summary
