"""The kernel harness does what the kprobe tests rely on, for Debian's 6.1
and 6.12: the named kernel boots, has kprobes and /dev/kvm, a BCC kprobe
compiles against matching headers and fires, and the command's output and
exit status come back exactly (never kernel messages)."""

import json

import pytest

from harness import EXIT_TIMEOUT, KERNELS, ROOT, VENV_PYTHON, VMHarnessError

ARCH_GET_XCOMP_PERM = 0x1022


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request, vm_harness):
    """(line, package, release) of one kernel line."""
    name, _version, release = vm_harness.resolve(request.param)
    return request.param, name, release


@pytest.fixture(scope="module")
def checks(kernel, run_in_kernel):
    """One boot per kernel: tests/vm/guest_checks.py with the project's venv python."""
    status, output = run_in_kernel(kernel[0], str(VENV_PYTHON), str(ROOT / "tests" / "vm" / "guest_checks.py"),
                                   merge_stderr=False)
    assert status == 0, output
    lines = [line for line in output.splitlines() if line.startswith("GUEST-CHECKS ")]
    assert len(lines) == 1, output
    return json.loads(lines[0].removeprefix("GUEST-CHECKS "))


def test_line_resolves_to_a_debian_image_package(kernel):
    line, name, release = kernel
    assert name == f"linux-image-{release}"
    assert release.startswith(line + ".") and release.endswith("-amd64")


def test_uname_is_the_packages_release(kernel, checks):
    assert checks["release"] == kernel[2]
    assert checks["xstate_vm"] == kernel[2]


def test_kprobes_are_available(kernel, checks, vm_harness):
    assert vm_harness.kernel_config(kernel[1])["CONFIG_KPROBES"] == "y"
    assert checks["kprobes_debugfs"], "no /sys/kernel/debug/kprobes/list inside"
    assert checks["kprobe_pmu"], "no kprobe PMU inside"


def test_dev_kvm_exists(checks):
    assert checks["dev_kvm"]


def test_headers_match_the_kernel(kernel, checks):
    assert checks["modules_build"], f"/lib/modules/{kernel[2]}/build has no autoconf.h inside"
    assert kernel[2] in checks["bcc_kernel_source"]


def test_runs_in_the_project_with_its_venv(checks):
    assert checks["cwd"] == str(ROOT)
    assert checks["python"] == str(VENV_PYTHON)


def test_bcc_kprobe_attaches_and_fires_on_arch_prctl(checks):
    assert "bcc_error" not in checks, checks["bcc_error"]
    assert checks["kprobe"] == "fpu_xstate_prctl"
    assert checks["arch_prctl"][0] == 0  # ARCH_GET_XCOMP_PERM succeeded
    assert checks["kprobe_hits"] == 1
    assert checks["kprobe_option"] == ARCH_GET_XCOMP_PERM


def test_status_output_and_environment_come_back(kernel, run_in_kernel):
    script = 'echo "out $CI $XSTATE_VM"; echo err >&2; pwd; exit 7'
    status, output = run_in_kernel(kernel[0], "sh", "-c", script, env={"CI": "marker"})
    assert status == 7
    assert output.splitlines() == [f"out marker {kernel[2]}", "err", str(ROOT)]


def test_timeout_is_reported_with_the_console(run_in_kernel):
    # Shorter than a boot: the harness must stop QEMU and say so, not hang.
    with pytest.raises(VMHarnessError) as e:
        run_in_kernel(KERNELS[0], "sleep", "600", timeout=2)
    assert e.value.status == EXIT_TIMEOUT
    assert "timed out after 2" in e.value.log
