"""Property-based tests of the policy (spec/policy.md) and the event codec (spec/events.md).

(a) Streams from a model of a correct upstream host (tests/hostmodel.py),
    whole or with a random prefix dropped (the agent started late), give
    no violation in the upstream profile.
(b) One bad event injected into such a stream, where the agent can judge
    it, gives exactly the rule(s) the spec says, on that line, and nothing
    before it; replaying the recorded stream gives the live verdicts.
(c) Every valid event survives encode -> decode unchanged, also with masks
    written as plain integers or upper-case hex, and through the stream
    reader with comments and blank lines in between.
"""

import io
import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from agent.events.model import (
    Cpuid, Exec, Exit, FpuLoad, Fpstate, Passthrough, Perm, VcpuCreate, VcpuDestroy,
    Xcr0, Xfd, XfdErr, Xsave,
)
from agent.events.reader import decode_line, read_stream
from agent.events.writer import encode, to_dict
from agent.policy.engine import Engine
from agent.policy.rules import RULES
from agent.replay import Summary, replay
from agent.xstate import AVX512, FP, SSE, XTILE, XTILECFG, XTILEDATA, YMM
from strategies import event_strategy
from hostmodel import (
    AMX_PERM, AMX_SIZE, APX, BNDREGS_BNDCSR, DEFAULT_PERM, DYN, EBUSY, EFAULT, EINVAL, ENOMEM,
    EOPNOTSUPP, EPERM, GUEST, HOST, KVM_XSAVE_SIZE, Host,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
seeds = st.integers(0, 2**32 - 1)


def verdicts(events, profile="upstream"):
    """(index in the stream, rule id) of every violation, in order."""
    engine = Engine(profile)
    return [(i, v.rule.id) for i, ev in enumerate(events) for v in engine.judge(ev)]


def explain(events, found, around=12):
    """The events before the first violation, for the failure message."""
    if not found:
        return ""
    i = found[0][0]
    return "\n".join(f"{j}: {encode(ev).decode().strip()}" for j, ev in enumerate(events) if i - around <= j <= i)


# ---- (a) correct streams are clean


@settings(max_examples=300, **SETTINGS)
@given(seed=seeds, steps=st.integers(0, 400), procs=st.integers(1, 4), amx=st.sampled_from((0.0, 0.5, 0.9, 1.0)))
def test_correct_upstream_streams_give_no_violation(seed, steps, procs, amx):
    events = Host(random.Random(seed), max_procs=procs, amx_share=amx).run(steps)
    found = verdicts(events)
    assert found == [], explain(events, found)


@settings(max_examples=200, **SETTINGS)
@given(seed=seeds, steps=st.integers(1, 400), procs=st.integers(1, 4), cut=st.floats(0, 1))
def test_agent_started_late_gives_no_violation(seed, steps, procs, cut):
    """Drop any prefix: unknown state must never fire (spec: "never flag a healthy VM because the agent started late")."""
    events = Host(random.Random(seed), max_procs=procs).run(steps)
    late = events[int(cut * len(events)):]
    found = verdicts(late)
    assert found == [], explain(late, found)


def test_model_covers_every_kind_and_outcome():
    """The model is not trivially clean: it produces every kind, refusals, #NM, passthrough, migrations."""
    seen = set()
    for seed in range(40):
        for ev in Host(random.Random(seed)).run(200):
            seen.add((ev.kind, getattr(ev, "source", None) or getattr(ev, "op", None), getattr(ev, "ret", 0) == 0))
    kinds = {k for k, _, _ in seen}
    assert kinds == {t.kind for t in (Perm, VcpuCreate, VcpuDestroy, Cpuid, Xcr0, Xfd, XfdErr, Fpstate, FpuLoad,
                                      Passthrough, Xsave, Exec, Exit)}
    for want in [("xfd_err", "nm", True), ("xfd", "guest", True), ("xfd", "host", True), ("xcr0", "host", True),
                 ("xsave", "set", True), ("xsave", "get", False), ("xcr0", "guest", False), ("perm", None, False),
                 ("cpuid", None, False), ("vcpu_create", None, False), ("xfd", "guest", False)]:
        assert want in seen, want


# ---- (b) one injected bad step is caught
#
# An injector looks at the model between two actions and returns the bad
# events it could inject there, each with the exact set of rules the spec
# says it breaks, given what the agent knows at that point (a full stream:
# every process and vCPU was seen from its start).


def _ev(h, cls, **fields):
    return cls(v=1, ts=h.ts, **fields)


def _not_amx_exact(h):
    """Processes whose exact guest permission (as the agent knows it) has no AMX."""
    return [p for p in h.procs if p.exact and not p.guest_perm & DYN]


def inj_xs001(h):
    out = []
    for p in _not_amx_exact(h):
        for c in p.vcpus():
            src = "guest" if c.running else "host"
            exp = {"XS001"} | ({"XS003"} if c.supported is not None else set())
            out.append((_ev(h, Xcr0, **c.key(), value=c.xcr0 | XTILE, source=src, ret=0), exp))
    return out


def inj_xs002(h):
    return [(_ev(h, Cpuid, **c.key(), xcr0_supported=AMX_PERM, ret=0), {"XS002"})
            for p in _not_amx_exact(h) for c in p.vcpus() if not c.running]


def inj_xs003(h):
    return [(_ev(h, Xcr0, **c.key(), value=c.xcr0 | BNDREGS_BNDCSR, source="guest" if c.running else "host", ret=0),
             {"XS003"}) for c in h.vcpus(lambda c: c.supported is not None)]


def inj_xs004(h):
    out = []
    for c in h.vcpus():
        for value in ((c.xcr0 & ~XTILE) | XTILECFG, (c.xcr0 & ~XTILE) | XTILEDATA, (c.xcr0 | SSE) & ~FP,
                      FP | YMM, FP | SSE | YMM | (1 << 5), FP | 0x8, FP | SSE | AVX512):
            exp = {"XS004"}
            if c.supported is not None and value & ~(c.supported | FP):
                exp.add("XS003")
            if c.proc.exact and value & DYN & ~c.proc.guest_perm:
                exp.add("XS001")
            out.append((_ev(h, Xcr0, **c.key(), value=value, source="guest" if c.running else "host", ret=0), exp))
    return out


def inj_xs005(h):
    return [(_ev(h, XfdErr, **c.key(), value=XTILEDATA, source="nm", ret=0),
             {"XS005"} | (set() if c.passthrough else {"XS006"})) for c in h.vcpus(lambda c: not c.xcr0 & DYN)]


def inj_xs006(h):
    return [(_ev(h, XfdErr, **c.key(), value=XTILEDATA, source="nm", ret=0),
             {"XS006"} | (set() if c.xcr0 & DYN else {"XS005"})) for c in h.vcpus(lambda c: not c.passthrough)]


def inj_xs007(h):
    out = []
    for c in h.vcpus(lambda c: c.supported is not None):
        for value in ((XTILEDATA,) if not c.supported & DYN else (APX, XTILECFG, XTILE)):
            out.append((_ev(h, Xfd, **c.key(), value=value, source="guest" if c.running else "host", ret=0), {"XS007"}))
    return out


def inj_xs008(h):
    return [(_ev(h, FpuLoad, **c.key(), guest_features=c.guest_features & ~DYN, xfd=0),
             {"XS008"} | ({"XS009"} if c.passthrough else set()))
            for c in h.vcpus(lambda c: c.xcr0 & DYN and not c.running)]


def inj_xs009(h):
    return [(_ev(h, FpuLoad, **c.key(), guest_features=c.guest_features & ~DYN, xfd=XTILEDATA), {"XS009"})
            for c in h.vcpus(lambda c: c.passthrough and c.xcr0 & DYN and not c.running)]


def inj_xs010(h):
    return [(_ev(h, Passthrough, **c.key(), enabled=True), {"XS010"}) for c in h.vcpus(lambda c: not c.passthrough)]


def inj_xs011(h):
    return [(_ev(h, Fpstate, **c.key(), guest=True, features=XTILEDATA, size=AMX_SIZE, ret=ret), {"XS011"})
            for c in h.vcpus() for ret in (ENOMEM, EFAULT)]


def inj_xs012(h):
    return [(_ev(h, Perm, tgid=p.tgid, option="REQ_XCOMP_GUEST_PERM", feature=18, ret=0), {"XS012"})
            for p in _not_amx_exact(h) if p.vcpu_seen]


def inj_xs013(h):
    return [(_ev(h, Perm, tgid=p.tgid, option="REQ_XCOMP_GUEST_PERM", feature=f, ret=ret), {"XS013"})
            for p in h.procs if p.vcpu_seen for f, ret in ((18, EBUSY), (17, EOPNOTSUPP))]


def inj_xs014(h):
    return [(_ev(h, Cpuid, **c.key(), xcr0_supported=AMX_PERM, ret=EPERM), {"XS014"})
            for p in _not_amx_exact(h) for c in p.vcpus() if not c.running]


def inj_xs015(h):
    return [(_ev(h, FpuLoad, **c.key(), guest_features=c.guest_features, xfd=XTILEDATA), {"XS015"})
            for c in h.vcpus(lambda c: not c.passthrough and not c.running)]


def inj_xs016(h):
    out = []
    for p in h.procs:
        for fam, option in ((HOST, "GET_XCOMP_PERM"), (GUEST, "GET_XCOMP_GUEST_PERM")):
            granted = p.granted[fam]
            for bit in (b for b in range(64) if granted >> b & 1):
                out.append((_ev(h, Perm, tgid=p.tgid, option=option, mask=granted & ~(1 << bit), ret=0), {"XS016"}))
            if granted & ~XTILE:
                # Linux 5.16-5.17.1 (bug 7): the permission replaced by the requested bits.
                out.append((_ev(h, Perm, tgid=p.tgid, option=option, mask=XTILE, ret=0), {"XS016"}))
    return out


def inj_xs017(h):
    out = []
    for c in h.vcpus(lambda c: not c.running):
        out.append((_ev(h, Cpuid, **c.key(), xcr0_supported=0x2E7 | XTILECFG, ret=0), {"XS017"}))
        exp = {"XS017"} | ({"XS002"} if c.proc.exact and not c.proc.guest_perm & DYN else set())
        out.append((_ev(h, Cpuid, **c.key(), xcr0_supported=0x2E7 | XTILEDATA, ret=0), exp))
    return out


def inj_xs018(h):
    return [(_ev(h, Xsave, **c.key(), op="set", xstate_bv=FP | SSE | XTILE, size=AMX_SIZE, ret=0), {"XS018"})
            for c in h.vcpus(lambda c: c.xfd_visible and c.xfd & DYN and not c.running)]


def inj_xs019(h):
    out = []
    for c in h.vcpus(lambda c: c.supported is not None and not c.running):
        bad = BNDREGS_BNDCSR if c.supported & XTILE else XTILE
        out.append((_ev(h, Xsave, **c.key(), op="get", xstate_bv=FP | SSE | bad,
                        size=max(c.uabi_size, KVM_XSAVE_SIZE), ret=0), {"XS019"}))
    return out


def inj_xs020(h):
    return [(_ev(h, Xsave, **c.key(), op="get", xstate_bv=0, size=KVM_XSAVE_SIZE, ret=EINVAL), {"XS020"})
            for c in h.vcpus(lambda c: ((c.supported or 0) | c.guest_features) & DYN and not c.running)]


INJECTORS = {f"XS{n:03d}": globals()[f"inj_xs{n:03d}"] for n in range(1, 21)}


def test_every_upstream_rule_has_an_injector():
    assert set(INJECTORS) == {r.id for r in RULES if "upstream" in r.profiles}


def injected_stream(rule, seed, steps, data):
    """A correct stream with one bad event for `rule` at a drawn place: (events, index, expected rules)."""
    host = Host(random.Random(seed))
    gaps = []

    def look(h):
        found = INJECTORS[rule](h)
        if found:
            gaps.append((len(h.events), found))

    host.on_gap = look
    host.run(steps)
    if not gaps:
        host.fixture_no_amx()
    if not gaps:
        host.fixture_amx()
    assert gaps, f"no place to inject {rule} even after the fixtures"
    at, found = gaps[data.draw(st.integers(0, len(gaps) - 1), label="gap")]
    bad, expected = found[data.draw(st.integers(0, len(found) - 1), label="candidate")]
    events = host.events[:at] + [bad] + host.events[at:]
    note(f"injected at {at}: {encode(bad).decode().strip()} expecting {sorted(expected)}")
    return events, at, expected


@pytest.mark.parametrize("rule", sorted(INJECTORS))
@settings(max_examples=40, **SETTINGS)
@given(seed=seeds, steps=st.integers(0, 200), data=st.data())
def test_one_injected_bad_step_gives_its_rule(rule, seed, steps, data):
    events, at, expected = injected_stream(rule, seed, steps, data)
    found = verdicts(events)
    before = [f for f in found if f[0] < at]
    assert before == [], explain(events, before)
    assert {r for i, r in found if i == at} == expected


@settings(max_examples=40, **SETTINGS)
@given(rule=st.sampled_from(sorted(INJECTORS)), seed=seeds, steps=st.integers(0, 150), data=st.data())
def test_replayed_log_gives_the_live_verdicts(tmp_path_factory, rule, seed, steps, data):
    """spec/events.md: a recorded log replayed offline gives the same verdicts as the live run."""
    events, _, _ = injected_stream(rule, seed, steps, data)
    path = Path(tmp_path_factory.mktemp("log")) / "events.jsonl"
    path.write_bytes(b"# recorded by the property tests\n" + b"".join(encode(ev) for ev in events))
    got = []
    summary = replay([str(path)], Engine(), lambda v, file, line: got.append((line - 2, v.rule.id)), Summary())
    assert got == verdicts(events)
    assert summary.events == len(events)


# ---- (c) the codec round trip

pids = st.integers(0, 2**31 - 1)
# Any valid event, every field over its whole range.
events = event_strategy(pids, st.text(min_size=1, max_size=256), pids,
                        masks=st.integers(0, 2**64 - 1), rets=st.integers(-(2**31), 2**31 - 1))


@settings(max_examples=400, **SETTINGS)
@given(ev=events)
def test_encode_decode_round_trip(ev):
    line = encode(ev)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_line(line.rstrip(b"\n")) == ev


@settings(max_examples=200, **SETTINGS)
@given(ev=events, style=st.sampled_from(("int", "upper", "padded")))
def test_masks_as_integers_or_any_hex_case_decode_the_same(ev, style):
    d = to_dict(ev)
    for field in type(ev).MASKS:
        if field in d:
            value = int(d[field], 16)
            d[field] = {"int": value, "upper": f"0X{value:X}", "padded": f"0x{value:020x}"}[style]
    assert decode_line(msgspec.json.encode(d)) == ev


@settings(max_examples=60, **SETTINGS)
@given(batch=st.lists(st.tuples(events, st.sampled_from(("", "\n", "# a comment\n"))), max_size=30))
def test_reader_gives_back_the_written_events_and_their_lines(batch):
    text, want, line = b"", [], 1
    for ev, filler in batch:
        text += filler.encode()
        line += filler.count("\n")
        text += encode(ev)
        want.append((ev, line))
        line += 1
    got = [(ev, n) for evs, lines in read_stream(io.BytesIO(text), "<test>") for ev, n in zip(evs, lines)]
    assert got == want
