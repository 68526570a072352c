"""The policy engine: judges events in order, keeps the state the rules need."""

from collections import Counter

from agent.events import (
    Cpuid, Event, Exec, Exit, Fpstate, FpuLoad, Passthrough, Perm, VcpuCreate, VcpuDestroy,
    Xcr0, Xfd, XfdErr, Xsave,
)
from agent.policy.profiles import UPSTREAM, make_profile
from agent.policy.rules import RULES, Rule
from agent.policy.state import DEFAULT_MAX_PROCESSES, DEFAULT_MAX_VCPUS, Tracker
from agent.xstate import DEFAULT_DYN, request_mask

_GUEST_SIDE = ("guest", "nm")


class Violation:
    """One broken rule, with the event that broke it."""

    __slots__ = ("rule", "event", "message")

    def __init__(self, rule: Rule, event: Event, message: str):
        self.rule = rule
        self.event = event
        self.message = message

    def to_dict(self, file: str | None = None, line: int | None = None) -> dict:
        ev = self.event
        return {"rule": self.rule.id, "severity": self.rule.severity, "ts": ev.ts, "tgid": ev.tgid,
                "vm": getattr(ev, "vm", None), "vcpu": getattr(ev, "vcpu", None), "kind": ev.kind,
                "file": file, "line": line, "message": self.message}


NONE: tuple = ()


class Engine:
    def __init__(self, profile: str = UPSTREAM, dyn: int = DEFAULT_DYN,
                 max_processes: int = DEFAULT_MAX_PROCESSES, max_vcpus: int = DEFAULT_MAX_VCPUS):
        self.profile = make_profile(profile, dyn)
        self.rules = tuple(r for r in RULES if self.profile.name in r.profiles)
        self.state = Tracker(max_processes, max_vcpus)
        # Refused operations are counted, not judged (but for the rules about refusals).
        self.refused: Counter = Counter()
        self._checks = {}
        for r in self.rules:
            for kind in r.kinds:
                self._checks.setdefault(kind, []).append((r, r.check))
        handlers = {
            Perm: self._perm, VcpuCreate: self._vcpu_create, VcpuDestroy: self._vcpu_destroy,
            Cpuid: self._cpuid, Xcr0: self._xcr0, Xfd: self._xfd, XfdErr: self._xfd_err,
            Fpstate: self._fpstate, FpuLoad: self._fpu_load, Passthrough: self._passthrough,
            Xsave: self._xsave, Exec: self._exec, Exit: self._exit,
        }
        self._handlers = {t: (h, tuple(self._checks.get(t, ()))) for t, h in handlers.items()}

    def judge(self, ev: Event) -> list[Violation] | tuple:
        """Violations that `ev` causes, in rule order; state then moves past it."""
        handler, checks = self._handlers[type(ev)]
        return handler(ev, checks)

    def _run(self, checks, ev, p, c):
        out = NONE
        m = self.profile
        for r, check in checks:
            message = check(ev, p, c, m)
            if message:
                if out is NONE:
                    out = []
                out.append(Violation(r, ev, message))
        return out

    def _vcpu(self, ev):
        """The process and the vCPU of a vCPU event."""
        st = self.state
        p = st.proc(ev.tgid)
        c = st.vcpu(p, ev.vm, ev.vcpu)
        return p, c

    # One handler per kind: check against the state before the event, then update.

    def _perm(self, ev, checks):
        p = self.state.proc(ev.tgid)
        out = self._run(checks, ev, p, None)
        fam = self.profile.family.get(ev.option)
        if ev.ret != 0:
            self.refused["perm"] += 1
        elif fam is not None:
            if ev.option[:3] == "REQ":
                if ev.feature is None:
                    # Something was granted, we cannot say what: the mask is no longer exact.
                    p.exact[fam] = False
                else:
                    bits = request_mask(ev.feature)
                    p.allowed[fam] |= bits
                    p.granted[fam] |= bits
            elif ev.mask is not None:
                p.allowed[fam] = ev.mask
                p.exact[fam] = True
                p.granted[fam] |= ev.mask
        return out

    def _vcpu_create(self, ev, checks):
        p = self.state.proc(ev.tgid)
        if ev.ret == 0:
            self.state.create_vcpu(p, ev.vm, ev.vcpu)
        else:
            self.refused["vcpu_create"] += 1
        return NONE

    def _vcpu_destroy(self, ev, checks):
        self.state.proc(ev.tgid)
        self.state.destroy_vcpu(ev.tgid, ev.vm, ev.vcpu)
        return NONE

    def _cpuid(self, ev, checks):
        p, c = self._vcpu(ev)
        out = self._run(checks, ev, p, c)
        if ev.ret == 0:
            c.supported = ev.xcr0_supported
        else:
            self.refused["cpuid"] += 1
        return out

    def _xcr0(self, ev, checks):
        p, c = self._vcpu(ev)
        out = self._run(checks, ev, p, c)
        if ev.ret == 0:
            c.xcr0 = ev.value
        else:
            self.refused["xcr0"] += 1
        return out

    def _xfd(self, ev, checks):
        p, c = self._vcpu(ev)
        guest = ev.source == "guest"
        if guest and c.passthrough is not False:
            c.xfd = None
        out = self._run(checks, ev, p, c)
        if ev.ret == 0:
            c.xfd = c.last_xfd_write = ev.value
            if ev.value and self.profile.upstream:
                # The kernel drops XFD write interception on the first non-zero write, for good.
                c.passthrough = c.nonzero_xfd = True
            if guest and c.passthrough is not False:
                # The guest goes on running, writing XFD unseen.
                c.xfd = None
        else:
            self.refused["xfd"] += 1
        return out

    def _xfd_err(self, ev, checks):
        p, c = self._vcpu(ev)
        if ev.source in _GUEST_SIDE and c.passthrough is not False:
            c.xfd = None
        out = self._run(checks, ev, p, c)
        if ev.ret == 0:
            c.xfd_err = ev.value
        else:
            self.refused["xfd_err"] += 1
        return out

    def _fpstate(self, ev, checks):
        p = self.state.proc(ev.tgid)
        c = self.state.vcpu(p, ev.vm, ev.vcpu) if ev.guest else None
        out = self._run(checks, ev, p, c)
        if ev.ret != 0:
            self.refused["fpstate"] += 1
        elif c is not None:
            # Unknown before: the buffer now has at least these features.
            c.guest_features = (c.guest_features or 0) | ev.features
        return out

    def _fpu_load(self, ev, checks):
        p, c = self._vcpu(ev)
        out = self._run(checks, ev, p, c)
        c.guest_features = ev.guest_features
        # The guest runs now: with passthrough on (or unknown) it may change XFD unseen.
        c.xfd = ev.xfd if c.passthrough is False else None
        if ev.guest_perm is not None:
            g = self.profile.guest
            p.allowed[g] = ev.guest_perm
            p.exact[g] = True
        return out

    def _passthrough(self, ev, checks):
        p, c = self._vcpu(ev)
        out = self._run(checks, ev, p, c)
        if ev.enabled:
            if c.passthrough is not True:
                # Switched on in a guest trap, the guest resumes and may write XFD unseen
                # from now on: XFD is known again only from a host write (spec/policy.md).
                c.xfd = None
            c.passthrough = True
        else:
            c.passthrough = False
            c.xfd = c.last_xfd_write = None
        return out

    def _xsave(self, ev, checks):
        p, c = self._vcpu(ev)
        out = self._run(checks, ev, p, c)
        if ev.ret != 0:
            self.refused["xsave"] += 1
        return out

    def _exec(self, ev, checks):
        p = self.state.proc(ev.tgid)
        self.state.forget_vcpus(p)
        p.reset_permissions()
        return NONE

    def _exit(self, ev, checks):
        self.state.forget(ev.tgid)
        return NONE
