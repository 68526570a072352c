"""A small reader of the running kernel's BTF: byte offsets of struct fields.

The agent's BPF programs are compiled against Debian's 6.1 headers, whatever
kernel runs, so no struct layout may come from a header: every offset of a
kernel field the probes read comes from here and reaches BPF as a -D define.

Only what offset resolution needs is decoded: records are walked once as
32-bit words (every BTF record is a multiple of 4 bytes), names are decoded
lazily, and member lists only for the structs a path goes through.
Format: Documentation/bpf/btf.rst ("Type encoding").
"""

import os
import struct
from array import array
from dataclasses import dataclass

BTF_MAGIC = 0xEB9F
# The running kernel's BTF (vmlinux, and a file per module); XSTATE_AGENT_BTF=DIR reads it from DIR instead
# (tests: a host without BTF).
SYSFS_BTF = os.environ.get("XSTATE_AGENT_BTF", "/sys/kernel/btf")

# Kinds (include/uapi/linux/btf.h).
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

# 32-bit words that follow the 3-word btf_type header: (fixed, per vlen item).
_TRAILER = {
    INT: (1, 0), PTR: (0, 0), ARRAY: (3, 0), STRUCT: (0, 3), UNION: (0, 3),
    ENUM: (0, 2), FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0),
    RESTRICT: (0, 0), FUNC: (0, 0), FUNC_PROTO: (0, 2), VAR: (1, 0),
    DATASEC: (0, 3), FLOAT: (0, 0), DECL_TAG: (1, 0), TYPE_TAG: (0, 0), ENUM64: (0, 3),
}
# Qualifiers and typedefs that stand for the type they point at.
_ALIASES = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BtfError(Exception):
    """BTF is missing, malformed, or lacks a struct or field asked for."""


@dataclass(frozen=True)
class Field:
    """Where a field lies in its outermost struct."""

    bit_offset: int
    bitfield_size: int  # 0 unless a bitfield
    size: int  # bytes of the field's type (for a bitfield, of its storage unit)
    kind: int  # BTF kind of the field's type, qualifiers and typedefs stripped

    @property
    def offset(self) -> int:
        return self.bit_offset // 8


_STRUCTS, _FUNCS, _TYPEDEFS = frozenset((STRUCT, UNION)), frozenset((FUNC,)), frozenset((TYPEDEF,))


class Btf:
    """One BTF blob: vmlinux, or a module's split BTF on top of vmlinux."""

    def __init__(self, data: bytes, name: str = "vmlinux", base: "Btf | None" = None):
        self.name = name
        self.base = base
        if len(data) < 24:
            raise BtfError(f"{name}: BTF too short ({len(data)} bytes)")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
        if magic != BTF_MAGIC or version != 1:
            raise BtfError(f"{name}: not BTF v1 (magic {magic:#x}, version {version})")
        types = data[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strs = data[hdr_len + str_off: hdr_len + str_off + str_len]
        if len(types) != type_len or len(self._strs) != str_len or type_len % 4:
            raise BtfError(f"{name}: truncated or misaligned BTF sections")
        self._words = array("I", types)
        if array("I", b"\1\0\0\0")[0] != 1:  # BTF from sysfs is in host order; we only run on x86
            self._words.byteswap()
        # Split BTF continues base's type ids and string offsets.
        self._first_id = base._next_id if base else 1
        self._str_base = len(base._strs) + base._str_base if base else 0
        self._index = self._walk()
        self._next_id = self._first_id + len(self._index)
        self._by_name: dict[frozenset, dict[str, list[int]]] = {}  # kinds -> name -> [type id]

    @classmethod
    def load(cls, path: str = f"{SYSFS_BTF}/vmlinux", base: "Btf | None" = None) -> "Btf":
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BtfError(f"cannot read BTF {path}: {e.strerror}") from None
        return cls(data, os.path.basename(path), base)

    def _walk(self) -> array:
        """Word index of each type record, in type id order."""
        w, n, at = self._words, len(self._words), 0
        index = array("I")
        trailer = _TRAILER
        while at < n:
            index.append(at)
            info = w[at + 1]
            try:
                fixed, per = trailer[(info >> 24) & 0x1F]
            except KeyError:
                raise BtfError(f"{self.name}: unknown BTF kind {(info >> 24) & 0x1F} at type {self._first_id + len(index) - 1}") from None
            at += 3 + fixed + per * (info & 0xFFFF)
        if at != n:
            raise BtfError(f"{self.name}: type section ends inside a record")
        return index

    # -- low-level access, valid across base and split BTF --

    def _owner(self, tid: int) -> "tuple[Btf, int]":
        btf = self
        while tid < btf._first_id:
            btf = btf.base
        if tid >= btf._next_id:
            raise BtfError(f"{self.name}: type id {tid} out of range")
        return btf, btf._index[tid - btf._first_id]

    def string(self, off: int) -> str:
        btf = self
        while off < btf._str_base:
            btf = btf.base
        off -= btf._str_base
        end = btf._strs.index(b"\0", off)
        return btf._strs[off:end].decode()

    def _record(self, tid: int) -> "tuple[Btf, int, int, int, int, int]":
        """(owner, word index, kind, vlen, kind_flag, size_or_type)."""
        btf, at = self._owner(tid)
        info = btf._words[at + 1]
        return btf, at, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, btf._words[at + 2]

    def kind(self, tid: int) -> int:
        return self._record(tid)[2]

    def name_of(self, tid: int) -> str:
        btf, at = self._owner(tid)
        return self.string(btf._words[at])

    def resolve(self, tid: int) -> int:
        """Strip typedefs and qualifiers."""
        for _ in range(64):
            if tid == 0:
                return 0
            _, _, kind, _, _, ref = self._record(tid)
            if kind not in _ALIASES:
                return tid
            tid = ref
        raise BtfError(f"{self.name}: typedef loop at type {tid}")

    def size_of(self, tid: int) -> int:
        tid = self.resolve(tid)
        if tid == 0:
            return 0
        btf, at, kind, _, _, size = self._record(tid)
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return size
        if kind == PTR:
            return 8
        if kind == ARRAY:
            elem, nelems = btf._words[at + 3], btf._words[at + 5]
            return self.size_of(elem) * nelems
        raise BtfError(f"{self.name}: type {tid} (kind {kind}) has no size")

    def members(self, tid: int):
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        btf, at, kind, vlen, kflag, _ = self._record(tid)
        w = btf._words
        for i in range(at + 3, at + 3 + 3 * vlen, 3):
            off = w[i + 2]
            bits = off >> 24 if kflag else 0
            off = off & 0xFFFFFF if kflag else off
            mtype = w[i + 1]
            if not kflag:  # old-style bitfield: the size sits in the INT encoding
                rt = self.resolve(mtype)
                if rt and self.kind(rt) == INT:
                    ibtf, iat, _, _, _, isize = self._record(rt)
                    enc = ibtf._words[iat + 3]
                    if (enc & 0xFF) != isize * 8 or (enc >> 16) & 0xFF:
                        off += (enc >> 16) & 0xFF
                        bits = enc & 0xFF
            yield self.string(w[i]), mtype, off, bits

    # -- lookup by name --

    def _named(self, kinds: frozenset, name: str) -> list[int]:
        """Ids of named records of `kinds` called `name`, in this BTF and its
        base; an index per set of kinds, built on first lookup."""
        index = self._by_name.get(kinds)
        if index is None:
            index = self._by_name[kinds] = {}
            w, first = self._words, self._first_id
            for i, at in enumerate(self._index):
                if (w[at + 1] >> 24) & 0x1F in kinds and w[at]:
                    index.setdefault(self.string(w[at]), []).append(first + i)
        own = index.get(name, [])
        return (self.base._named(kinds, name) if self.base else []) + own

    def structs_named(self, name: str) -> list[int]:
        """Ids of complete structs and unions called `name`, in this BTF and its base."""
        return self._named(_STRUCTS, name)

    def funcs_named(self, name: str) -> list[int]:
        """Ids of FUNC records called `name`, in this BTF and its base."""
        return self._named(_FUNCS, name)

    def typedefs_named(self, name: str) -> list[int]:
        """Ids of typedefs called `name` (e.g. btf_trace_<tracepoint>), in this BTF and its base."""
        return self._named(_TYPEDEFS, name)

    def func_params(self, name: str) -> "tuple[str, ...] | None":
        """Parameter names of function `name` as its FUNC_PROTO gives them (a
        variadic `...` is the name "..."), or None when this BTF has no FUNC
        of that name. BTF describes the function as compiled: a static function
        the compiler inlined everywhere has no FUNC record."""
        ids = self.funcs_named(name)
        if not ids:
            return None
        btf, at, _, _, _, proto = self._record(ids[-1])
        pbtf, pat, kind, vlen, _, _ = self._record(proto)
        if kind != FUNC_PROTO:
            raise BtfError(f"{self.name}: FUNC {name} does not point at a FUNC_PROTO (kind {kind})")
        w = pbtf._words
        out = []
        for i in range(pat + 3, pat + 3 + 2 * vlen, 2):
            out.append(self.string(w[i]) if w[i] else ("..." if w[i + 1] == 0 else ""))
        return tuple(out)

    def enum_value(self, enum_name: str, name: str) -> int:
        """Value of enumerator `name` of `enum enum_name` (in this BTF or its base)."""
        if self.base:
            try:
                return self.base.enum_value(enum_name, name)
            except BtfError:
                pass
        w, found = self._words, False
        for at in self._index:
            info = w[at + 1]
            kind = (info >> 24) & 0x1F
            if kind not in (ENUM, ENUM64) or not w[at] or self.string(w[at]) != enum_name:
                continue
            found = True
            step = 2 if kind == ENUM else 3
            for i in range(at + 3, at + 3 + step * (info & 0xFFFF), step):
                if self.string(w[i]) == name:
                    value = w[i + 1] if kind == ENUM else w[i + 1] | w[i + 2] << 32
                    signed = info >> 31  # kind_flag: signed enumerators
                    bits = 32 if kind == ENUM else 64
                    return value - (1 << bits) if signed and value >> (bits - 1) else value
        if found:
            raise BtfError(f"enum {enum_name} has no enumerator {name!r} (in {self.name} BTF)")
        raise BtfError(f"enum {enum_name} not in {self.name} BTF")

    def struct_size(self, name: str) -> int:
        ids = self.structs_named(name)
        if not ids:
            raise BtfError(f"struct {name} not in {self.name} BTF")
        return self.size_of(ids[0])

    def field(self, struct_name: str, path: str) -> Field:
        """The field at dotted `path` inside `struct struct_name`; embedded structs
        and anonymous unions are crossed, pointers are not (they need a read)."""
        ids = self.structs_named(struct_name)
        if not ids:
            raise BtfError(f"struct {struct_name} not in {self.name} BTF")
        err = None
        for tid in ids:  # a name may have several definitions; the first that has the path wins
            try:
                return self._field(tid, struct_name, path)
            except BtfError as e:
                err = err or e
        raise err

    def offset(self, struct_name: str, path: str) -> int:
        f = self.field(struct_name, path)
        if f.bitfield_size:
            raise BtfError(f"{struct_name}.{path} is a bitfield ({f.bitfield_size} bits at bit {f.bit_offset}): use field()")
        return f.offset

    def _field(self, tid: int, struct_name: str, path: str) -> Field:
        bit, bits, where = 0, 0, struct_name
        parts = path.split(".")
        for n, part in enumerate(parts):
            if self.kind(tid) not in (STRUCT, UNION):
                raise BtfError(f"{struct_name}.{'.'.join(parts[:n])} is not a struct or union "
                               f"(kind {self.kind(tid)}): cannot take .{part}")
            found = self._member(tid, part)
            if found is None:
                raise BtfError(f"struct {where} has no field {part!r} (in {self.name} BTF)")
            mtype, moff, bits = found
            bit += moff
            tid = self.resolve(mtype)
            where = f"{where}.{part}"
            if n + 1 < len(parts) and self.kind(tid) == PTR:
                raise BtfError(f"{where} is a pointer: read it, then resolve the rest from its target struct")
        return Field(bit, bits, self.size_of(tid), self.kind(tid) if tid else 0)

    def _member(self, tid: int, name: str) -> "tuple[int, int, int] | None":
        """(type, bit offset, bitfield size) of member `name`, searching anonymous members too."""
        for mname, mtype, off, bits in self.members(tid):
            if mname == name:
                return mtype, off, bits
            if not mname:
                inner = self.resolve(mtype)
                if self.kind(inner) in (STRUCT, UNION):
                    found = self._member(inner, name)
                    if found:
                        return found[0], off + found[1], found[2]
        return None


class KernelBtf:
    """vmlinux BTF plus, on demand, module BTF (e.g. /sys/kernel/btf/kvm when
    KVM is a module: kvm_vcpu then lives there, not in vmlinux)."""

    # Modules tried, in order, for a struct vmlinux lacks.
    MODULES = ("kvm", "kvm_intel", "kvm_amd")

    def __init__(self, root: str = SYSFS_BTF):
        self.root = root
        self.vmlinux = Btf.load(os.path.join(root, "vmlinux"))
        self._modules: dict[str, Btf | None] = {}

    def _module(self, name: str) -> "Btf | None":
        if name not in self._modules:
            path = os.path.join(self.root, name)
            self._modules[name] = Btf.load(path, self.vmlinux) if os.path.exists(path) else None
        return self._modules[name]

    def btf_for(self, struct_name: str) -> Btf:
        if self.vmlinux.structs_named(struct_name):
            return self.vmlinux
        for mod in self.MODULES:
            btf = self._module(mod)
            if btf and btf.structs_named(struct_name):
                return btf
        loaded = ["vmlinux"] + [m for m in self.MODULES if self._modules.get(m)]
        raise BtfError(f"struct {struct_name} not in kernel BTF (searched {', '.join(loaded)})")

    def field(self, struct_name: str, path: str) -> Field:
        return self.btf_for(struct_name).field(struct_name, path)

    def offset(self, struct_name: str, path: str) -> int:
        return self.btf_for(struct_name).offset(struct_name, path)

    def has(self, struct_name: str, path: str) -> bool:
        try:
            self.field(struct_name, path)
            return True
        except BtfError:
            return False

    def struct_size(self, struct_name: str) -> int:
        return self.btf_for(struct_name).struct_size(struct_name)

    def func_params(self, name: str, modules: "tuple[str, ...] | None" = None) -> "tuple[str, ...] | None":
        """Parameter names of function `name` from vmlinux BTF, else from the
        KVM modules' BTF (those loaded); None if none of them has it."""
        found = self.vmlinux.func_params(name)
        if found is not None:
            return found
        for mod in self.MODULES if modules is None else modules:
            btf = self._module(mod)
            if btf is not None and (found := btf.func_params(name)) is not None:
                return found
        return None

    def enum_value(self, enum_name: str, name: str) -> int:
        """An enumerator's value, from vmlinux or else the KVM modules' BTF."""
        try:
            return self.vmlinux.enum_value(enum_name, name)
        except BtfError as first:
            for mod in self.MODULES:
                btf = self._module(mod)
                if btf:
                    try:
                        return btf.enum_value(enum_name, name)
                    except BtfError:
                        pass
            raise first from None
