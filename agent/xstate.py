"""XSAVE feature bits and the architectural rules for XCR0 values (Intel SDM, XSETBV)."""

FP = 1 << 0
SSE = 1 << 1
YMM = 1 << 2
BNDREGS = 1 << 3
BNDCSR = 1 << 4
BND = BNDREGS | BNDCSR
AVX512 = 0b111 << 5
XTILECFG = 1 << 17
XTILEDATA = 1 << 18
XTILE = XTILECFG | XTILEDATA

# XFEATURE_MASK_USER_DYNAMIC in every kernel from 5.16 to 7.2.
DEFAULT_DYN = XTILEDATA

MASK64 = (1 << 64) - 1
# The kernel's FPU_GUEST_PERM_LOCKED flag in guest_perm.__state_perm.
PERM_LOCKED = 1 << 63


def request_mask(feature: int) -> int:
    """Bits that a successful ARCH_REQ_XCOMP_*PERM for `feature` grants."""
    bit = 1 << feature
    return XTILE if bit & XTILEDATA else bit


def xcr0_invalid_reason(xcr0: int) -> str | None:
    """Why XSETBV would refuse `xcr0` on any CPU, or None when it is well-formed."""
    if not xcr0 & FP:
        return "FP (bit 0) is clear"
    if xcr0 & YMM and not xcr0 & SSE:
        return "YMM (bit 2) is set without SSE (bit 1)"
    if xcr0 & BND and xcr0 & BND != BND:
        return "BNDREGS and BNDCSR (bits 3-4) are not both set or both clear"
    if xcr0 & AVX512:
        if xcr0 & AVX512 != AVX512:
            return "only some AVX-512 bits (5-7) are set"
        if not xcr0 & YMM:
            return "AVX-512 bits (5-7) are set without YMM (bit 2)"
    if xcr0 & XTILE and xcr0 & XTILE != XTILE:
        return "XTILECFG and XTILEDATA (bits 17-18) are not both set or both clear"
    return None


def hexmask(value: int) -> str:
    return f"{value:#x}"
