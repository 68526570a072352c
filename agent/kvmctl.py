"""Just enough of the KVM and arch_prctl ABIs, through ctypes/fcntl, to drive
the real kernel paths the probes watch (xstate-agent selftest, and the live tests).
Layouts: shared/reference/kernel-notes.md §4."""

import ctypes
import errno
import fcntl
import mmap
import os

KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_GET_MSRS = 0xC008AE88
KVM_SET_MSRS = 0x4008AE89
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_XSAVE = 0x9000AEA4
KVM_SET_XSAVE = 0x5000AEA5
KVM_GET_XCRS = 0x8188AEA6
KVM_SET_XCRS = 0x4188AEA7
KVM_GET_XSAVE2 = 0x9000AECF

KVM_CAP_XSAVE2 = 208
KVM_EXIT_HLT = 5
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_INTERNAL_ERROR = 17

MSR_IA32_XFD = 0x1C4
MSR_IA32_XFD_ERR = 0x1C5

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


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def msrs(pairs: list[tuple[int, int]]) -> ctypes.Structure:
    class Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                    ("entries", MsrEntry * max(len(pairs), 1))]
    m = Msrs(nmsrs=len(pairs))
    for i, (index, data) in enumerate(pairs):
        m.entries[i] = MsrEntry(index, 0, data)
    return m


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16)] + \
        [(n, ctypes.c_uint8) for n in ("type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable", "padding")]


class Dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [(n, Segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + \
        [("gdt", Dtable), ("idt", Dtable)] + \
        [(n, ctypes.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")] + \
        [("interrupt_bitmap", ctypes.c_uint64 * 4)]


class MemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


assert ctypes.sizeof(CpuidEntry) == 40 and ctypes.sizeof(Xcrs) == 392 and ctypes.sizeof(MsrEntry) == 16
assert ctypes.sizeof(Regs) == 144 and ctypes.sizeof(Sregs) == 312 and ctypes.sizeof(MemoryRegion) == 32

# XSAVE header in an XSAVE image (standard format, as KVM_GET/SET_XSAVE use it).
XSTATE_BV_OFFSET = 512
XCOMP_BV_OFFSET = 520


def xstate_bv(image: bytes) -> int:
    return int.from_bytes(image[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8], "little")


def with_xstate_bv(image: bytes, bv: int) -> bytes:
    return image[:XSTATE_BV_OFFSET] + bv.to_bytes(8, "little") + image[XSTATE_BV_OFFSET + 8:]


def leaf(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    return next((e for e in entries if e.function == function and e.index == index), None)


def leaf_d0(entries: list[CpuidEntry]) -> int:
    """EDX:EAX of CPUID leaf 0xD sub-leaf 0: the XCR0 bits the guest may set."""
    e = leaf(entries, 0xD, 0)
    return e.eax | e.edx << 32


def xstate_standard_size(entries: list[CpuidEntry], features: int) -> int:
    """Size of an XSAVE image in the standard (non-compacted) format holding
    `features`, from CPUID leaf 0xD: legacy area + header (576 bytes), then
    each feature i >= 2 at offset EBX, size EAX of sub-leaf i."""
    size = 576
    for i in range(2, 64):
        if features >> i & 1:
            e = leaf(entries, 0xD, i)
            if e is None or e.eax == 0:
                raise LookupError(f"CPUID leaf 0xD has no sub-leaf for feature {i}")
            size = max(size, e.ebx + e.eax)
    return size


# Real-mode guest code (16-bit: 0x66 makes an operand 32 bits).
def mov32(reg: str, imm: int) -> bytes:
    return bytes([0x66, 0xB8 + ("eax", "ecx", "edx").index(reg)]) + imm.to_bytes(4, "little")


XSETBV = bytes.fromhex("0f01d1")
WRMSR = bytes.fromhex("0f30")
HLT = b"\xf4"
CR4_OSXSAVE = 1 << 18


def raw_ioctl(fd: int, cmd: int, arg: int) -> int:
    """ioctl with a raw pointer argument (e.g. a bad address): 0/value or -errno."""
    _libc.ioctl.restype = ctypes.c_int
    r = _libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(cmd), ctypes.c_void_p(arg))
    return -ctypes.get_errno() if r == -1 else r


def _ioctl(fd: int, cmd: int, arg) -> int:
    """0/the ioctl's value, or -errno."""
    try:
        return fcntl.ioctl(fd, cmd, arg)
    except OSError as e:
        return -e.errno


class Vm:
    """A VM with vCPUs, made through /dev/kvm. Close it to free it in the kernel."""

    MEM_SIZE = 0x10000  # guest physical 0..64 KiB: enough for real-mode code, stack and the IVT

    def __init__(self):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.fd = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.vcpus: list[int] = []
        self.mem: mmap.mmap | None = None
        self.runs: dict[int, mmap.mmap] = {}

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.kvm, KVM_CHECK_EXTENSION, cap)

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

    @staticmethod
    def set_msrs(vcpu: int, pairs: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: the number of entries set (it stops at the first refused), or -errno."""
        return _ioctl(vcpu, KVM_SET_MSRS, msrs(pairs))

    @staticmethod
    def get_msrs(vcpu: int, indices: list[int]) -> tuple[int, list[int]]:
        m = msrs([(i, 0) for i in indices])
        r = _ioctl(vcpu, KVM_GET_MSRS, m)
        return r, [m.entries[i].data for i in range(len(indices))]

    @staticmethod
    def get_xsave(vcpu: int, size: int = 4096, cmd: int = KVM_GET_XSAVE) -> tuple[int, bytes]:
        """(ret, image) of KVM_GET_XSAVE or, with cmd=KVM_GET_XSAVE2, of a `size`-byte KVM_GET_XSAVE2."""
        buf = ctypes.create_string_buffer(size)
        r = _ioctl(vcpu, cmd, buf)
        return r, buf.raw

    @staticmethod
    def set_xsave(vcpu: int, image: bytes) -> int:
        buf = ctypes.create_string_buffer(bytes(image), len(image))
        return _ioctl(vcpu, KVM_SET_XSAVE, buf)

    # -- running a real-mode guest --

    def load(self, code: bytes, at: int = 0x1000) -> None:
        """Map MEM_SIZE bytes of guest memory at guest physical 0 and copy `code` to `at`."""
        if self.mem is None:
            self.mem = mmap.mmap(-1, self.MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
            region = MemoryRegion(slot=0, flags=0, guest_phys_addr=0, memory_size=self.MEM_SIZE,
                                  userspace_addr=addr)
            fcntl.ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        self.mem[at:at + len(code)] = code

    def set_ivt(self, vector: int, handler: int) -> None:
        """Point real-mode interrupt `vector` at segment 0, offset `handler`."""
        self.mem[vector * 4:vector * 4 + 4] = handler.to_bytes(2, "little") + bytes(2)

    def real_mode(self, vcpu: int, rip: int = 0x1000, cr4: int = 0, **regs) -> None:
        """Flat real mode at cs:ip = 0:rip with the given extra registers."""
        sregs = Sregs()
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg = getattr(sregs, name)
            seg.base, seg.selector = 0, 0
        sregs.cr4 |= cr4
        fcntl.ioctl(vcpu, KVM_SET_SREGS, sregs)
        r = Regs(rip=rip, rflags=0x2, rsp=0x8000)
        for name, value in regs.items():
            setattr(r, name, value)
        fcntl.ioctl(vcpu, KVM_SET_REGS, r)

    def run(self, vcpu: int) -> int:
        """KVM_RUN once: the exit reason (KVM_EXIT_*), or -errno if the ioctl failed."""
        if vcpu not in self.runs:
            size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
            self.runs[vcpu] = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        r = _ioctl(vcpu, KVM_RUN, 0)
        if r < 0:
            return r
        return int.from_bytes(self.runs[vcpu][8:12], "little")

    CODE, GP_HANDLER, UD_HANDLER = 0x1000, 0x2000, 0x2010

    def guest(self, vcpu: int, code: bytes, cr4: int = 0) -> tuple[int, int]:
        """Run `code` (which should end in HLT) in real mode from CODE: (exit
        reason, guest RIP after it). A #GP or #UD goes to a handler that
        halts: RIP is then GP_HANDLER + 1 or UD_HANDLER + 1."""
        self.load(code, self.CODE)
        self.load(HLT, self.GP_HANDLER)
        self.load(HLT, self.UD_HANDLER)
        self.set_ivt(13, self.GP_HANDLER)
        self.set_ivt(6, self.UD_HANDLER)
        self.real_mode(vcpu, rip=self.CODE, cr4=cr4)
        reason = self.run(vcpu)
        return reason, self.get_regs(vcpu).rip

    @staticmethod
    def get_regs(vcpu: int) -> Regs:
        r = Regs()
        fcntl.ioctl(vcpu, KVM_GET_REGS, r)
        return r

    def close(self) -> None:
        if self.kvm < 0:
            return
        for m in self.runs.values():
            m.close()
        self.runs = {}
        for fd in self.vcpus + [self.fd, self.kvm]:
            os.close(fd)
        self.vcpus, self.fd, self.kvm = [], -1, -1
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:  # a ctypes view still refers to it; the GC frees it later
                pass
            self.mem = None
