"""Prerequisites of the live tests: skip with the reason, or fail in CI (CI=true)."""

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def require(ok: bool, why: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test, but: {why}", pytrace=False)
    pytest.skip(why)


def require_bpf() -> None:
    from agent.probes.tracepoint_backend import bcc_available
    require(os.geteuid() == 0, "needs root to load BPF programs")
    why = bcc_available()
    require(why is None, why or "")


def require_kvm() -> None:
    require(os.access("/dev/kvm", os.R_OK | os.W_OK), "needs read-write /dev/kvm")
