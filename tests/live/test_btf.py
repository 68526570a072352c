"""agent.probes.btf against this machine's real BTF (/sys/kernel/btf)."""

import os
import struct
import time

import pytest

from agent.probes.btf import ARRAY, INT, PTR, STRUCT, Btf, BtfError, KernelBtf
from agent.probes.offsets import ENUMS, FIELDS, resolve, task_guest_perm_offset
from livecheck import require

VMLINUX = "/sys/kernel/btf/vmlinux"


@pytest.fixture(scope="module")
def kbtf():
    require(os.path.exists(VMLINUX), f"needs kernel BTF at {VMLINUX} (CONFIG_DEBUG_INFO_BTF)")
    k = KernelBtf()
    require(k.has("kvm_vcpu", "vcpu_id"), "needs KVM's BTF (built in, or the kvm module loaded)")
    return k


def test_all_offsets_resolve_within_a_second(kbtf):
    t0 = time.perf_counter()
    offsets = resolve(KernelBtf())  # from scratch: parse + every lookup
    elapsed = time.perf_counter() - t0
    assert offsets.errors == {}
    assert set(offsets.values) == set(FIELDS) | set(ENUMS) | {"OFF_TASK_GUEST_PERM"}
    assert elapsed < 1.0, f"BTF load and resolution took {elapsed:.3f} s"


@pytest.mark.parametrize("define", sorted(FIELDS))
def test_each_field_lies_inside_its_struct(kbtf, define):
    struct_name, path = FIELDS[define]
    f = kbtf.field(struct_name, path)
    assert f.bitfield_size == 0
    assert 0 <= f.offset and f.offset + f.size <= kbtf.struct_size(struct_name)
    # Pointers are 8 bytes, kvm_vcpu_arch.regs an array of 8-byte registers,
    # task_struct.comm the 16 bytes read as two u64, every other field we read
    # a scalar of 1-8 bytes.
    if f.kind == ARRAY:
        assert (define, f.size % 8) == ("OFF_VCPU_REGS", 0) or (define, f.size) == ("OFF_TASK_COMM", 16)
    else:
        assert f.size == 8 if f.kind == PTR else f.size in (1, 2, 4, 8)


def test_nested_path_is_the_sum_of_its_steps(kbtf):
    chain = kbtf.offset("kvm_vcpu", "arch") + kbtf.offset("kvm_vcpu_arch", "guest_fpu") \
        + kbtf.offset("fpu_guest", "fpstate")
    assert kbtf.offset("kvm_vcpu", "arch.guest_fpu.fpstate") == chain
    assert kbtf.offset("kvm_vcpu", "arch.xcr0") == kbtf.offset("kvm_vcpu", "arch") + kbtf.offset("kvm_vcpu_arch", "xcr0")
    assert kbtf.field("kvm_vcpu", "arch.guest_fpu.fpstate").kind == PTR


def test_fpstate_layout_is_the_one_every_kernel_has(kbtf):
    # struct fpstate is identical from 5.16 to 7.2 (kernel-notes §2).
    assert [kbtf.offset("fpstate", f) for f in ("size", "user_size", "xfeatures", "user_xfeatures", "xfd")] \
        == [0, 4, 8, 16, 24]
    assert kbtf.offset("fpu_guest", "xfeatures") == 0
    assert kbtf.offset("fpu_state_perm", "__state_perm") == 0


def test_bitfields(kbtf):
    bits = [kbtf.field("fpstate", f) for f in ("is_valloc", "is_guest", "is_confidential", "in_use")]
    assert [b.bitfield_size for b in bits] == [1, 1, 1, 1]
    first = bits[0].bit_offset
    assert first == 32 * 8  # right after xfd
    assert [b.bit_offset for b in bits] == [first, first + 1, first + 2, first + 3]
    with pytest.raises(BtfError, match=r"fpstate\.in_use is a bitfield"):
        kbtf.offset("fpstate", "in_use")


def test_anonymous_unions_and_structs(kbtf):
    # struct qstr { union { struct { u32 hash; u32 len; }; u64 hash_len; }; const unsigned char *name; }
    assert kbtf.offset("qstr", "hash") == 0
    assert kbtf.offset("qstr", "len") == 4
    assert kbtf.offset("qstr", "hash_len") == 0
    assert kbtf.offset("qstr", "name") == 8
    assert kbtf.offset("dentry", "d_name.name") == kbtf.offset("dentry", "d_name") + 8


def test_task_guest_perm(kbtf):
    in_fpu = kbtf.offset("fpu", "guest_perm.__state_perm")
    if kbtf.has("task_struct", "thread.fpu"):  # up to 6.15: task->thread.fpu
        expected = kbtf.offset("task_struct", "thread.fpu") + in_fpu
    else:  # 6.16+: x86_task_fpu(task) = task + sizeof(struct task_struct)
        expected = kbtf.struct_size("task_struct") + in_fpu
    assert task_guest_perm_offset(kbtf) == expected
    assert kbtf.struct_size("task_struct") % 64 == 0  # so struct fpu right after it stays aligned


def test_missing_field_names_struct_and_field(kbtf):
    with pytest.raises(BtfError, match=r"struct kvm_vcpu\.arch has no field 'no_such_field'"):
        kbtf.offset("kvm_vcpu", "arch.no_such_field")
    with pytest.raises(BtfError, match=r"struct no_such_struct not in kernel BTF"):
        kbtf.offset("no_such_struct", "x")
    with pytest.raises(BtfError, match=r"kvm_vcpu\.kvm is a pointer"):
        kbtf.offset("kvm_vcpu", "kvm.vcpus")
    assert not kbtf.has("task_struct", "no_such_field")


def test_missing_field_disables_only_what_needs_it(kbtf, monkeypatch):
    from agent.probes import offsets
    monkeypatch.setitem(offsets.FIELDS, "OFF_VCPU_XCR0", ("kvm_vcpu", "arch.xcr0_renamed"))
    o = resolve(kbtf)
    assert "xcr0_renamed" in o.group_error("kvm_ioctl")
    assert o.group_error("arch_prctl") is None


# ---- split BTF (module BTF on top of vmlinux), with a blob made here -----------

def _split_blob(base: Btf) -> bytes:
    """A module-style split BTF: types continue base's ids, strings base's offsets."""
    strs = b"\0xsa_split\0first\0fps\0xsa_oldbits\0lo\0hi\0"
    base_strs = len(base._strs) + base._str_base

    def soff(name: bytes) -> int:
        return base_strs + strs.index(b"\0" + name + b"\0") + 1

    fpstate = base.structs_named("fpstate")[0]
    first = base._next_id
    words = [
        # first: INT "int"-like, 4 bytes, 32 bits
        0, INT << 24, 4, 32,
        # first+1: STRUCT xsa_split { int first; struct fpstate fps (at byte 64); } kind_flag=1
        soff(b"xsa_split"), (1 << 31) | (STRUCT << 24) | 2, 64 + base.size_of(fpstate),
        soff(b"first"), first, 0,
        soff(b"fps"), fpstate, 64 * 8,
        # first+2: INT with 3 bits at bit 5 (old-style bitfield encoding)
        0, INT << 24, 4, (5 << 16) | 3,
        # first+3: STRUCT xsa_oldbits { int lo; int hi:3 (INT-encoded, at bit 32+5) } kind_flag=0
        soff(b"xsa_oldbits"), (STRUCT << 24) | 2, 8,
        soff(b"lo"), first, 0,
        soff(b"hi"), first + 2, 32,
    ]
    types = struct.pack(f"<{len(words)}I", *words)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    return hdr + types + strs


def test_split_btf_module(kbtf, tmp_path):
    base = kbtf.vmlinux
    (tmp_path / "vmlinux").symlink_to(VMLINUX)
    (tmp_path / "kvm").write_bytes(_split_blob(base))
    k = KernelBtf(str(tmp_path))
    assert k.btf_for("xsa_split").name == "kvm"
    assert k.offset("xsa_split", "first") == 0
    assert k.offset("xsa_split", "fps.xfd") == 64 + 24  # through a base type
    assert k.struct_size("xsa_split") == 64 + base.struct_size("fpstate")
    hi = k.field("xsa_oldbits", "hi")
    assert (hi.bit_offset, hi.bitfield_size) == (32 + 5, 3)
    assert k.offset("fpstate", "xfd") == 24  # base types still found first
    with pytest.raises(BtfError, match=r"struct xsa_split has no field 'nope' \(in kvm BTF\)"):
        k.offset("xsa_split", "nope")


def test_bad_blobs_are_errors():
    with pytest.raises(BtfError, match="too short"):
        Btf(b"\x9f\xeb")
    with pytest.raises(BtfError, match="not BTF"):
        Btf(b"\0" * 32)
    with pytest.raises(BtfError, match="cannot read BTF"):
        Btf.load("/nonexistent/btf")
