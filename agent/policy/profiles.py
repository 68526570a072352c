"""The two readings of the design: what a profile changes in the policy's semantics."""

from dataclasses import dataclass, field

from agent.policy.state import HOST, GUEST, Proc, VCpu
from agent.xstate import DEFAULT_DYN

UPSTREAM = "upstream"
REFERENCE = "reference"
PROFILES = (UPSTREAM, REFERENCE)


# Slots and a plain `upstream` field: rules read these on nearly every event.
@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    dyn: int = DEFAULT_DYN
    # Which permission mask each arch_prctl option reads or grows. The
    # reference design has one mask for both uses (the seed's
    # dynamic_state_perm); upstream keeps perm and guest_perm apart.
    family: dict = field(default_factory=dict)
    guest: int = GUEST
    upstream: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "upstream", self.name == UPSTREAM)

    def allowed(self, p: Proc) -> int | None:
        """The allowed dynamic set, or None while it is not exactly known."""
        g = self.guest
        return p.allowed[g] & self.dyn if p.exact[g] else None

    def supported(self, p: Proc, c: VCpu) -> int | None:
        """Most the vCPU's effective supported mask can be (None: unknown).

        Reference: the seed masks guest_supported_xcr0 by the permission, so
        a dynamic bit drops out only when the permission is exactly known.
        """
        s = c.supported
        if s is None or self.upstream:
            return s
        a = self.allowed(p)
        return s if a is None else s & (~self.dyn | a)

    def supported_at_least(self, p: Proc, c: VCpu) -> int | None:
        """Least the effective supported mask can be: dynamic bits only once granted."""
        s = c.supported
        if s is None or self.upstream:
            return s
        return s & (~self.dyn | (p.allowed[self.guest] & self.dyn))


def make_profile(name: str, dyn: int = DEFAULT_DYN) -> Profile:
    if name == UPSTREAM:
        family = {"GET_XCOMP_PERM": HOST, "REQ_XCOMP_PERM": HOST,
                  "GET_XCOMP_GUEST_PERM": GUEST, "REQ_XCOMP_GUEST_PERM": GUEST}
        return Profile(UPSTREAM, dyn, family, GUEST)
    if name == REFERENCE:
        family = dict.fromkeys(("GET_XCOMP_PERM", "REQ_XCOMP_PERM", "GET_XCOMP_GUEST_PERM", "REQ_XCOMP_GUEST_PERM"), HOST)
        return Profile(REFERENCE, dyn, family, HOST)
    raise ValueError(f"unknown profile {name!r}: expected one of {', '.join(PROFILES)}")
