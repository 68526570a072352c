"""Just enough of the KVM and arch_prctl ABIs, through ctypes/fcntl, to drive
the real kernel paths the probes watch. Layouts: shared/reference/kernel-notes.md §4."""

import ctypes
import errno
import fcntl
import os

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_XCRS = 0x8188AEA6
KVM_SET_XCRS = 0x4188AEA7

ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
ARCH_GET_XCOMP_GUEST_PERM = 0x1024
ARCH_REQ_XCOMP_GUEST_PERM = 0x1025
SYS_arch_prctl = 158

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def arch_prctl(option: int, arg) -> int:
    """The raw syscall's result: 0 or -errno (what the kernel returned)."""
    r = _libc.syscall(ctypes.c_long(SYS_arch_prctl), ctypes.c_long(option), arg)
    return -ctypes.get_errno() if r == -1 else r


def arch_prctl_get(option: int) -> tuple[int, int]:
    """(ret, mask) of a GET_* option."""
    mask = ctypes.c_uint64(0)
    return arch_prctl(option, ctypes.byref(mask)), mask.value


class CpuidEntry(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32), ("ecx", ctypes.c_uint32),
                ("edx", ctypes.c_uint32), ("padding", ctypes.c_uint32 * 3)]


def cpuid2(entries: list[CpuidEntry]) -> ctypes.Structure:
    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", CpuidEntry * max(len(entries), 1))]
    c = Cpuid2(nent=len(entries))
    for i, e in enumerate(entries):
        c.entries[i] = e
    return c


class Xcr(ctypes.Structure):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class Xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("xcrs", Xcr * 16),
                ("padding", ctypes.c_uint64 * 16)]


assert ctypes.sizeof(CpuidEntry) == 40 and ctypes.sizeof(Xcrs) == 392


def _ioctl(fd: int, cmd: int, arg) -> int:
    """0/the ioctl's value, or -errno."""
    try:
        return fcntl.ioctl(fd, cmd, arg)
    except OSError as e:
        return -e.errno


class Vm:
    """A VM with vCPUs, made through /dev/kvm. Close it to free it in the kernel."""

    def __init__(self):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.fd = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.vcpus: list[int] = []

    def create_vcpu(self, vcpu_id: int) -> int:
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id)
        if fd >= 0:
            self.vcpus.append(fd)
        return fd

    def supported_cpuid(self) -> list[CpuidEntry]:
        n = 64
        while True:
            buf = cpuid2([CpuidEntry()] * n)
            r = _ioctl(self.kvm, KVM_GET_SUPPORTED_CPUID, buf)
            if r != -errno.E2BIG:
                break
            n *= 2
        if r < 0:
            raise OSError(-r, "KVM_GET_SUPPORTED_CPUID")
        return [buf.entries[i] for i in range(buf.nent)]

    @staticmethod
    def set_cpuid(vcpu: int, entries: list[CpuidEntry]) -> int:
        return _ioctl(vcpu, KVM_SET_CPUID2, cpuid2(entries))

    @staticmethod
    def set_xcrs(vcpu: int, pairs: list[tuple[int, int]], nr: int | None = None, flags: int = 0) -> int:
        x = Xcrs(nr_xcrs=len(pairs) if nr is None else nr, flags=flags)
        for i, (xcr, value) in enumerate(pairs):
            x.xcrs[i] = Xcr(xcr, 0, value)
        return _ioctl(vcpu, KVM_SET_XCRS, x)

    @staticmethod
    def get_xcr0(vcpu: int) -> int:
        x = Xcrs()
        fcntl.ioctl(vcpu, KVM_GET_XCRS, x)
        return next(x.xcrs[i].value for i in range(x.nr_xcrs) if x.xcrs[i].xcr == 0)

    def close(self) -> None:
        for fd in self.vcpus + [self.fd, self.kvm]:
            os.close(fd)
        self.vcpus = []
