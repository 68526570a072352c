"""Rules XS001-XS020 of spec/policy.md as data: id, severity, profiles, text, and a check.

A check sees the event and the state *before* the event changes it, and
returns a message (what was expected, what was seen) or None. Every check
returns None when an input it needs is unknown.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from agent.events import (
    Cpuid, Fpstate, FpuLoad, Passthrough, Perm, Xcr0, Xfd, XfdErr, Xsave,
)
from agent.policy.profiles import REFERENCE, UPSTREAM, Profile
from agent.policy.state import Proc, VCpu
from agent.xstate import FP, SSE, XTILE, XTILECFG, request_mask, xcr0_invalid_reason

CRITICAL = "critical"
WARNING = "warning"
SEVERITIES = (CRITICAL, WARNING)
BOTH = frozenset((UPSTREAM, REFERENCE))
UPSTREAM_ONLY = frozenset((UPSTREAM,))

Check = Callable[[object, Proc, VCpu | None, Profile], str | None]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    profiles: frozenset
    kinds: tuple
    summary: str
    seed: str
    check: Check

    def to_dict(self) -> dict:
        return {"id": self.id, "severity": self.severity, "profiles": sorted(self.profiles),
                "kinds": [k.kind for k in self.kinds], "summary": self.summary, "seed": self.seed}


RULES: list[Rule] = []


def rule(id, severity, profiles, kinds, summary, seed=""):
    def register(check: Check) -> Check:
        RULES.append(Rule(id, severity, profiles, kinds, summary, seed, check))
        return check
    return register


def h(x: int) -> str:
    return f"{x:#x}"


# A guest writes the same few XCR0 values over and over: the answer is cached (in C).
_xcr0_invalid_reason = lru_cache(maxsize=1024)(xcr0_invalid_reason)


@rule("XS001", CRITICAL, BOTH, (Xcr0,),
      "an accepted xcr0 write has dynamic bits outside the process's allowed dynamic set",
      "All dynamic features have to be arch_prctl'd first.")
def xs001(ev, p, c, m):
    if ev.ret == 0 and (a := m.allowed(p)) is not None and (bad := ev.value & m.dyn & ~a):
        return (f"XCR0 {h(ev.value)} was accepted with dynamic features {h(bad)} that the process "
                f"was never granted (allowed dynamic set {h(a)}); expected arch_prctl permission first")


@rule("XS002", CRITICAL, UPSTREAM_ONLY, (Cpuid,),
      "an accepted cpuid exposes dynamic bits outside the allowed dynamic set",
      "every use of vcpu->arch.guest_supported_xcr0 is changed to only include those dynamic-feature bits "
      "that were enabled via arch_prctl")
def xs002(ev, p, c, m):
    if ev.ret == 0 and (a := m.allowed(p)) is not None and (bad := ev.xcr0_supported & m.dyn & ~a):
        return (f"KVM_SET_CPUID2 was accepted exposing dynamic features {h(bad)} (xcr0_supported "
                f"{h(ev.xcr0_supported)}) outside the allowed dynamic set {h(a)}; expected -EPERM")


@rule("XS003", CRITICAL, BOTH, (Xcr0,),
      "an accepted xcr0 write sets bits outside supported | FP",
      "(KVM: guests may not set bits the host cannot save)")
def xs003(ev, p, c, m):
    if ev.ret == 0 and (s := m.supported(p, c)) is not None and (bad := ev.value & ~(s | FP)):
        return (f"XCR0 {h(ev.value)} was accepted with bits {h(bad)} outside the vCPU's supported "
                f"mask {h(s)} | FP")


@rule("XS004", CRITICAL, BOTH, (Xcr0,),
      "an accepted xcr0 value is architecturally invalid",
      "(Intel SDM, XSETBV)")
def xs004(ev, p, c, m):
    if ev.ret == 0 and (why := _xcr0_invalid_reason(ev.value)):
        return f"XCR0 {h(ev.value)} was accepted although {why}; expected #GP / -EINVAL"


@rule("XS005", CRITICAL, BOTH, (XfdErr,),
      "an xfd_err saved on #NM has a dynamic bit n with xcr0[n] = 0",
      "if a dynamic state has XCR0[n]=0, bit n will never be set in XFD_ERR")
def xs005(ev, p, c, m):
    if ev.source == "nm" and c.xcr0 is not None and (bad := ev.value & m.dyn & ~c.xcr0):
        return (f"XFD_ERR {h(ev.value)} saved on #NM has dynamic bits {h(bad)} that XCR0 "
                f"{h(c.xcr0)} does not enable")


@rule("XS006", CRITICAL, BOTH, (XfdErr,),
      "an xfd_err saved on #NM has a bit n with xfd[n] = 0",
      "An attempt to do so will cause an #NM trap and set the bit in XFD_ERR (only when XFD[n]=1)")
def xs006(ev, p, c, m):
    if ev.source == "nm" and c.xfd is not None and (bad := ev.value & ~c.xfd):
        return f"XFD_ERR {h(ev.value)} saved on #NM has bits {h(bad)} that XFD {h(c.xfd)} does not arm"


@rule("XS007", CRITICAL, BOTH, (Xfd,),
      "an accepted xfd write has bits outside supported & DYN",
      "(KVM: XFD may only arm features the guest has)")
def xs007(ev, p, c, m):
    if ev.ret == 0 and (s := m.supported(p, c)) is not None and (bad := ev.value & ~(s & m.dyn)):
        return (f"XFD {h(ev.value)} was accepted with bits {h(bad)} outside the vCPU's dynamic "
                f"supported features {h(s & m.dyn)}")


@rule("XS008", CRITICAL, BOTH, (FpuLoad,),
      "at fpu_load, xcr0 & ~xfd & DYN is not inside guest_features: the guest can touch state with no buffer",
      "if a dynamic state has XCR0[n]=1 and XFD[n]=0, the state for bit n is allocated in guest_fpu")
def xs008(ev, p, c, m):
    # Cheapest test first: a buffer with room for every dynamic bit of XCR0 (the healthy case).
    if c.xcr0 is not None and (dyn := c.xcr0 & m.dyn) & ev.guest_features != dyn \
            and (bad := dyn & ~ev.xfd & ~ev.guest_features):
        return (f"guest runs with XCR0 {h(c.xcr0)} and XFD {h(ev.xfd)}, so it can use dynamic "
                f"features {h(bad)}, but its buffer only has room for {h(ev.guest_features)}")


@rule("XS009", CRITICAL, BOTH, (FpuLoad,),
      "at fpu_load with passthrough on, xcr0 & DYN is not inside guest_features",
      "if passthrough is enabled, the XCR0 write trap must still ensure that dynamic state is allocated "
      "for all bits enabled in guest_xcr0")
def xs009(ev, p, c, m):
    if c.passthrough is True and c.xcr0 is not None and (dyn := c.xcr0 & m.dyn) & ev.guest_features != dyn:
        bad = dyn & ~ev.guest_features
        return (f"XFD passthrough is on and XCR0 {h(c.xcr0)} enables dynamic features {h(bad)}, "
                f"but the guest buffer only has room for {h(ev.guest_features)}")


@rule("XS010", WARNING, BOTH, (Passthrough,),
      "passthrough is switched on before its precondition",
      "If it includes a dynamic state bit, dynamic state is allocated for all bits enabled in guest_xcr0 "
      "and passthrough is started")
def xs010(ev, p, c, m):
    if not ev.enabled or c.passthrough is True:
        return None
    if m.upstream:
        if c.nonzero_xfd is False:
            return ("XFD write interception was dropped although no accepted non-zero XFD write was "
                    "seen on this vCPU; expected it only after the first non-zero write")
    elif c.xcr0 is not None and c.xfd is not None and not c.xcr0 & ~c.xfd & m.dyn:
        return (f"XFD passthrough started while XCR0 {h(c.xcr0)} & ~XFD {h(c.xfd)} holds no dynamic "
                f"feature; expected it only once a dynamic feature is enabled and not disarmed")


@rule("XS011", CRITICAL, BOTH, (Fpstate,),
      "a guest fpstate allocation fails: the vCPU cannot run with the state it was promised")
def xs011(ev, p, c, m):
    if ev.guest and ev.ret != 0:
        return f"guest FPU buffer allocation for features {h(ev.features)} failed with {ev.ret}"


@rule("XS012", CRITICAL, UPSTREAM_ONLY, (Perm,),
      "a REQ_XCOMP_GUEST_PERM succeeds and adds features after a vCPU of that process was created",
      "(upstream's answer to \"arch_prctl can enable AMX for QEMU at any point after KVM_CREATE_VCPU\")")
def xs012(ev, p, c, m):
    if (ev.option == "REQ_XCOMP_GUEST_PERM" and ev.ret == 0 and ev.feature is not None
            and p.vcpu_created and (a := m.allowed(p)) is not None
            and (added := request_mask(ev.feature) & m.dyn & ~a)):
        return (f"ARCH_REQ_XCOMP_GUEST_PERM({ev.feature}) granted {h(added)} after the process created "
                f"a vCPU; expected -EBUSY (guest permissions lock at the first vCPU)")


@rule("XS013", WARNING, UPSTREAM_ONLY, (Perm,),
      "a REQ_XCOMP_GUEST_PERM fails after a vCPU of that process was created: its guests get no AMX")
def xs013(ev, p, c, m):
    if ev.option == "REQ_XCOMP_GUEST_PERM" and ev.ret != 0 and p.vcpu_created:
        return (f"ARCH_REQ_XCOMP_GUEST_PERM({ev.feature}) failed with {ev.ret} after the process created "
                f"a vCPU; the VMM must request guest permission before KVM_CREATE_VCPU")


@rule("XS014", WARNING, BOTH, (Cpuid,),
      "a cpuid is refused while it asks for dynamic bits the process is not allowed")
def xs014(ev, p, c, m):
    if ev.ret != 0 and (a := m.allowed(p)) is not None and (bad := ev.xcr0_supported & m.dyn & ~a):
        return (f"KVM_SET_CPUID2 failed with {ev.ret}: it exposes dynamic features {h(bad)} but the "
                f"process's allowed dynamic set is {h(a)}; the VMM must request guest permission first")


@rule("XS015", CRITICAL, BOTH, (FpuLoad,),
      "at fpu_load with passthrough off, the xfd the guest runs with differs from its last accepted xfd write",
      "the guest can run with XFD set to vcpu->arch.guest_xfd")
def xs015(ev, p, c, m):
    if c.passthrough is False and c.last_xfd_write is not None and ev.xfd != c.last_xfd_write:
        return (f"guest runs with XFD {h(ev.xfd)}, expected {h(c.last_xfd_write)}, the value of its "
                f"last accepted XFD write (interception is on)")


_GET_PERM = {"GET_XCOMP_PERM", "GET_XCOMP_GUEST_PERM"}


@rule("XS016", CRITICAL, BOTH, (Perm,),
      "a successful GET_XCOMP_(GUEST_)PERM reports a mask without a bit granted earlier: permissions only grow",
      "(Linux 5.16-5.17.1 replaced instead of extending the permission, commit 063452fd94d1)")
def xs016(ev, p, c, m):
    if ev.option in _GET_PERM and ev.ret == 0 and ev.mask is not None:
        lost = p.granted[m.family[ev.option]] & ~ev.mask
        if lost:
            return (f"{ev.option} reports {h(ev.mask)}, which lacks {h(lost)} granted earlier "
                    f"with no exec in between; permissions only grow")


@rule("XS017", WARNING, BOTH, (Cpuid,),
      "an accepted cpuid has XTILECFG without XTILEDATA, or the reverse",
      "(Linux 5.17-6.3, commit 55cd57b596e8)")
def xs017(ev, p, c, m):
    tile = ev.xcr0_supported & XTILE
    if ev.ret == 0 and tile and tile != XTILE:
        half, other = ("XTILECFG", "XTILEDATA") if tile == XTILECFG else ("XTILEDATA", "XTILECFG")
        return (f"KVM_SET_CPUID2 exposes {half} without {other} (xcr0_supported "
                f"{h(ev.xcr0_supported)}); a guest that trusts CPUID takes #GP on XSETBV")


@rule("XS018", WARNING, BOTH, (Xsave,),
      "an accepted KVM_SET_XSAVE image holds state that XFD forbids",
      "(Linux 5.17 to commit b45f72177594)")
def xs018(ev, p, c, m):
    if ev.op == "set" and ev.ret == 0 and c.xfd is not None and (bad := ev.xstate_bv & c.xfd & m.dyn):
        return (f"KVM_SET_XSAVE loaded XSTATE_BV {h(ev.xstate_bv)} with features {h(bad)} that XFD "
                f"{h(c.xfd)} disarms; kernels before b45f72177594 take a host #NM")


@rule("XS019", CRITICAL, BOTH, (Xsave,),
      "an accepted KVM_GET_XSAVE image carries state outside supported | FP | SSE",
      "(commit ad856280ddea)")
def xs019(ev, p, c, m):
    if ev.op == "get" and ev.ret == 0 and (s := m.supported(p, c)) is not None \
            and (bad := ev.xstate_bv & ~(s | FP | SSE)):
        return (f"KVM_GET_XSAVE image has XSTATE_BV {h(ev.xstate_bv)} with features {h(bad)} "
                f"outside the vCPU's supported mask {h(s)} | FP | SSE; it breaks migration")


@rule("XS020", WARNING, BOTH, (Xsave,),
      "a legacy 4096-byte KVM_GET_XSAVE is refused on a vCPU with dynamic features: use KVM_GET_XSAVE2",
      "(Cloud Hypervisor issues 5800 and 7533)")
def xs020(ev, p, c, m):
    if ev.op != "get" or ev.ret == 0 or ev.size != 4096:
        return None
    s = m.supported_at_least(p, c)
    dyn = (s or 0) & m.dyn | (c.guest_features or 0) & m.dyn
    if dyn:
        return (f"KVM_GET_XSAVE (4096 bytes) failed with {ev.ret} on a vCPU with dynamic features "
                f"{h(dyn)}; the VMM must use KVM_GET_XSAVE2 to snapshot or migrate it")


RULES.sort(key=lambda r: r.id)


def rules_markdown() -> str:
    """docs/rules.md, generated from the table above."""
    out = ["# Policy rules", "",
           "Generated by `xstate-agent rules --format markdown` from agent/policy/rules.py; "
           "the contract is spec/policy.md (in the project's shared folder).", "",
           "| id | severity | profiles | judged on | fires when | seed or source |",
           "|---|---|---|---|---|---|"]
    for r in RULES:
        profiles = "both" if r.profiles == BOTH else ", ".join(sorted(r.profiles))
        kinds = ", ".join(f"`{k.kind}`" for k in r.kinds)
        cells = (r.id, r.severity, profiles, kinds, _cell(r.summary), _cell(r.seed))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


BY_ID = {r.id: r for r in RULES}
