"""Python side of tests/vm/run-kernel: run commands, or a whole pytest
session, inside a Debian kernel booted under QEMU (software emulation).

    from harness import KERNELS, run_in_kernel, run_pytest_in_kernel

    status, output = run_in_kernel("6.12", "uname", "-r")
    status, output = run_pytest_in_kernel("6.1", "tests/live", "-k", "kprobe")

Paths come from this file's location, so a fresh clone anywhere works: the
guest sees the host's root (read-only) at the same paths.
"""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN_KERNEL = ROOT / "tests" / "vm" / "run-kernel"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
CACHE = Path(os.environ.get("XSTATE_VM_CACHE", "/var/cache/xstate-agent/kernels"))

# The kernel lines tested: Debian 12's own (6.1) and the newer one it ships
# in bookworm-security (6.12); each word means the newest build apt knows.
KERNELS = ("6.1", "6.12")

EXIT_TIMEOUT = 124
EXIT_HARNESS = 125
DEFAULT_TIMEOUT = 600.0


class VMHarnessError(RuntimeError):
    """The harness, not the command, failed: timeout (124) or no result (125)."""

    def __init__(self, status: int, log: str):
        what = "timed out" if status == EXIT_TIMEOUT else "failed"
        super().__init__(f"run-kernel {what} (exit {status}):\n{log}")
        self.status, self.log = status, log


class VMResult(tuple):
    """(status, output), with .log: run-kernel's own messages (and the
    command's stderr when it was not merged into the output)."""

    def __new__(cls, status: int, output: str, log: str):
        self = super().__new__(cls, (status, output))
        self.log = log
        return self

    status = property(lambda self: self[0])
    output = property(lambda self: self[1])


def missing() -> str | None:
    """Why the harness cannot run on this machine, or None."""
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("apt-get", "apt"),
                      ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            return f"{tool} missing (package {pkg}; scripts/install-deps.sh installs it)"
    if not os.path.isfile("/bin/busybox"):
        return "/bin/busybox missing (package busybox-static; scripts/install-deps.sh installs it)"
    if not os.access(CACHE if CACHE.exists() else CACHE.parent if CACHE.parent.exists() else "/var/cache",
                     os.W_OK):
        return f"cannot write the kernel cache {CACHE} (run as root, or set XSTATE_VM_CACHE)"
    return None


def resolve(pkg: str) -> tuple[str, str, str]:
    """KERNEL_PKG (a package name or a line such as 6.1) -> (package, version, release)."""
    p = subprocess.run([str(RUN_KERNEL), "--resolve", pkg], capture_output=True, text=True)
    if p.returncode != 0:
        raise VMHarnessError(p.returncode, p.stderr)
    name, version, release = p.stdout.split()
    return name, version, release


def kernel_config(pkg: str) -> dict[str, str]:
    """CONFIG_* of the kernel package (its /boot/config-*), prepared in the cache."""
    p = subprocess.run([str(RUN_KERNEL), "--prepare", pkg], capture_output=True, text=True)
    if p.returncode != 0:
        raise VMHarnessError(p.returncode, p.stderr)
    _, _, release = p.stdout.split()
    config = {}
    for line in (CACHE / release / "root" / "boot" / f"config-{release}").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            config[key] = value
    return config


def run_in_kernel(pkg: str, *cmd: str, timeout: float = DEFAULT_TIMEOUT, cwd: str | os.PathLike | None = None,
                  env: dict[str, str] | None = None, merge_stderr: bool = True, rw=(),
                  extra_args=(), check_harness: bool = True) -> VMResult:
    """Boot `pkg` and run `cmd` inside: (status, output).

    cwd defaults to the project directory; env adds variables to those the
    guest always gets (PATH, CI, HOME, BCC_KERNEL_SOURCE for this kernel,
    XSTATE_VM=<release>); rw lists host directories shared writable. With
    merge_stderr (the default) the output holds stdout and stderr as they
    interleaved. A timeout or a harness failure raises VMHarnessError with
    the console's tail, unless check_harness is false (then its status,
    124 or 125, comes back).
    """
    args = [str(RUN_KERNEL), "--verbose", "--timeout", str(timeout)]
    if cwd is not None:
        args += ["--cwd", str(cwd)]
    for k, v in (env or {}).items():
        args += ["--env", f"{k}={v}"]
    for d in rw:
        args += ["--rw", str(d)]
    if merge_stderr:
        args.append("--merge-stderr")
    args += [*extra_args, pkg, "--", *cmd]
    # The host-side limit is only a backstop: run-kernel times out itself and
    # reports why; downloads and the initramfs come before its clock starts.
    p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout + 900)
    output = p.stdout.decode(errors="replace")
    log = p.stderr.decode(errors="replace")
    if check_harness and p.returncode in (EXIT_TIMEOUT, EXIT_HARNESS):
        raise VMHarnessError(p.returncode, log + ("\noutput so far:\n" + output[-4000:] if output else ""))
    return VMResult(p.returncode, output, log)


def run_pytest_in_kernel(pkg: str, *pytest_args: str, timeout: float = DEFAULT_TIMEOUT, **kw) -> VMResult:
    """One boot, one pytest session inside (the project's venv), e.g. a whole
    test module against the kprobe backend. The root is read-only there:
    the cache provider is off; the tests can tell where they run from
    XSTATE_VM (the kernel release)."""
    return run_in_kernel(pkg, str(VENV_PYTHON), "-m", "pytest", "-p", "no:cacheprovider", *pytest_args,
                         timeout=timeout, **kw)
