"""Loads a BCC-compiled function as a BTF raw tracepoint program (tp_btf).

BCC 0.26 compiles and relocates the program (maps included) but can only load
raw tracepoint programs of the plain kind, whose every read of kernel memory
is a helper call (bpf_probe_read_kernel, ~50 ns each on the CI machines). A
tp_btf program reads the kernel objects its BTF-typed arguments point to,
and the current task, with plain loads that the verifier checks against the
kernel's BTF: that is what keeps the raw_syscalls hooks cheap. The program
is loaded here with the bpf() syscall (BPF_PROG_TYPE_TRACING,
BPF_TRACE_RAW_TP, attach_btf_id = the tracepoint's btf_trace_<name> typedef)
and attached with BPF_RAW_TRACEPOINT_OPEN.
"""

import ctypes
import os
import struct

from agent.probes.btf import BtfError, Btf

_NR_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_RAW_TRACEPOINT_OPEN = 17
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_RAW_TP = 23
_LOG_SIZE = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


class BtfProgError(Exception):
    pass


def _bpf(cmd: int, attr: bytearray) -> int:
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    fd = _libc.syscall(_NR_BPF, cmd, buf, len(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return fd


def tracepoint_btf_id(btf: Btf, tracepoint: str) -> int:
    """The BTF id the kernel attaches raw tracepoint `tracepoint` (e.g. sys_exit) by."""
    ids = btf.typedefs_named(f"btf_trace_{tracepoint}")
    if not ids:
        raise BtfError(f"no btf_trace_{tracepoint} in {btf.name} BTF")
    return ids[0]


class TpBtfProgram:
    """One loaded and attached tp_btf program; close() detaches it."""

    def __init__(self, name: str, insns: bytes, btf_id: int):
        self.name = name
        try:
            # Without a verifier log: writing it took 2.5 s of the 2.7 s the loops cost to verify.
            self.prog_fd = self._load(name, insns, btf_id, None)
        except OSError as e:
            log = ctypes.create_string_buffer(_LOG_SIZE)
            try:  # again, for the verifier's reason
                os.close(self._load(name, insns, btf_id, log))
            except OSError:
                pass
            lines = log.value.decode(errors="replace").strip().splitlines()
            raise BtfProgError(f"load {name}: {e.strerror}" + (f": {' '.join(lines[-2:])}" if lines else "")) from None
        # BPF_RAW_TRACEPOINT_OPEN {name = 0 (it is the program's attach_btf_id), prog_fd}
        open_attr = bytearray(16)
        struct.pack_into("QI", open_attr, 0, 0, self.prog_fd)
        try:
            self.link_fd = _bpf(_BPF_RAW_TRACEPOINT_OPEN, open_attr)
        except OSError as e:
            os.close(self.prog_fd)
            raise BtfProgError(f"attach {name}: {e.strerror}") from None

    @staticmethod
    def _load(name: str, insns: bytes, btf_id: int, log) -> int:
        license_ = ctypes.create_string_buffer(b"GPL")
        code = ctypes.create_string_buffer(insns, len(insns))
        # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
        # log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16],
        # prog_ifindex, expected_attach_type (68), ..., attach_btf_id (108).
        attr = bytearray(144)
        struct.pack_into("IIQQIIQII", attr, 0, _BPF_PROG_TYPE_TRACING, len(insns) // 8, ctypes.addressof(code),
                         ctypes.addressof(license_), 1 if log is not None else 0, _LOG_SIZE if log is not None else 0,
                         ctypes.addressof(log) if log is not None else 0, 0, 0)
        attr[48:48 + 15] = name.encode()[:15].ljust(15, b"\0")
        struct.pack_into("I", attr, 68, _BPF_TRACE_RAW_TP)
        struct.pack_into("I", attr, 108, btf_id)
        return _bpf(_BPF_PROG_LOAD, attr)

    def detach(self) -> None:
        if self.link_fd >= 0:
            os.close(self.link_fd)
            self.link_fd = -1

    def close(self) -> None:
        self.detach()
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
