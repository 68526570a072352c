"""Run inside a run-kernel guest: what the harness promises, as one JSON line.

Prints a line `GUEST-CHECKS {...}` with the kernel release, kprobe support,
/dev/kvm, and whether a BCC kprobe on the arch_prctl path attached and fired
(with the option it saw). Exits 0 even when a check fails: the test on the
host says which.
"""

import ctypes
import json
import os
import platform
import sys
import time

ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
SYS_arch_prctl = 158

PROGRAM = r"""
#include <uapi/linux/ptrace.h>
BPF_ARRAY(hits, u64, 2);
int on_prctl(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != TGID)
        return 0;
    u64 option = PT_REGS_PARM1(ctx);
    int k0 = 0, k1 = 1;
    u64 *n = hits.lookup(&k0);
    if (n)
        __sync_fetch_and_add(n, 1);
    u64 *o = hits.lookup(&k1);
    if (o)
        *o = option;
    return 0;
}
"""


def arch_prctl(option: int) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    value = ctypes.c_uint64(0)
    ret = libc.syscall(SYS_arch_prctl, ctypes.c_int(option), ctypes.byref(value))
    return ret, value.value


def bcc_check(result: dict) -> None:
    t0 = time.monotonic()
    from bcc import BPF  # python3-bpfcc, seen through the venv's system site packages

    result["bcc_import_s"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    b = BPF(text=PROGRAM.replace("TGID", str(os.getpid())))
    result["bcc_compile_s"] = round(time.monotonic() - t0, 2)
    # fpu_xstate_prctl(option, arg2) on 6.1 and later; the syscall as a fallback
    # (whose first argument is the pt_regs of the syscall, not the option).
    for fn in ("fpu_xstate_prctl", "__x64_sys_arch_prctl"):
        if BPF.ksymname(fn) != -1:
            b.attach_kprobe(event=fn, fn_name="on_prctl")
            result["kprobe"] = fn
            break
    else:
        result["kprobe"] = None
        return
    result["arch_prctl"] = arch_prctl(ARCH_GET_XCOMP_PERM)
    hits = b["hits"]
    result["kprobe_hits"] = hits[ctypes.c_int(0)].value
    result["kprobe_option"] = hits[ctypes.c_int(1)].value
    b.cleanup()


def main() -> int:
    result = {
        "release": platform.release(),
        "python": sys.executable,
        "xstate_vm": os.environ.get("XSTATE_VM"),
        "bcc_kernel_source": os.environ.get("BCC_KERNEL_SOURCE"),
        "kprobes_debugfs": os.path.exists("/sys/kernel/debug/kprobes/list"),
        "kprobe_pmu": os.path.exists("/sys/bus/event_source/devices/kprobe"),
        "dev_kvm": os.path.exists("/dev/kvm"),
        "modules_build": os.path.isfile(f"/lib/modules/{platform.release()}/build/include/generated/autoconf.h"),
        "cwd": os.getcwd(),
    }
    try:
        bcc_check(result)
    except Exception as e:  # noqa: BLE001 - reported to the host's test
        result["bcc_error"] = f"{type(e).__name__}: {e}"
    print("GUEST-CHECKS " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
