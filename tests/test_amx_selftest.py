"""Scenarios from the kernel's KVM AMX selftest, and known bugs, replayed through the real CLI.

Each tests/scenarios/*.jsonl is an event log the agent would record. Its
header ('#' lines) says what it shows and what the engine must report; a
`# expect-next: XSnnn ...` line marks the event right after it as breaking
exactly those rules. The test replays each file with `xstate-agent replay`
(as `python -m agent`) and requires exactly those (line, rule) verdicts, no
more, no fewer; EXPECTED_RULES below double-checks the markers themselves.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from agent.events.model import Xfd, Xsave
from agent.events.reader import decode_line
from agent.policy.engine import Engine
from agent.policy.rules import BY_ID
from agent.replay import Summary, replay
from agent.xstate import XTILEDATA

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "scenarios"
MARK = "# expect-next:"

# What each scenario must give (rule -> count); the markers say where.
EXPECTED_RULES = {
    "amx-selftest-6.1.jsonl": {},
    "amx-selftest-7.2.jsonl": {},
    "bug2b-set-xsave-while-xfd-armed.jsonl": {"XS018": 1},
    "bug7-permission-shrink.jsonl": {"XS016": 2},
    "bug8-xtilecfg-without-xtiledata.jsonl": {"XS017": 1},
    "cloud-hypervisor-4k-get-xsave.jsonl": {"XS020": 2},
    "firecracker-5438-no-guest-perm.jsonl": {},
}
FILES = sorted(p.name for p in SCENARIOS.glob("*.jsonl"))
CLEAN = [name for name in FILES if not EXPECTED_RULES.get(name)]


def expected(path: Path) -> set[tuple[int, str]]:
    """(line, rule) pairs from the `# expect-next:` markers."""
    out, pending = set(), None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(MARK):
            assert pending is None, f"{path.name}:{n}: two markers in a row"
            pending = line[len(MARK):].split()
            assert pending and all(r in BY_ID for r in pending), f"{path.name}:{n}: bad marker {line!r}"
        elif line.strip() and not line.startswith("#"):
            if pending:
                out |= {(n, r) for r in pending}
            pending = None
    assert pending is None, f"{path.name}: a marker with no event after it"
    return out


def events_of(path: Path):
    """(line, event) of every event in the file."""
    return [(n, decode_line(line.encode())) for n, line in enumerate(path.read_text().splitlines(), 1)
            if line.strip() and not line.startswith("#")]


def test_every_scenario_has_an_expectation():
    assert FILES and set(FILES) == set(EXPECTED_RULES)


@pytest.mark.parametrize("name", FILES)
def test_markers_agree_with_the_expected_rules(name):
    counts = Counter(rule for _, rule in expected(SCENARIOS / name))
    assert counts == Counter(EXPECTED_RULES[name])


@pytest.mark.parametrize("name", FILES)
def test_cli_replay_gives_exactly_the_expected_verdicts(name):
    path = SCENARIOS / name
    proc = subprocess.run([sys.executable, "-m", "agent", "replay", "--format", "json", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    want = expected(path)
    assert proc.returncode == (1 if want else 0), proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(v["line"], v["rule"]) for v in got} == want
    assert len(got) == len(want)
    for v in got:
        assert v["severity"] == BY_ID[v["rule"]].severity
        assert v["file"] == str(path)
    assert f"{len(events_of(path))} events judged" in proc.stderr


def test_all_scenarios_in_one_replay_give_the_union():
    """One agent watching every scenario at once (distinct processes) judges each as alone."""
    got = set()
    replay([str(SCENARIOS / n) for n in FILES], Engine(),
           lambda v, file, line: got.add((Path(file).name, line, v.rule.id)), Summary())
    want = {(n, line, rule) for n in FILES for line, rule in expected(SCENARIOS / n)}
    assert got == want


@pytest.mark.parametrize("name", CLEAN)
def test_clean_scenarios_stay_clean_when_the_agent_starts_late(name):
    evs = [ev for _, ev in events_of(SCENARIOS / name)]
    for cut in range(len(evs)):
        engine = Engine()
        assert not [v.rule.id for ev in evs[cut:] for v in engine.judge(ev)], f"started at event {cut}"


@pytest.mark.parametrize("name, syncs_with_save_restore", [("amx-selftest-6.1.jsonl", 10),
                                                           ("amx-selftest-7.2.jsonl", 11)])
def test_selftest_runs_have_the_selftest_shape(name, syncs_with_save_restore):
    """One VM per save/restore cycle plus the first; realistic AMX sizes and masks throughout."""
    evs = [ev for _, ev in events_of(SCENARIOS / name)]
    kinds = Counter(ev.kind for ev in evs)
    assert kinds["vcpu_create"] == kinds["vcpu_destroy"] == syncs_with_save_restore + 1
    assert len({ev.vm for ev in evs if ev.kind == "vcpu_create"}) == syncs_with_save_restore + 1
    assert {ev.xcr0_supported for ev in evs if ev.kind == "cpuid"} == {0x602E7}
    assert {(ev.features, ev.size) for ev in evs if ev.kind == "fpstate"} == {(XTILEDATA, 11008)}
    assert {ev.size for ev in evs if ev.kind == "xsave"} == {11008}
    assert [ev.value for ev in evs if ev.kind == "xfd_err" and ev.source == "nm"] == [XTILEDATA]
    assert evs[0].kind == "perm" and evs[0].option == "REQ_XCOMP_GUEST_PERM" and evs[-1].kind == "exit"


def test_72_restore_tiledata_is_not_judged_but_the_restore_order_is():
    """The stage-5 decision (see the scenario header).

    RESTORE_TILEDATA loads XSTATE_BV[18]=1 right after the guest armed XFD
    and kept running, so XFD is unknown and XS018 stays silent. Had the host
    set XFD itself (KVM_SET_MSRS) just before, XS018 would fire there.
    """
    lines = events_of(SCENARIOS / "amx-selftest-7.2.jsonl")
    evs = [ev for _, ev in lines]
    sets = [i for i, ev in enumerate(evs) if isinstance(ev, Xsave) and ev.op == "set" and ev.xstate_bv & XTILEDATA]
    stage5 = [i for i in sets if isinstance(evs[i - 2], Xfd) and evs[i - 2].source == "guest"]
    assert len(stage5) == 1, "the RESTORE_TILEDATA KVM_SET_XSAVE right after the guest's XFD write"
    i = stage5[0]
    assert evs[i - 2].value == XTILEDATA and evs[i - 1].kind == "passthrough"

    engine = Engine()
    found = [(j, v.rule.id) for j, ev in enumerate(evs) for v in engine.judge(ev)]
    assert found == []

    host_msrs = Xfd(v=1, ts=evs[i].ts, tgid=evs[i].tgid, vm=evs[i].vm, vcpu=evs[i].vcpu,
                    value=XTILEDATA, source="host", ret=0)
    engine = Engine()
    variant = evs[:i] + [host_msrs] + evs[i:]
    found = [(j, v.rule.id) for j, ev in enumerate(variant) for v in engine.judge(ev)]
    assert found == [(i + 1, "XS018")]
