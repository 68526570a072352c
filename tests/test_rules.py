"""Rules XS001-XS020 of spec/policy.md, judged by the engine event by event, in both profiles.

For each rule: a case where it fires (id, severity, masks in hex in the
message) and close cases where it must not: unknown inputs (the agent
started late), refused operations, and the profile it does not belong to.
"""

import pytest

from agent.events.reader import decode_line
from agent.policy.engine import Engine
from agent.policy.rules import BY_ID, RULES
from agent.policy.state import Tracker
from agent.xstate import DEFAULT_DYN, PERM_LOCKED
from helpers import (
    AMX, GUEST_SIZE, NO_AMX, SAMPLES, TGID, TILE, TILECFG, TILEDATA, VM, Host, cpuid, exec_, exit_,
    fpstate, fpu_load, get_guest, get_host, lines_of, passthrough, req_guest, req_host, vcpu_create,
    vcpu_destroy, xcr0, xfd, xfd_err, xsave,
)

PROFILES = ("upstream", "reference")
UPSTREAM_ONLY = ("XS002", "XS012", "XS013")


@pytest.fixture(params=PROFILES)
def host(request) -> Host:
    return Host(request.param)


@pytest.fixture
def upstream() -> Host:
    return Host("upstream")


@pytest.fixture
def reference() -> Host:
    return Host("reference")


def assert_violation(v, rule_id, *masks):
    assert v.rule.id == rule_id
    assert v.rule.severity == BY_ID[rule_id].severity
    for mask in masks:
        assert f"{mask:#x}" in v.message, f"{mask:#x} not in {v.message!r}"


# The rule table -------------------------------------------------------------------------------

SPEC_TABLE = {
    "XS001": ("critical", PROFILES), "XS002": ("critical", ("upstream",)),
    "XS003": ("critical", PROFILES), "XS004": ("critical", PROFILES), "XS005": ("critical", PROFILES),
    "XS006": ("critical", PROFILES), "XS007": ("critical", PROFILES), "XS008": ("critical", PROFILES),
    "XS009": ("critical", PROFILES), "XS010": ("warning", PROFILES), "XS011": ("critical", PROFILES),
    "XS012": ("critical", ("upstream",)), "XS013": ("warning", ("upstream",)),
    "XS014": ("warning", PROFILES), "XS015": ("critical", PROFILES), "XS016": ("critical", PROFILES),
    "XS017": ("warning", PROFILES), "XS018": ("warning", PROFILES), "XS019": ("critical", PROFILES),
    "XS020": ("warning", PROFILES),
}


@pytest.mark.parametrize("rule_id", sorted(SPEC_TABLE))
def test_rule_table_matches_spec(rule_id):
    severity, profiles = SPEC_TABLE[rule_id]
    r = BY_ID[rule_id]
    assert (r.severity, r.profiles) == (severity, frozenset(profiles))


def test_rules_are_xs001_to_xs020_in_order():
    assert [r.id for r in RULES] == sorted(SPEC_TABLE)


@pytest.mark.parametrize("profile", PROFILES)
def test_engine_loads_exactly_the_rules_of_its_profile(profile):
    engine = Engine(profile=profile)
    assert {r.id for r in engine.rules} == {i for i, (_, p) in SPEC_TABLE.items() if profile in p}


def test_upstream_only_rules_never_fire_in_reference():
    events = (get_guest(NO_AMX), vcpu_create(), cpuid(AMX), req_guest(18, ret=-16), req_guest(18))
    up, ref = Host("upstream"), Host("reference")
    assert set(up.ids(*events)) == set(UPSTREAM_ONLY)
    assert not set(ref.ids(*events)) & set(UPSTREAM_ONLY)


def test_one_event_can_break_several_rules_each_reported_in_rule_order(host):
    host(get_guest(NO_AMX), vcpu_create(), cpuid(0x7))
    # XTILEDATA without XTILECFG, not permitted, not supported: XS001, XS003 and XS004 at once.
    assert host.ids(xcr0(0x40007)) == ["XS001", "XS003", "XS004"]


# XS001: accepted xcr0 with dynamic bits outside the allowed dynamic set ---------------------------

def test_xs001_fires_on_xcr0_with_amx_not_permitted(host):
    host(get_guest(NO_AMX), vcpu_create())
    v = host.one(xcr0(AMX), "XS001")
    assert_violation(v, "XS001", AMX, TILEDATA)


def test_xs001_quiet_once_amx_is_requested(host):
    host(get_guest(NO_AMX), req_guest(18), vcpu_create(), cpuid(AMX))
    assert host.ids(xcr0(AMX)) == []


def test_xs001_quiet_when_the_permission_calls_were_not_seen(host):
    # Late start: a process and a vCPU that the agent never saw set up.
    assert host.ids(cpuid(AMX), xcr0(AMX)) == []


def test_xs001_quiet_after_a_request_alone_which_does_not_make_the_mask_exact(host):
    # REQ for feature 17 proves only that 17 is allowed; 18 may be too.
    host(req_guest(17), vcpu_create())
    assert "XS001" not in host.ids(xcr0(AMX))


def test_xs001_quiet_on_refused_xcr0(host):
    host(get_guest(NO_AMX), vcpu_create())
    assert host.ids(xcr0(AMX, ret=1)) == []


def test_xs001_refused_request_grants_nothing(host):
    host(get_guest(NO_AMX), req_guest(18, ret=-1), vcpu_create())
    assert "XS001" in host.ids(xcr0(AMX))


def test_xs001_guest_perm_reported_by_fpu_load_makes_the_mask_exact(host):
    # Late start; the backend reads guest_perm (lock flag is not a feature).
    host(fpu_load(NO_AMX, guest_perm=NO_AMX | PERM_LOCKED))
    v = host.one(xcr0(AMX), "XS001")
    assert_violation(v, "XS001", TILEDATA)


def test_xs001_single_permission_family_in_reference_only():
    # REQ_XCOMP_PERM is the host family upstream, but grows the one mask of the seed's design.
    events = (get_guest(NO_AMX), req_host(18), vcpu_create())
    up, ref = Host("upstream"), Host("reference")
    up(*events)
    ref(*events)
    assert up.ids(xcr0(AMX)) == ["XS001"]
    assert ref.ids(xcr0(AMX)) == []


def test_xs001_host_get_does_not_make_guest_perm_exact_upstream(upstream):
    upstream(get_host(NO_AMX), vcpu_create())
    assert upstream.ids(xcr0(AMX)) == []


def test_xs001_host_get_is_the_single_family_in_reference(reference):
    reference(get_host(NO_AMX), vcpu_create())
    assert reference.ids(xcr0(AMX)) == ["XS001"]


def test_xs001_after_exec_permissions_are_exact_and_without_dynamic_features(host):
    host(get_guest(AMX), vcpu_create(), exec_())
    v = host.one(xcr0(AMX), "XS001")
    assert_violation(v, "XS001", TILEDATA)


@pytest.mark.parametrize("profile", PROFILES)
def test_xs001_configurable_dyn(profile):
    bit19 = 1 << 19
    h = Host(profile, dyn=DEFAULT_DYN | bit19)
    h(get_guest(AMX), vcpu_create())
    v = h.one(xcr0(AMX | bit19), "XS001")
    assert_violation(v, "XS001", bit19)
    # With the default DYN, bit 19 is not dynamic and always permitted.
    d = Host(profile)
    d(get_guest(AMX), vcpu_create())
    assert d.ids(xcr0(AMX | bit19)) == []


@pytest.mark.parametrize("profile", PROFILES)
def test_request_for_feature_18_grants_bits_17_and_18(profile):
    h = Host(profile, dyn=TILE)  # both tile bits dynamic
    h(get_guest(NO_AMX), req_guest(18), vcpu_create())
    assert h.ids(xcr0(AMX)) == []
    n = Host(profile, dyn=TILE)
    n(get_guest(NO_AMX), vcpu_create())
    assert_violation(n.one(xcr0(AMX), "XS001"), "XS001", TILE)


# XS002 (upstream): accepted cpuid exposing dynamic bits outside the allowed set -------------------

def test_xs002_fires_upstream_on_cpuid_with_amx_not_permitted(upstream):
    upstream(get_guest(NO_AMX), vcpu_create())
    v = upstream.one(cpuid(AMX), "XS002")
    assert_violation(v, "XS002", TILEDATA, AMX)
    assert v.rule.severity == "critical"


def test_xs002_never_fires_in_reference(reference):
    reference(get_guest(NO_AMX), vcpu_create())
    assert reference.ids(cpuid(AMX)) == []


def test_xs002_quiet_when_permitted(upstream):
    upstream(get_guest(NO_AMX), req_guest(18), vcpu_create())
    assert upstream.ids(cpuid(AMX)) == []


def test_xs002_quiet_with_unknown_permissions(upstream):
    assert upstream.ids(vcpu_create(), cpuid(AMX)) == []


def test_xs002_quiet_on_refused_cpuid(upstream):
    upstream(get_guest(NO_AMX), vcpu_create())
    assert "XS002" not in upstream.ids(cpuid(AMX, ret=-1))


def test_xs002_host_permission_does_not_count_upstream(upstream):
    upstream(get_guest(NO_AMX), req_host(18), vcpu_create())
    assert upstream.ids(cpuid(AMX)) == ["XS002"]


# XS003: accepted xcr0 outside supported | FP -------------------------------------------------------

def test_xs003_fires_on_xcr0_outside_supported(host):
    host(get_guest(AMX), vcpu_create(), cpuid(NO_AMX))
    v = host.one(xcr0(AMX), "XS003")
    assert_violation(v, "XS003", AMX, TILE, NO_AMX)


def test_xs003_quiet_inside_supported(host):
    host(get_guest(AMX), vcpu_create(), cpuid(AMX))
    assert host.ids(xcr0(AMX)) == []


def test_xs003_fp_is_always_allowed(host):
    host(vcpu_create(), cpuid(0x6))
    assert host.ids(xcr0(0x7)) == []


def test_xs003_quiet_while_supported_unknown(host):
    # vcpu_create seen, but no cpuid accepted yet.
    host(get_guest(AMX), vcpu_create())
    assert host.ids(xcr0(AMX)) == []


def test_xs003_refused_cpuid_leaves_supported_unknown(host):
    host(vcpu_create(), cpuid(0x7, ret=-22))
    assert host.ids(xcr0(AMX)) == []


def test_xs003_refused_cpuid_keeps_the_previous_supported(host):
    host(vcpu_create(), cpuid(NO_AMX), cpuid(AMX, ret=-22))
    assert "XS003" in host.ids(xcr0(AMX))


def test_xs003_quiet_on_refused_xcr0(host):
    host(vcpu_create(), cpuid(NO_AMX))
    assert host.ids(xcr0(AMX, ret=1)) == []


def test_xs003_reference_masks_supported_by_the_permission():
    events = (get_guest(NO_AMX), vcpu_create(), cpuid(AMX))
    ref = Host("reference")
    ref(*events)
    # Effective supported = 0x602e7 & (~DYN | 0) = 0x202e7.
    v = ref.one(xcr0(AMX), "XS003")
    assert_violation(v, "XS003", TILEDATA, AMX & ~TILEDATA)
    up = Host("upstream")
    up(*events)
    assert "XS003" not in up.ids(xcr0(AMX))


def test_xs003_reference_does_not_mask_by_an_unknown_permission(reference):
    reference(vcpu_create(), cpuid(AMX))
    assert reference.ids(xcr0(AMX)) == []


# XS004: architecturally invalid xcr0 -------------------------------------------------------------

INVALID_XCR0 = {
    0x6: "FP",
    0x5: "YMM",
    0xB: "BNDREGS",          # BNDREGS without BNDCSR
    0x13: "BNDREGS",         # BNDCSR without BNDREGS
    0xE3: "AVX-512",         # AVX-512 without YMM
    0x27: "AVX-512",         # only some AVX-512 bits
    0x20007: "XTILECFG",
    0x40007: "XTILECFG",
}


@pytest.mark.parametrize("value", sorted(INVALID_XCR0))
def test_xs004_fires_on_invalid_xcr0(host, value):
    # A vCPU and a process the agent knows nothing about: XS004 needs only the event.
    v = host.one(xcr0(value), "XS004")
    assert_violation(v, "XS004", value)
    assert INVALID_XCR0[value] in v.message


@pytest.mark.parametrize("value", [0x1, 0x3, 0x7, 0x1F, 0xE7, NO_AMX, AMX])
def test_xs004_quiet_on_valid_xcr0(host, value):
    assert host.ids(xcr0(value)) == []


def test_xs004_quiet_on_refused_xcr0(host):
    assert host.ids(xcr0(0x6, ret=1)) == []


# XS005: xfd_err from #NM with a dynamic bit that xcr0 does not enable ------------------------------

def test_xs005_fires_on_nm_for_a_feature_xcr0_does_not_enable(host):
    # XCR0 is 0x1 after vcpu_create; XFD arms AMX so XS006 stays quiet.
    host(vcpu_create(), xfd(TILEDATA))
    [v] = host(xfd_err(TILEDATA))
    assert_violation(v, "XS005", TILEDATA, 0x1)


def test_xs005_quiet_when_xcr0_enables_it(host):
    host(vcpu_create(), xcr0(AMX), xfd(TILEDATA))
    assert "XS005" not in host.ids(xfd_err(TILEDATA))


def test_xs005_quiet_when_xcr0_unknown(host):
    assert host.ids(xfd_err(TILEDATA)) == []


@pytest.mark.parametrize("source", ["guest", "host"])
def test_xs005_only_judges_values_saved_on_nm(host, source):
    host(vcpu_create())
    assert host.ids(xfd_err(TILEDATA, source=source)) == []


def test_xs005_only_dynamic_bits(host):
    host(vcpu_create(), xfd(TILEDATA))
    assert "XS005" not in host.ids(xfd_err(TILECFG))


@pytest.mark.parametrize("profile", PROFILES)
def test_xs005_configurable_dyn(profile):
    h = Host(profile, dyn=TILE)
    h(vcpu_create(), xfd(TILE))
    assert_violation(h.one(xfd_err(TILECFG), "XS005"), "XS005", TILECFG)


# XS006: xfd_err from #NM with a bit that XFD does not arm -------------------------------------------

def test_xs006_fires_on_nm_while_xfd_is_clear(host):
    host(vcpu_create(), xcr0(AMX))
    v = host.one(xfd_err(TILEDATA), "XS006")
    assert_violation(v, "XS006", TILEDATA, 0x0)


def test_xs006_quiet_when_xfd_arms_the_feature(host):
    host(vcpu_create(), xcr0(AMX), xfd(TILEDATA))
    assert host.ids(xfd_err(TILEDATA)) == []


def test_xs006_refused_xfd_write_does_not_arm(host):
    host(vcpu_create(), xcr0(AMX), xfd(TILEDATA, ret=1))
    assert host.ids(xfd_err(TILEDATA)) == ["XS006"]


def test_xs006_quiet_when_xfd_unknown_late_start(host):
    host(xcr0(AMX))
    assert host.ids(xfd_err(TILEDATA)) == []


def test_xs006_quiet_once_passthrough_hides_xfd_writes(host):
    host.amx_vcpu()
    host.enable_passthrough()
    # A host write makes XFD known (0), but a #NM means the guest ran and may have armed XFD unseen.
    host(xfd(0, source="host"), fpu_load(AMX, xfd=0))
    assert host.ids(xfd_err(TILEDATA)) == []


def test_xs006_quiet_while_passthrough_unknown(host):
    # Late vCPU: passthrough unknown; a host write then a #NM.
    host(xcr0(AMX), xfd(0, source="host"))
    assert host.ids(xfd_err(TILEDATA)) == []


# XS007: accepted xfd outside supported & DYN --------------------------------------------------------

def test_xs007_fires_on_xfd_arming_an_unsupported_feature(host):
    host(vcpu_create(), cpuid(NO_AMX))
    v = host.one(xfd(TILEDATA), "XS007")
    assert_violation(v, "XS007", TILEDATA, 0x0)


def test_xs007_fires_on_xfd_with_a_non_dynamic_bit(host):
    host(vcpu_create(), cpuid(AMX))
    v = host.one(xfd(TILECFG), "XS007")
    assert_violation(v, "XS007", TILECFG, TILEDATA)


def test_xs007_quiet_for_a_supported_dynamic_feature(host):
    host(get_guest(AMX), vcpu_create(), cpuid(AMX))
    assert host.ids(xfd(TILEDATA)) == []


def test_xs007_quiet_while_supported_unknown(host):
    assert host.ids(vcpu_create(), xfd(TILEDATA)) == []


def test_xs007_quiet_on_refused_write(host):
    host(vcpu_create(), cpuid(NO_AMX))
    assert host.ids(xfd(TILEDATA, ret=1)) == []


def test_xs007_reference_effective_supported_masks_by_permission():
    events = (get_guest(NO_AMX), vcpu_create(), cpuid(AMX))
    ref, up = Host("reference"), Host("upstream")
    ref(*events)
    up(*events)
    assert_violation(ref.one(xfd(TILEDATA, source="host"), "XS007"), "XS007", TILEDATA)
    assert up.ids(xfd(TILEDATA, source="host")) == []


# XS008: at fpu_load, xcr0 & ~xfd & DYN not inside guest_features -------------------------------

def test_xs008_fires_when_the_guest_can_touch_state_without_buffer(host):
    host(vcpu_create(), xcr0(AMX))
    v = host.one(fpu_load(NO_AMX, xfd=0), "XS008")
    assert_violation(v, "XS008", AMX, TILEDATA, NO_AMX)


def test_xs008_quiet_with_buffer(host):
    host(vcpu_create(), xcr0(AMX))
    assert host.ids(fpu_load(AMX, xfd=0)) == []


def test_xs008_quiet_when_xfd_disarms_the_feature(host):
    host(vcpu_create(), xcr0(AMX), xfd(TILEDATA))
    # Upstream switched passthrough on at the write, so XS009 wants the buffer anyway.
    assert "XS008" not in host.ids(fpu_load(NO_AMX, xfd=TILEDATA))


def test_xs008_quiet_while_xcr0_unknown(host):
    assert host.ids(fpu_load(NO_AMX, xfd=0)) == []


def test_xs008_refused_xcr0_keeps_the_old_value(host):
    host(vcpu_create(), xcr0(AMX, ret=1))
    assert host.ids(fpu_load(NO_AMX, xfd=0)) == []


def test_xs008_judges_the_xfd_of_fpu_load_even_under_passthrough(host):
    host.amx_vcpu()
    host.enable_passthrough()
    v = host.one(fpu_load(NO_AMX, xfd=0), "XS008")
    assert_violation(v, "XS008", TILEDATA)


# XS009: at fpu_load with passthrough on, xcr0 & DYN not inside guest_features ---------------------

def test_xs009_fires_with_passthrough_and_no_buffer(host):
    host.amx_vcpu()
    host.enable_passthrough()
    v = host.one(fpu_load(NO_AMX, xfd=TILEDATA), "XS009")
    assert_violation(v, "XS009", AMX, TILEDATA, NO_AMX)
    assert "XS008" not in [x.rule.id for x in host.violations]


def test_xs009_quiet_with_buffer(host):
    host.amx_vcpu()
    host.enable_passthrough()
    assert host.ids(fpu_load(AMX, xfd=TILEDATA)) == []


def test_xs009_quiet_with_passthrough_off(reference):
    reference(vcpu_create(), xcr0(AMX), xfd(TILEDATA))
    assert reference.ids(fpu_load(NO_AMX, xfd=TILEDATA)) == []


def test_xs009_quiet_while_passthrough_unknown(host):
    host(xcr0(AMX))
    assert host.ids(fpu_load(NO_AMX, xfd=TILEDATA)) == []


def test_xs009_upstream_first_nonzero_xfd_write_turns_passthrough_on(upstream):
    # No passthrough event: the kernel drops interception on the first non-zero write by itself.
    upstream(vcpu_create(), xcr0(AMX), xfd(TILEDATA, source="host"))
    assert upstream.ids(fpu_load(NO_AMX, xfd=TILEDATA)) == ["XS009"]


def test_xs009_reference_only_passthrough_events_turn_it_on(reference):
    reference(vcpu_create(), xcr0(AMX), xfd(TILEDATA, source="host"))
    assert reference.ids(fpu_load(NO_AMX, xfd=TILEDATA)) == []


def test_xs009_upstream_refused_or_zero_xfd_write_does_not_turn_passthrough_on(upstream):
    upstream(vcpu_create(), xcr0(AMX), xfd(TILEDATA, ret=1), xfd(0))
    assert upstream.ids(fpu_load(AMX & ~TILE, xfd=0)) == ["XS008"]


# XS010: passthrough switched on before its precondition --------------------------------------------

def test_xs010_upstream_fires_without_a_nonzero_xfd_write(upstream):
    upstream(vcpu_create(), xcr0(AMX), xfd(0), xfd(TILEDATA, ret=1))
    v = upstream.one(passthrough(True), "XS010")
    assert v.rule.severity == "warning"
    assert "non-zero" in v.message


@pytest.mark.parametrize("source", ["guest", "host"])
def test_xs010_upstream_quiet_after_a_nonzero_xfd_write(upstream, source):
    upstream(vcpu_create(), xcr0(AMX), xfd(TILEDATA, source=source))
    assert upstream.ids(passthrough(True)) == []


def test_xs010_upstream_quiet_when_the_vcpu_history_is_unknown(upstream):
    assert upstream.ids(xcr0(AMX), passthrough(True)) == []


def test_xs010_reference_fires_when_xcr0_and_not_xfd_hold_no_dynamic_feature(reference):
    reference(vcpu_create(), xcr0(AMX), xfd(TILEDATA))
    v = reference.one(passthrough(True), "XS010")
    assert_violation(v, "XS010", AMX, TILEDATA)


def test_xs010_reference_fires_when_xcr0_has_no_dynamic_feature(reference):
    reference(vcpu_create())
    assert_violation(reference.one(passthrough(True), "XS010"), "XS010", 0x1, 0x0)


def test_xs010_reference_quiet_when_xcr0_enables_an_unarmed_dynamic_feature(reference):
    reference(vcpu_create(), xcr0(AMX))
    assert reference.ids(passthrough(True)) == []


def test_xs010_reference_quiet_when_xcr0_or_xfd_unknown(reference):
    assert reference.ids(xcr0(0x7), passthrough(True)) == []


def test_xs010_never_on_switching_off(host):
    host(vcpu_create())
    assert host.ids(passthrough(False)) == []


def test_xs010_not_again_when_already_on(host):
    host.amx_vcpu()
    host.enable_passthrough()
    assert host.ids(passthrough(True)) == []


# XS011: guest fpstate allocation fails ---------------------------------------------------------

def test_xs011_fires_on_failed_guest_buffer(host):
    v = host.one(fpstate(TILE, ret=-12), "XS011")
    assert_violation(v, "XS011", TILE)
    assert "-12" in v.message


def test_xs011_quiet_on_success(host):
    assert host.ids(fpstate(TILE)) == []


def test_xs011_quiet_on_failed_host_buffer(host):
    assert host.ids(fpstate(TILE, guest=False, ret=-12)) == []


def test_xs011_failed_allocation_adds_no_guest_features(host):
    host(vcpu_create(), xcr0(AMX), fpstate(TILE, ret=-12))
    # guest_features after vcpu_create stays 0: a legacy KVM_GET_XSAVE refusal is not explained by it.
    assert host.ids(xsave("get", 0x3, size=4096, ret=-22)) == []


# XS012 (upstream): REQ_XCOMP_GUEST_PERM grants features after a vCPU exists -------------------

def test_xs012_fires_upstream_on_late_guest_permission(upstream):
    upstream(get_guest(NO_AMX), vcpu_create())
    v = upstream.one(req_guest(18), "XS012")
    assert_violation(v, "XS012", TILEDATA)


def test_xs012_never_in_reference(reference):
    reference(get_guest(NO_AMX), vcpu_create())
    assert reference.ids(req_guest(18)) == []


def test_xs012_quiet_before_the_first_vcpu(upstream):
    assert upstream.ids(get_guest(NO_AMX), req_guest(18), vcpu_create()) == []


def test_xs012_quiet_when_nothing_is_added(upstream):
    upstream(get_guest(AMX), vcpu_create())
    assert upstream.ids(req_guest(18)) == []


def test_xs012_quiet_when_the_mask_is_not_exact(upstream):
    upstream(vcpu_create())
    assert upstream.ids(req_guest(18)) == []


def test_xs012_quiet_for_host_permission(upstream):
    upstream(get_host(NO_AMX), get_guest(NO_AMX), vcpu_create())
    assert upstream.ids(req_host(18)) == []


def test_xs012_refused_vcpu_create_creates_nothing(upstream):
    upstream(get_guest(NO_AMX), vcpu_create(ret=-12))
    assert upstream.ids(req_guest(18)) == []


def test_xs012_a_vcpu_seen_late_was_created(upstream):
    upstream(get_guest(NO_AMX), cpuid(NO_AMX))
    assert upstream.ids(req_guest(18)) == ["XS012"]


def test_xs012_quiet_after_exec(upstream):
    upstream(get_guest(NO_AMX), vcpu_create(), exec_())
    assert upstream.ids(req_guest(18)) == []


def test_xs012_destroyed_vcpu_still_locked_the_permission(upstream):
    upstream(get_guest(NO_AMX), vcpu_create(), vcpu_destroy())
    assert upstream.ids(req_guest(18)) == ["XS012"]


# XS013 (upstream): REQ_XCOMP_GUEST_PERM fails after a vCPU exists ------------------------------

def test_xs013_fires_upstream_on_refused_late_request(upstream):
    upstream(vcpu_create())
    v = upstream.one(req_guest(18, ret=-16), "XS013")
    assert v.rule.severity == "warning"
    assert "-16" in v.message


def test_xs013_never_in_reference(reference):
    reference(vcpu_create())
    assert reference.ids(req_guest(18, ret=-16)) == []


def test_xs013_quiet_before_the_first_vcpu(upstream):
    assert upstream.ids(req_guest(18, ret=-16)) == []


def test_xs013_quiet_for_host_permission(upstream):
    upstream(vcpu_create())
    assert upstream.ids(req_host(18, ret=-16)) == []


# XS014: cpuid refused while asking for dynamic bits not allowed ----------------------------------

def test_xs014_fires_on_refused_cpuid_without_permission(host):
    host(get_guest(NO_AMX), vcpu_create())
    v = host.one(cpuid(AMX, ret=-1), "XS014")
    assert_violation(v, "XS014", TILEDATA, 0x0)


def test_xs014_quiet_when_permitted(host):
    host(get_guest(AMX), vcpu_create())
    assert host.ids(cpuid(AMX, ret=-22)) == []


def test_xs014_quiet_with_unknown_permission(host):
    assert host.ids(vcpu_create(), cpuid(AMX, ret=-1)) == []


def test_xs014_quiet_for_refused_cpuid_without_dynamic_bits(host):
    host(get_guest(NO_AMX), vcpu_create())
    assert host.ids(cpuid(NO_AMX, ret=-22)) == []


def test_xs014_single_family_in_reference():
    events = (get_guest(NO_AMX), req_host(18), vcpu_create())
    up, ref = Host("upstream"), Host("reference")
    up(*events)
    ref(*events)
    assert up.ids(cpuid(AMX, ret=-1)) == ["XS014"]
    assert ref.ids(cpuid(AMX, ret=-1)) == []


# XS015: fpu_load with passthrough off runs with another xfd than the last write ------------------

def test_xs015_fires_when_xfd_differs_from_zero_after_vcpu_create(host):
    host(vcpu_create())
    v = host.one(fpu_load(0x3, xfd=TILEDATA), "XS015")
    assert_violation(v, "XS015", TILEDATA, 0x0)


def test_xs015_reference_fires_when_xfd_differs_from_the_last_write(reference):
    reference(vcpu_create(), xcr0(AMX), fpstate(TILE), xfd(TILEDATA))
    assert_violation(reference.one(fpu_load(AMX, xfd=0), "XS015"), "XS015", TILEDATA)


def test_xs015_quiet_when_equal(host):
    host(vcpu_create(), xfd(0))
    assert host.ids(fpu_load(0x3, xfd=0)) == []


def test_xs015_refused_write_is_not_the_last_write(host):
    host(vcpu_create(), xfd(TILEDATA, ret=1))
    assert host.ids(fpu_load(0x3, xfd=0)) == []
    assert host.ids(fpu_load(0x3, xfd=TILEDATA)) == ["XS015"]


def test_xs015_quiet_with_passthrough_on(host):
    host.amx_vcpu()
    host.enable_passthrough()
    assert host.ids(fpu_load(AMX, xfd=0)) == []


def test_xs015_upstream_nonzero_write_turns_passthrough_on(upstream):
    upstream(vcpu_create(), xcr0(AMX), fpstate(TILE), xfd(TILEDATA))
    assert upstream.ids(fpu_load(AMX, xfd=0)) == []


def test_xs015_quiet_late_start(host):
    assert host.ids(fpu_load(AMX, xfd=TILEDATA)) == []


def test_xs015_last_write_unknown_after_passthrough_off_until_next_write(host):
    host(vcpu_create(), passthrough(False))
    assert host.ids(fpu_load(0x3, xfd=TILEDATA)) == []
    host(xfd(0))
    assert host.ids(fpu_load(0x3, xfd=TILEDATA)) == ["XS015"]


# XS016: GET_*PERM lacks a bit granted earlier ------------------------------------------------

@pytest.mark.parametrize("get", [get_guest, get_host])
def test_xs016_fires_when_a_get_loses_bits(host, get):
    host(get(AMX))
    v = host.one(get(NO_AMX), "XS016")
    assert_violation(v, "XS016", NO_AMX, TILE)


def test_xs016_request_for_18_grants_17_and_18(host):
    host(req_guest(18))
    v = host.one(get_guest(NO_AMX), "XS016")
    assert_violation(v, "XS016", TILE)


def test_xs016_quiet_when_the_mask_grows(host):
    assert host.ids(get_guest(NO_AMX), req_guest(18), get_guest(AMX)) == []


def test_xs016_refused_request_grants_nothing(host):
    assert host.ids(req_guest(18, ret=-16), get_guest(NO_AMX)) == []


def test_xs016_quiet_on_failed_get(host):
    assert host.ids(get_guest(AMX), get_guest(None, ret=-22)) == []


def test_xs016_exec_in_between_resets_permissions(host):
    assert host.ids(get_guest(AMX), exec_(), get_guest(NO_AMX)) == []


def test_xs016_exit_forgets_the_process(host):
    assert host.ids(get_guest(AMX), exit_(), get_guest(NO_AMX)) == []


def test_xs016_families_are_separate_upstream_only():
    up, ref = Host("upstream"), Host("reference")
    events = (req_host(18), get_guest(NO_AMX))
    assert up.ids(*events) == []
    assert ref.ids(*events) == ["XS016"]


def test_xs016_processes_are_separate(host):
    assert host.ids(get_guest(AMX, tgid=1), get_guest(NO_AMX, tgid=2)) == []


# XS017: accepted cpuid with half of XTILE ----------------------------------------------------

@pytest.mark.parametrize("supported,half", [(NO_AMX | TILECFG, "XTILECFG without XTILEDATA"),
                                            (NO_AMX | TILEDATA, "XTILEDATA without XTILECFG")])
def test_xs017_fires_on_half_xtile(host, supported, half):
    host(vcpu_create())
    v = host.one(cpuid(supported), "XS017")
    assert_violation(v, "XS017", supported)
    assert half in v.message


@pytest.mark.parametrize("supported", [NO_AMX, AMX])
def test_xs017_quiet_on_whole_or_no_xtile(host, supported):
    assert host.ids(vcpu_create(), cpuid(supported)) == []


def test_xs017_quiet_on_refused_cpuid(host):
    assert host.ids(vcpu_create(), cpuid(NO_AMX | TILECFG, ret=-22)) == []


# XS018: accepted KVM_SET_XSAVE with state XFD forbids ---------------------------------------

def test_xs018_fires_when_xfd_is_known_from_a_host_write(host):
    host(vcpu_create(), xfd(TILEDATA, source="host"))
    v = host.one(xsave("set", 0x40003), "XS018")
    assert_violation(v, "XS018", 0x40003, TILEDATA)


def test_xs018_reference_fires_with_xfd_from_an_intercepted_guest_write(reference):
    reference(vcpu_create(), xcr0(AMX), xfd(TILEDATA), fpu_load(AMX, xfd=TILEDATA))
    assert reference.ids(xsave("set", 0x40003)) == ["XS018"]


def test_xs018_quiet_when_xfd_does_not_arm_the_state(host):
    host(vcpu_create(), xfd(0, source="host"))
    assert host.ids(xsave("set", 0x40003)) == []


def test_xs018_quiet_on_refused_set_and_on_get(host):
    host(vcpu_create(), xfd(TILEDATA, source="host"))
    assert host.ids(xsave("set", 0x40003, ret=-22), xsave("get", 0x40003)) == []


def test_xs018_quiet_late_start(host):
    assert host.ids(xsave("set", 0x40003)) == []


def test_xs018_passthrough_hides_xfd_once_the_guest_may_have_run(host):
    host.amx_vcpu()
    host.enable_passthrough()
    assert host.ids(xsave("set", 0x40003)) == []
    # A host write makes XFD known again until the next fpu_load ...
    host(xfd(TILEDATA, source="host"))
    assert host.ids(xsave("set", 0x40003)) == ["XS018"]
    # ... after which the guest runs and may rewrite it unseen.
    host(fpu_load(AMX, xfd=TILEDATA))
    assert host.ids(xsave("set", 0x40003)) == []


def test_xs018_upstream_guest_nonzero_write_hides_xfd(upstream):
    # The write itself drops interception; the guest goes on running.
    upstream(vcpu_create(), xcr0(AMX), fpstate(TILE), xfd(TILEDATA))
    assert upstream.ids(xsave("set", 0x40003)) == []


def test_xs018_passthrough_switched_on_in_a_guest_trap_hides_xfd():
    # Two dynamic features: the guest arms bit 19 and enables 18, so passthrough may start.
    bit19 = 1 << 19
    h = Host("reference", dyn=TILEDATA | bit19)
    h(vcpu_create(), xcr0(AMX | bit19), fpstate(TILEDATA | bit19), fpu_load(AMX | bit19, xfd=0), xfd(bit19))
    assert h.ids(passthrough(True)) == []
    # The guest resumes after the trap with XFD no longer intercepted: XFD may be 0 by now.
    assert h.ids(xsave("set", bit19 | 0x3)) == []


def test_xs018_xfd_unknown_after_passthrough_off_until_next_write(host):
    host(vcpu_create(), xfd(TILEDATA, source="host"), passthrough(False))
    assert host.ids(xsave("set", 0x40003)) == []
    host(xfd(TILEDATA, source="host"))
    assert host.ids(xsave("set", 0x40003)) == ["XS018"]


# XS019: accepted KVM_GET_XSAVE image with state outside supported | FP | SSE ------------------------

def test_xs019_fires_on_image_with_unsupported_state(host):
    host(vcpu_create(), cpuid(NO_AMX))
    v = host.one(xsave("get", 0x602E3), "XS019")
    assert_violation(v, "XS019", 0x602E3, TILE, NO_AMX)


def test_xs019_fp_and_sse_always_allowed(host):
    host(vcpu_create(), cpuid(0x4))
    assert host.ids(xsave("get", 0x7)) == []


def test_xs019_quiet_inside_supported(host):
    host(get_guest(AMX), vcpu_create(), cpuid(AMX))
    assert host.ids(xsave("get", 0x602E3)) == []


def test_xs019_quiet_on_refused_get_and_on_set(host):
    host(vcpu_create(), cpuid(NO_AMX))
    assert host.ids(xsave("get", 0x602E3, ret=-22), xsave("set", 0x602E3)) == []


def test_xs019_quiet_while_supported_unknown(host):
    host(vcpu_create(), cpuid(NO_AMX, ret=-22))
    assert host.ids(xsave("get", 0x602E3)) == []


def test_xs019_reference_masks_supported_by_permission():
    events = (get_guest(NO_AMX), vcpu_create(), cpuid(AMX))
    ref, up = Host("reference"), Host("upstream")
    ref(*events)
    up(*events)
    assert_violation(ref.one(xsave("get", 0x40003), "XS019"), "XS019", TILEDATA, AMX & ~TILEDATA)
    assert up.ids(xsave("get", 0x40003)) == []


# XS020: legacy 4096-byte KVM_GET_XSAVE refused on a vCPU with dynamic features ------------------

def test_xs020_fires_on_legacy_get_xsave_with_amx_supported(host):
    host(req_guest(18), vcpu_create(), cpuid(AMX))
    v = host.one(xsave("get", 0x3, size=4096, ret=-22), "XS020")
    assert_violation(v, "XS020", TILEDATA)
    assert v.rule.severity == "warning"


def test_xs020_fires_on_legacy_get_xsave_with_amx_buffer(host):
    host(fpstate(TILE))
    assert host.ids(xsave("get", 0x3, size=4096, ret=-22)) == ["XS020"]


def test_xs020_guest_features_from_fpu_load(host):
    host(fpu_load(AMX, xfd=TILEDATA))
    assert host.ids(xsave("get", 0x3, size=4096, ret=-22)) == ["XS020"]


def test_xs020_quiet_for_get_xsave2(host):
    host(req_guest(18), vcpu_create(), cpuid(AMX))
    assert host.ids(xsave("get", 0x3, size=GUEST_SIZE, ret=-22)) == []


def test_xs020_quiet_when_accepted(host):
    host(vcpu_create(), cpuid(NO_AMX))
    assert host.ids(xsave("get", 0x3, size=4096)) == []


def test_xs020_quiet_without_dynamic_features(host):
    host(vcpu_create(), cpuid(NO_AMX))
    assert host.ids(xsave("get", 0x3, size=4096, ret=-22)) == []


def test_xs020_quiet_late_start(host):
    assert host.ids(xsave("get", 0x3, size=4096, ret=-22)) == []


def test_xs020_reference_needs_amx_known_granted():
    # Reference: supported is masked by the permission; unknown permission -> AMX may be masked out.
    ref, up = Host("reference"), Host("upstream")
    for h in (ref, up):
        h(vcpu_create(), cpuid(AMX))
    assert ref.ids(xsave("get", 0x3, size=4096, ret=-22)) == []
    assert up.ids(xsave("get", 0x3, size=4096, ret=-22)) == ["XS020"]


# Late start, refused operations, lifecycle ---------------------------------------------------

def test_late_start_never_flags_a_running_amx_guest(host):
    """The agent starts while a VM with AMX runs, passthrough on: nothing it sees is wrong."""
    events = [
        xfd_err(TILEDATA),                              # XS005/XS006: xcr0, xfd unknown
        xfd(TILEDATA),                                  # XS007: supported unknown
        fpu_load(AMX, xfd=0),                           # XS015: last write unknown, XS008 fine
        passthrough(True),                              # XS010: history unknown
        xsave("set", 0x602E3),                          # XS018: xfd unknown
        xsave("get", 0x602E3),                          # XS019: supported unknown
        fpu_load(AMX, xfd=TILEDATA),
        xsave("get", 0x3, size=GUEST_SIZE),
    ]
    assert host.ids(*events) == []


def test_late_start_process_with_unknown_permissions(host):
    events = [cpuid(AMX, vcpu=1), xcr0(AMX, vcpu=1), cpuid(AMX, vcpu=2, ret=-1), req_guest(18)]
    assert host.ids(*events) == []


def test_refused_operations_are_counted(host):
    host(vcpu_create(ret=-17), cpuid(AMX, ret=-22), xcr0(0x7, ret=1), xfd(TILEDATA, ret=1),
         xfd_err(TILEDATA, source="host", ret=1), fpstate(TILE, ret=-12), xsave("get", 0x3, ret=-14),
         req_guest(18, ret=-16))
    refused = host.engine.refused
    for kind in ("vcpu_create", "cpuid", "xcr0", "xfd", "xfd_err", "fpstate", "xsave", "perm"):
        assert refused[kind] == 1, kind


def test_refused_vcpu_create_tracks_no_vcpu(host):
    host(vcpu_create(ret=-17))
    assert host.engine.state.vcpus == {}
    # The vCPU is not known: its XFD history is unknown.
    assert host.ids(fpu_load(0x3, xfd=TILEDATA)) == []


def test_exec_forgets_the_vcpus(host):
    host(vcpu_create(), vcpu_create(vcpu=1), vcpu_create(vm="vm-2", tgid=7))
    host(exec_())
    assert list(host.engine.state.vcpus) == [(7, "vm-2", 0)]
    # vCPU 0 is unknown again: no XS015 on an XFD never seen written.
    assert host.ids(fpu_load(0x3, xfd=TILEDATA)) == []


def test_exec_resets_permissions_to_exact_without_dynamic_features(host):
    host(get_guest(AMX), get_host(AMX), exec_())
    p = host.engine.state.procs[TGID]
    assert p.exact == [True, True]
    assert p.allowed == [0, 0]
    assert host.engine.profile.allowed(p) == 0


def test_exit_forgets_the_process_and_its_vcpus(host):
    host(get_guest(NO_AMX), vcpu_create(), vcpu_create(vcpu=1), vcpu_create(tgid=7))
    host(exit_())
    assert TGID not in host.engine.state.procs
    assert list(host.engine.state.vcpus) == [(7, VM, 0)]
    # A new process with the same tgid: nothing known about it.
    assert host.ids(xcr0(AMX), fpu_load(0x3, xfd=TILEDATA)) == []


def test_vcpu_destroy_forgets_the_vcpu(host):
    host(vcpu_create(), vcpu_create(vcpu=1))
    host(vcpu_destroy())
    assert list(host.engine.state.vcpus) == [(TGID, VM, 1)]
    assert host.engine.state.procs[TGID].vcpus == {(TGID, VM, 1)}
    assert host.ids(fpu_load(0x3, xfd=TILEDATA)) == []
    assert host.ids(fpu_load(0x3, xfd=TILEDATA, vcpu=1)) == ["XS015"]


def test_vcpu_destroy_of_an_unknown_vcpu_is_harmless(host):
    assert host.ids(vcpu_destroy(vcpu=9), vcpu_destroy(vcpu=9, tgid=77)) == []


def test_vcpu_destroy_after_exit_does_not_bring_the_process_back(host):
    # The kernel frees vCPUs after the exit tracepoint fires: live order.
    host(vcpu_create(), exit_(), vcpu_destroy())
    assert TGID not in host.engine.state.procs
    assert not host.engine.state.vcpus


def test_vcpus_are_keyed_by_process_vm_and_id(host):
    host(vcpu_create(vm="a"), xcr0(AMX, vm="a"))
    # Same vCPU id in another VM, or in another process: unknown, not the one above.
    assert host.ids(fpu_load(0x3, xfd=0, vm="b"), fpu_load(0x3, xfd=0, vm="a", tgid=1)) == []
    assert host.ids(fpu_load(0x3, xfd=0, vm="a")) == ["XS008"]


def test_vcpu_create_again_resets_the_vcpu(host):
    host(vcpu_create(), xfd(0x0, source="host"), xcr0(AMX))
    host(vcpu_create())
    # XCR0 back to 0x1: no AMX usable, no XS008.
    assert host.ids(fpu_load(0x3, xfd=0)) == []


# Bounded state ------------------------------------------------------------------------------

def test_tracker_caps_must_be_positive():
    with pytest.raises(ValueError):
        Tracker(max_processes=0)
    with pytest.raises(ValueError):
        Tracker(max_vcpus=0)


def test_tracker_evicts_the_least_recently_seen_process():
    t = Tracker(max_processes=2)
    t.proc(1)
    t.proc(2)
    t.proc(1)  # seen again: 2 is now the oldest
    t.proc(3)
    assert list(t.procs) == [1, 3]
    assert t.evicted_processes == 1


def test_tracker_evicts_the_least_recently_seen_vcpu():
    t = Tracker(max_vcpus=2)
    p = t.proc(1)
    t.create_vcpu(p, VM, 0)
    t.create_vcpu(p, VM, 1)
    t.vcpu(p, VM, 0)  # seen again
    t.create_vcpu(p, VM, 2)
    assert list(t.vcpus) == [(1, VM, 0), (1, VM, 2)]
    assert p.vcpus == {(1, VM, 0), (1, VM, 2)}
    assert t.evicted_vcpus == 1
    assert t.evicted_processes == 0


def test_tracker_evicting_a_process_evicts_its_vcpus():
    t = Tracker(max_processes=1)
    p = t.proc(1)
    t.create_vcpu(p, VM, 0)
    t.create_vcpu(p, VM, 1)
    q = t.proc(2)
    t.create_vcpu(q, VM, 0)
    assert list(t.procs) == [2]
    assert list(t.vcpus) == [(2, VM, 0)]
    assert (t.evicted_processes, t.evicted_vcpus) == (1, 2)


def test_tracker_destroy_and_forget_drop_state():
    t = Tracker()
    p = t.proc(1)
    t.create_vcpu(p, VM, 0)
    t.create_vcpu(p, VM, 1)
    t.destroy_vcpu(1, VM, 0)
    assert list(t.vcpus) == [(1, VM, 1)]
    t.forget(1)
    assert t.procs == {} and t.vcpus == {}
    assert (t.evicted_processes, t.evicted_vcpus) == (0, 0)


def test_engine_caps_evict_and_evicted_state_is_unknown(host):
    h = Host(host.profile, max_vcpus=1)
    h(vcpu_create(vcpu=0), vcpu_create(vcpu=1))
    assert h.engine.state.evicted_vcpus == 1
    # vCPU 0 was evicted: its XFD history is unknown, so no XS015.
    assert h.ids(fpu_load(0x3, xfd=TILEDATA, vcpu=0)) == []


def test_engine_process_cap_evicts_permissions(host):
    h = Host(host.profile, max_processes=1)
    h(get_guest(NO_AMX, tgid=1), vcpu_create(tgid=1), get_guest(NO_AMX, tgid=2))
    assert (h.engine.state.evicted_processes, h.engine.state.evicted_vcpus) == (1, 1)
    # Process 1's exact permission is gone: no XS001 on a vCPU seen again.
    assert h.ids(xcr0(AMX, tgid=1)) == []


def test_xs018_upstream_passthrough_event_after_the_host_write_keeps_xfd_known(upstream):
    # The host write turned passthrough on by itself; the event that follows changes nothing.
    upstream(vcpu_create(), xfd(TILEDATA, source="host"), passthrough(True))
    assert upstream.ids(xsave("set", 0x40003)) == ["XS018"]


@pytest.mark.parametrize("start", range(len(lines_of(SAMPLES / "amx-guest-healthy.jsonl"))))
def test_healthy_sample_is_clean_upstream_from_any_starting_line(start):
    """The agent may start at any point of a healthy VM's life: it must never flag it."""
    h = Host("upstream")
    events = [decode_line(ln.encode()) for ln in lines_of(SAMPLES / "amx-guest-healthy.jsonl")]
    assert h.ids(*events[start:]) == []
