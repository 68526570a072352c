"""Typed events of spec/events.md, version 1.

msgspec validates types, ranges and choices in C while it decodes, which is
what lets replay judge more than half a million events a second. Masks are
held as ints; on the wire they are "0x..." strings (ints are accepted too),
converted in __post_init__ because msgspec has no hex-integer type. That is
the one piece of Python run per event while decoding, so it is kept to a
dict lookup per mask (_MASKS).
"""

from typing import Annotated, ClassVar, Literal, Union

from msgspec import Meta, Struct

from agent.xstate import MASK64, PERM_LOCKED

Pid = Annotated[int, Meta(ge=0, le=2**31 - 1)]
VcpuId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Ret = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]
Size = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Feature = Annotated[int, Meta(ge=0, le=63)]
Comm = Annotated[str, Meta(max_length=64)]
VmId = Annotated[str, Meta(min_length=1, max_length=256)]
# Decoded as either; __post_init__ turns it into an int in [0, 2^64-1].
Mask = Union[int, str]

PERM_OPTIONS = (
    "GET_XCOMP_SUPP",
    "GET_XCOMP_PERM",
    "REQ_XCOMP_PERM",
    "GET_XCOMP_GUEST_PERM",
    "REQ_XCOMP_GUEST_PERM",
)
Option = Literal[PERM_OPTIONS]


def _parse_mask(value) -> int | None:
    """The value of a mask as written (a '0x' hex string or an int), None if it is not one."""
    if type(value) is int:
        return value if 0 <= value <= MASK64 else None
    if isinstance(value, str) and value[:2] in ("0x", "0X") and 2 < len(value) and value.isascii() \
            and value[2:].isalnum():
        try:
            number = int(value[2:], 16)
        except ValueError:
            return None
        return number if number <= MASK64 else None
    return None


def _mask(value: Mask, field: str) -> int:
    number = _parse_mask(value)
    if number is None:
        raise ValueError(
            f"Expected a mask (a '0x' hex string or an integer from 0 to 2^64-1), got {value!r} - at `$.{field}`"
        )
    return number


class _MaskCache(dict):
    """Mask strings seen so far -> their values.

    A log repeats a handful of masks: one dict lookup instead of parsing takes
    most of the cost out of __post_init__, which runs for every event. Only
    valid strings of at most KEY_MAX characters are kept (a 64-bit mask with
    some leading zeros; longer ones are parsed each time), and no more than
    LIMIT, so input cannot grow it.
    Ints are checked every time (never cached: True == 1 must stay an error).
    A miss that is not a valid mask raises KeyError; the caller then calls
    _mask() for the error message with the field's name.
    """

    LIMIT = 4096
    KEY_MAX = 34

    def __missing__(self, value):
        number = _parse_mask(value)
        if number is None:
            raise KeyError(value)
        if type(value) is str and len(value) <= self.KEY_MAX and len(self) < self.LIMIT:
            self[value] = number
        return number


_MASKS = _MaskCache()
# Every bit but the kernel's lock flag, computed once.
_UNLOCKED = MASK64 & ~PERM_LOCKED


def _hex(value: Mask, field: str) -> int:
    """A mask's value: known from _MASKS or parsed there, else ValueError naming the field."""
    try:
        return _MASKS[value]
    except (KeyError, TypeError):
        return _mask(value, field)


# The kinds of nearly every event do _hex() inline: a call costs more than the lookup.

def _value_post_init(self):
    """__post_init__ of the kinds whose mask is `value`."""
    try:
        self.value = _MASKS[self.value]
    except (KeyError, TypeError):
        self.value = _mask(self.value, "value")


# None defaults with non-optional types: a field may be absent, but an
# explicit null is a wrong type (spec: "a wrong type ... is an input error").
class Event(Struct, tag_field="kind", kw_only=True, gc=False):
    """Fields common to every kind. Subclasses add theirs."""

    kind: ClassVar[str]
    MASKS: ClassVar[tuple[str, ...]] = ()
    v: Literal[1]
    ts: Annotated[int, Meta(ge=0)]
    tgid: Pid
    tid: Pid = None
    comm: Comm = None


class VcpuEvent(Event):
    vm: VmId
    vcpu: VcpuId


class Perm(Event, tag="perm"):
    kind = "perm"
    MASKS = ("mask",)
    option: Option
    ret: Ret
    feature: Feature = None
    mask: Mask = None

    def __post_init__(self):
        if self.mask is not None:
            self.mask = _hex(self.mask, "mask")


class VcpuCreate(VcpuEvent, tag="vcpu_create"):
    kind = "vcpu_create"
    ret: Ret


class VcpuDestroy(VcpuEvent, tag="vcpu_destroy"):
    kind = "vcpu_destroy"


class Cpuid(VcpuEvent, tag="cpuid"):
    kind = "cpuid"
    MASKS = ("xcr0_supported",)
    xcr0_supported: Mask
    ret: Ret

    def __post_init__(self):
        self.xcr0_supported = _hex(self.xcr0_supported, "xcr0_supported")


class Xcr0(VcpuEvent, tag="xcr0"):
    kind = "xcr0"
    MASKS = ("value",)
    value: Mask
    source: Literal["guest", "host"]
    ret: Ret

    __post_init__ = _value_post_init


class Xfd(VcpuEvent, tag="xfd"):
    kind = "xfd"
    MASKS = ("value",)
    value: Mask
    source: Literal["guest", "host"]
    ret: Ret

    __post_init__ = _value_post_init


class XfdErr(VcpuEvent, tag="xfd_err"):
    kind = "xfd_err"
    MASKS = ("value",)
    value: Mask
    source: Literal["nm", "guest", "host"]
    ret: Ret

    __post_init__ = _value_post_init


class Fpstate(Event, tag="fpstate"):
    kind = "fpstate"
    MASKS = ("features",)
    guest: bool
    features: Mask
    ret: Ret
    size: Size = None
    vm: VmId = None
    vcpu: VcpuId = None

    def __post_init__(self):
        self.features = _hex(self.features, "features")
        if self.guest and (self.vm is None or self.vcpu is None):
            missing = "vm" if self.vm is None else "vcpu"
            raise ValueError(f"Object missing required field `{missing}` (required when `guest` is true)")


class FpuLoad(VcpuEvent, tag="fpu_load"):
    kind = "fpu_load"
    MASKS = ("guest_features", "xfd", "guest_perm")
    guest_features: Mask
    xfd: Mask
    guest_size: Size = None
    guest_perm: Mask = None

    def __post_init__(self):
        # _hex() inline (see _value_post_init).
        try:
            self.guest_features = _MASKS[self.guest_features]
        except (KeyError, TypeError):
            self.guest_features = _mask(self.guest_features, "guest_features")
        try:
            self.xfd = _MASKS[self.xfd]
        except (KeyError, TypeError):
            self.xfd = _mask(self.xfd, "xfd")
        if self.guest_perm is not None:
            # The spec says producers drop the kernel's lock flag; never let it count as a feature.
            self.guest_perm = _hex(self.guest_perm, "guest_perm") & _UNLOCKED


class Passthrough(VcpuEvent, tag="passthrough"):
    kind = "passthrough"
    enabled: bool


class Xsave(VcpuEvent, tag="xsave"):
    kind = "xsave"
    MASKS = ("xstate_bv",)
    op: Literal["get", "set"]
    xstate_bv: Mask
    size: Size
    ret: Ret

    def __post_init__(self):
        self.xstate_bv = _hex(self.xstate_bv, "xstate_bv")


class Exec(Event, tag="exec"):
    kind = "exec"


class Exit(Event, tag="exit"):
    kind = "exit"


EVENT_TYPES = (
    Perm, VcpuCreate, VcpuDestroy, Cpuid, Xcr0, Xfd, XfdErr, Fpstate, FpuLoad, Passthrough, Xsave, Exec, Exit,
)
KINDS = tuple(t.kind for t in EVENT_TYPES)
AnyEvent = Union[EVENT_TYPES]
