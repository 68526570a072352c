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
        self.state = Tracker(max_processes, max_vcpus)
        # Refused operations are counted, not judged (but for the rules about refusals).
        self.refused: Counter = Counter()
        self._use(make_profile(profile, dyn))
        # The tracker's maps, which judge() reads for nearly every event.
        self._procs = self.state.procs
        self._vcpus = self.state.vcpus
        self._index = self.state.index

    def set_profile(self, profile: str, dyn: int) -> None:
        """Judge the next events against `profile` and `dyn`, keeping every process and vCPU tracked.

        Between two events only (the pipeline's thread). Rules read DYN when they run, so a new DYN
        changes no state. The profiles read some state their own way: one permission mask for both
        arch_prctl families or two, XFD passthrough from the first non-zero XFD write or only from
        its event. On a change of profile that state becomes unknown, as if the agent had just
        started, so that no rule fires on a value learnt under the other reading.
        """
        before = self.profile.name
        self._use(make_profile(profile, dyn))
        if self.profile.name != before:
            for p in self.state.procs.values():
                p.allowed, p.exact, p.granted = [0, 0], [False, False], [0, 0]
            for c in self.state.vcpus.values():
                c.passthrough = c.nonzero_xfd = c.xfd = None

    def _use(self, profile) -> None:
        self.profile = profile
        self.rules = tuple(r for r in RULES if profile.name in r.profiles)
        checks: dict = {}
        for r in self.rules:
            for kind in r.kinds:
                checks.setdefault(kind, []).append((r, r.check))
        # How each kind is judged, in judge(): find the process and vCPU (None: a
        # vCPU event, found in judge() itself), what the event hides before the
        # checks, the checks alone (the loop that finds nothing), the (rule,
        # check) pairs, and the update of the state after the checks.
        vcpu_event = None
        kinds = {
            Perm: (self._proc_of, None, self._perm),
            VcpuCreate: (self._proc_of, None, self._vcpu_create),
            VcpuDestroy: (self._nothing_of, None, self._vcpu_destroy),
            Cpuid: (vcpu_event, None, self._cpuid),
            Xcr0: (vcpu_event, None, self._xcr0),
            Xfd: (vcpu_event, self._xfd_before, self._xfd),
            XfdErr: (vcpu_event, self._xfd_err_before, self._xfd_err),
            Fpstate: (self._fpstate_of, None, self._fpstate),
            FpuLoad: (vcpu_event, None, self._fpu_load),
            Passthrough: (vcpu_event, None, self._passthrough),
            Xsave: (vcpu_event, None, self._xsave),
            Exec: (self._proc_of, None, self._exec),
            Exit: (self._nothing_of, None, self._exit),
        }
        self._kinds = {
            t: (locate, before, tuple(f for _, f in checks.get(t, ())), tuple(checks.get(t, ())), update)
            for t, (locate, before, update) in kinds.items()
        }

    def judge(self, ev: Event) -> list[Violation] | tuple:
        """Violations that `ev` causes, in rule order; state then moves past it."""
        locate, before, fns, pairs, update = self._kinds[type(ev)]
        if locate is None:
            # A vCPU event (nearly every event): Tracker.proc() then Tracker.vcpu(), inline
            # for speed, the vCPU found through Tracker.index and moved by its own key.
            try:
                c = self._index[ev.tgid][ev.vm][ev.vcpu]
            except KeyError:
                st = self.state
                c = st.vcpu(st.proc(ev.tgid), ev.vm, ev.vcpu)
            else:
                key = c.key
                # Tracked, so its process is: the tracker forgets a process's vCPUs with it.
                self._procs.move_to_end(key[0])
                self._vcpus.move_to_end(key)
            p = c.proc
        else:
            p, c = locate(ev)
        if before is not None:
            before(ev, c)
        out = NONE
        m = self.profile
        for check in fns:
            if check(ev, p, c, m):
                # Rare: checks are pure, so run them all again for the messages, in rule order.
                out = [Violation(r, ev, message) for r, f in pairs if (message := f(ev, p, c, m))]
                break
        update(ev, p, c)
        return out

    # Where the events that are not plain vCPU events act.

    def _proc_of(self, ev):
        return self.state.proc(ev.tgid), None

    def _fpstate_of(self, ev):
        p = self.state.proc(ev.tgid)
        return p, self.state.vcpu(p, ev.vm, ev.vcpu) if ev.guest else None

    def _nothing_of(self, ev):
        return None, None

    # What the guest may have done unseen before the event, hidden before the checks.

    def _xfd_before(self, ev, c):
        if ev.source == "guest" and c.passthrough is not False:
            c.xfd = None

    def _xfd_err_before(self, ev, c):
        if ev.source in _GUEST_SIDE and c.passthrough is not False:
            c.xfd = None

    # One update per kind, after the checks.

    def _perm(self, ev, p, c):
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

    def _vcpu_create(self, ev, p, c):
        if ev.ret == 0:
            self.state.create_vcpu(p, ev.vm, ev.vcpu)
        else:
            self.refused["vcpu_create"] += 1

    def _vcpu_destroy(self, ev, p, c):
        self.state.destroy_vcpu(ev.tgid, ev.vm, ev.vcpu)

    def _cpuid(self, ev, p, c):
        if ev.ret == 0:
            c.supported = ev.xcr0_supported
        else:
            self.refused["cpuid"] += 1

    def _xcr0(self, ev, p, c):
        if ev.ret == 0:
            c.xcr0 = ev.value
        else:
            self.refused["xcr0"] += 1

    def _xfd(self, ev, p, c):
        if ev.ret == 0:
            c.xfd = c.last_xfd_write = ev.value
            if ev.value and self.profile.upstream:
                # The kernel drops XFD write interception on the first non-zero write, for good.
                c.passthrough = c.nonzero_xfd = True
            if ev.source == "guest" and c.passthrough is not False:
                # The guest goes on running, writing XFD unseen.
                c.xfd = None
        else:
            self.refused["xfd"] += 1

    def _xfd_err(self, ev, p, c):
        if ev.ret == 0:
            c.xfd_err = ev.value
        else:
            self.refused["xfd_err"] += 1

    def _fpstate(self, ev, p, c):
        if ev.ret != 0:
            self.refused["fpstate"] += 1
        elif c is not None:
            # Unknown before: the buffer now has at least these features.
            c.guest_features = (c.guest_features or 0) | ev.features

    def _fpu_load(self, ev, p, c):
        c.guest_features = ev.guest_features
        # The guest runs now: with passthrough on (or unknown) it may change XFD unseen.
        c.xfd = ev.xfd if c.passthrough is False else None
        if ev.guest_perm is not None:
            g = self.profile.guest
            p.allowed[g] = ev.guest_perm
            p.exact[g] = True

    def _passthrough(self, ev, p, c):
        if ev.enabled:
            if c.passthrough is not True:
                # Switched on in a guest trap, the guest resumes and may write XFD unseen
                # from now on: XFD is known again only from a host write (spec/policy.md).
                c.xfd = None
            c.passthrough = True
        else:
            c.passthrough = False
            c.xfd = c.last_xfd_write = None

    def _xsave(self, ev, p, c):
        if ev.ret != 0:
            self.refused["xsave"] += 1

    def _exec(self, ev, p, c):
        self.state.forget_vcpus(p)
        p.reset_permissions()

    def _exit(self, ev, p, c):
        self.state.forget(ev.tgid)
