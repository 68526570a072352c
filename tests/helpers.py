"""Small builders for events (spec/events.md) and a driver for the policy engine.

Every builder fills the common fields (v=1, a rising ts, TGID, and for vCPU
events VM/vCPU 0); keyword arguments override them. Masks may be ints or
"0x..." strings, as on the wire.
"""

import itertools
from pathlib import Path

from agent.events import model as m
from agent.policy.engine import Engine, Violation
from agent.xstate import DEFAULT_DYN

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"

TGID = 4242
VM = "vm-1"

# A Sapphire Rapids style XCR0 without and with AMX: x87, SSE, AVX, AVX-512, PKRU (+ XTILECFG/XTILEDATA).
NO_AMX = 0x2E7
AMX = 0x602E7
TILEDATA = 0x40000
TILECFG = 0x20000
TILE = 0x60000
GUEST_SIZE = 11008

_ts = itertools.count(1000, 10)


def _common(kw: dict) -> dict:
    kw.setdefault("v", 1)
    kw.setdefault("ts", next(_ts))
    kw.setdefault("tgid", TGID)
    return kw


def _on_vcpu(kw: dict) -> dict:
    kw.setdefault("vm", VM)
    kw.setdefault("vcpu", 0)
    return _common(kw)


def perm(option, *, feature=None, mask=None, ret=0, **kw):
    return m.Perm(option=option, feature=feature, mask=mask, ret=ret, **_common(kw))


def req_guest(feature=18, *, ret=0, **kw):
    return perm("REQ_XCOMP_GUEST_PERM", feature=feature, ret=ret, **kw)


def get_guest(mask, *, ret=0, **kw):
    return perm("GET_XCOMP_GUEST_PERM", mask=mask if ret == 0 else None, ret=ret, **kw)


def req_host(feature=18, *, ret=0, **kw):
    return perm("REQ_XCOMP_PERM", feature=feature, ret=ret, **kw)


def get_host(mask, *, ret=0, **kw):
    return perm("GET_XCOMP_PERM", mask=mask if ret == 0 else None, ret=ret, **kw)


def vcpu_create(*, ret=0, **kw):
    return m.VcpuCreate(ret=ret, **_on_vcpu(kw))


def vcpu_destroy(**kw):
    return m.VcpuDestroy(**_on_vcpu(kw))


def cpuid(supported, *, ret=0, **kw):
    return m.Cpuid(xcr0_supported=supported, ret=ret, **_on_vcpu(kw))


def xcr0(value, *, source="guest", ret=0, **kw):
    return m.Xcr0(value=value, source=source, ret=ret, **_on_vcpu(kw))


def xfd(value, *, source="guest", ret=0, **kw):
    return m.Xfd(value=value, source=source, ret=ret, **_on_vcpu(kw))


def xfd_err(value, *, source="nm", ret=0, **kw):
    return m.XfdErr(value=value, source=source, ret=ret, **_on_vcpu(kw))


def fpstate(features, *, guest=True, ret=0, size=None, **kw):
    if guest:
        return m.Fpstate(guest=True, features=features, ret=ret, size=size, **_on_vcpu(kw))
    return m.Fpstate(guest=False, features=features, ret=ret, size=size, **_common(kw))


def fpu_load(guest_features, *, xfd=0, guest_perm=None, guest_size=None, **kw):
    return m.FpuLoad(guest_features=guest_features, xfd=xfd, guest_perm=guest_perm,
                     guest_size=guest_size, **_on_vcpu(kw))


def passthrough(enabled=True, **kw):
    return m.Passthrough(enabled=enabled, **_on_vcpu(kw))


def xsave(op, xstate_bv, *, size=GUEST_SIZE, ret=0, **kw):
    return m.Xsave(op=op, xstate_bv=xstate_bv, size=size, ret=ret, **_on_vcpu(kw))


def exec_(**kw):
    return m.Exec(**_common(kw))


def exit_(**kw):
    return m.Exit(**_common(kw))


class Host:
    """An engine fed one event at a time; remembers every violation."""

    def __init__(self, profile="upstream", dyn=DEFAULT_DYN, **caps):
        self.profile = profile
        self.engine = Engine(profile=profile, dyn=dyn, **caps)
        self.violations: list[Violation] = []

    def __call__(self, *events) -> list[Violation]:
        """Judge `events` in order; the violations of these events only."""
        out = []
        for ev in events:
            out.extend(self.engine.judge(ev))
        self.violations.extend(out)
        return out

    def ids(self, *events) -> list[str]:
        return [v.rule.id for v in self(*events)]

    def one(self, ev, rule_id: str) -> Violation:
        """The violation of `rule_id` that `ev` causes (it must cause exactly one)."""
        found = [v for v in self(ev) if v.rule.id == rule_id]
        assert len(found) == 1, f"expected one {rule_id}, got {[v.rule.id for v in self.violations[-5:]]}"
        return found[0]

    @property
    def upstream(self) -> bool:
        return self.profile == "upstream"

    def amx_vcpu(self, vcpu=0, **kw):
        """A healthy AMX vCPU: permission exactly known with AMX, CPUID and XCR0 with AMX, buffer allocated."""
        out = self.ids(
            get_guest(AMX, **kw), vcpu_create(vcpu=vcpu, **kw), cpuid(AMX, vcpu=vcpu, **kw),
            fpstate(TILE, vcpu=vcpu, size=GUEST_SIZE, **kw), xcr0(AMX, vcpu=vcpu, **kw),
        )
        assert out == [], out

    def enable_passthrough(self, vcpu=0, **kw):
        """Switch XFD passthrough on the way the profile's kernel does, without breaking a rule.

        Upstream: the first accepted non-zero XFD write (the guest arms AMX).
        Reference: the seed's precondition, XCR0 & ~XFD holding a dynamic bit (needs XCR0 with AMX, XFD 0).
        """
        if self.upstream:
            out = self.ids(xfd(TILEDATA, vcpu=vcpu, **kw), passthrough(True, vcpu=vcpu, **kw))
        else:
            out = self.ids(passthrough(True, vcpu=vcpu, **kw))
        assert out == [], out


def lines_of(path) -> list[str]:
    """Event lines of a sample, without comments and blank lines."""
    return [ln for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
