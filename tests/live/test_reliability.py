"""The live agent (`xstate-agent run`, real BPF) under a KVM_SET_XCRS flood from benchmarks/loadgen.c:

- SIGTERM in the middle of a burst, the events log rotating under it: every event the agent received
  (agent/stats.py says what that is) is in the log, and every line of the log is whole and valid;
- a ring buffer too small for the flood (XSTATE_RINGBUF_PAGES): every record the probes made is received or
  counted in the loss counter of /metrics, exactly (sent = seen + lost; a second reader counts what other
  VMMs of a shared host made meanwhile); the loss alert fires on the agent's own series (promtool); once the
  flood stops the agent sees events again and loses none."""

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import yaml

from agent.events.reader import read_files
from agent.kvmctl import ARCH_GET_XCOMP_SUPP, arch_prctl_get
from agent.live import HEALTH_EVERY_S
from agent.probes import decode
from agent.probes.tracepoint_backend import TracepointBackend
from agentproc import ROOT, Agent, wait_until
from livecheck import require_kvm
from livecollector import Collector
from promstack import need

sys.path.insert(0, str(ROOT / "benchmarks"))
import livebench as lb  # noqa: E402 - the load generator, as the benchmarks build and drive it

RULES = ROOT / "dashboards" / "alerts" / "xstate.rules.yml"
SUMMARY = re.compile(r"(\d+) events judged, (\d+) violations, lost: events_log (\d+), reader (\d+), ringbuf (\d+)")
# 4 pages hold 146 records: FLOOD_RATE calls/s ask for 240 between two 2 ms polls (a slower machine makes
# fewer, but its agent reads slower too); a burst of RECOVERY calls leaves room for other processes' records
# and a late poll.
SMALL_RING_PAGES = 4
FLOOD_RATE = 120_000
RECOVERY = 50


@pytest.fixture(scope="module", autouse=True)
def polite():
    """The load generator at the nice of the other processes of a shared machine, not the benchmarks' -20."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lb, "NICE", 0)
        yield


@dataclass
class Counters:
    """What /metrics says: events received (sum of xstate_events_total) and lost, by stage."""
    received: int
    lost: dict

    @classmethod
    def of(cls, agent: Agent) -> "Counters":
        text = agent.metrics()
        received = sum(float(v) for v in re.findall(r"^xstate_events_total\{[^}]*\} (\S+)$", text, re.M))
        lost = {s: int(float(v)) for s, v in re.findall(r'^xstate_events_lost_total\{stage="(\w+)"\} (\S+)$',
                                                         text, re.M)}
        return cls(int(received), lost)

    def accounted(self) -> int:
        return self.received + self.lost["ringbuf"] + self.lost["reader"]


def _log_files(agent: Agent) -> list:
    """The events log and its rotated files, oldest first."""
    rotated = sorted(agent.log.parent.glob(agent.log.name + ".*"), key=lambda p: int(p.suffix[1:]), reverse=True)
    return rotated + [agent.log]


def test_sigterm_mid_burst_keeps_every_received_event_in_whole_lines(tmp_path):
    require_kvm()
    # A small size: in a burst, batches (up to POLL_RECORDS events) go into files of their own.
    agent = Agent(tmp_path, "--events-log-max-bytes", str(64 << 10), "--events-log-keep", "1000")
    # Unpaced, one per CPU: more than the reader takes, for longer than the test needs.
    floods = [lb.Flood(0, 10, cpu) for cpu in (lb.LOAD_CPU, lb.AGENT_CPU)]
    try:
        start = Counters.of(agent).received
        for f in floods:
            f.go()
        # Mid-burst: the agent has judged some of the flood, which goes on.
        assert wait_until(lambda: Counters.of(agent).received > start + 5000, 10), agent.stderr()
        before = Counters.of(agent)  # the last scrape before the signal
        t_term = time.monotonic()
        assert agent.stop(signal.SIGTERM) == 0, agent.stderr()
        stop_s = time.monotonic() - t_term
        # Stopped while the flood still ran: a reader that is outpaced still sees the signal.
        assert all(f.p.poll() is None for f in floods), "the agent stopped only once the flood was over"
    finally:
        agent.stop(signal.SIGKILL)
        for f in floods:
            f.p.kill()
            f.p.communicate()
    summary = SUMMARY.search(agent.stderr())
    assert summary, agent.stderr()
    judged, events_log_lost, ringbuf_lost = int(summary[1]), int(summary[3]), int(summary[5])
    assert judged >= before.received and ringbuf_lost >= before.lost["ringbuf"]

    files = _log_files(agent)
    assert len(files) > 1, "the log did not rotate under the burst"
    for f in files:
        data = f.read_bytes()
        assert data.endswith(b"\n"), f"{f}: the last line is cut"
        # Line 1: the run's comment in the oldest file, "continues PATH.1" in the others.
        assert data.startswith(b"# xstate-agent ") and (f == files[0] or b"continues" in data.split(b"\n", 1)[0])
    # The strict reader takes every line of every file (it raises at the first bad one).
    events = [e for _, evs, _ in read_files(map(str, files)) for e in evs]
    assert events_log_lost == 0
    # Every received event is in the log: received = judged = logged (+ lost at the log, none here).
    assert len(events) == judged
    mine = sum(e.tgid in (floods[0].pid, floods[1].pid) for e in events)
    print(f"SIGTERM mid-flood: stopped in {stop_s:.1f} s; {mine} events of the flood judged, {judged} in all; "
          f"ringbuf lost {ringbuf_lost}; {len(files)} files")
    assert mine > 0


@dataclass
class Tally(TracepointBackend):
    """A second set of the agent's probes whose ring buffer holds the whole flood: every record they make
    on this host, (tgid, ts, kind), undecoded. What the kernel made, to hold the agent's counts against: on
    a shared host other VMMs' records share the agent's ring buffer and its loss counter."""

    made: list = field(default_factory=list)

    def _on_raw(self, _ctx, data, size):
        raw = decode.Raw.unpack(ctypes.string_at(data, size))
        self.made.append((raw.tgid, raw.ts, raw.kind))


@dataclass
class Overflow:
    agent: Agent
    sent: int  # KVM_SET_XCRS calls of the flood
    flood: int  # its pid
    base: Counters  # /metrics before the flood
    after: Counters  # /metrics once it is drained
    made: list  # (tgid, ts, kind) of every record the probes made, from Tally
    tally_lost: int
    events: list  # the agent's events log
    # CLOCK_MONOTONIC: the base scrape, the flood's start, a time when the agent had drained its ring buffer
    # (the window of the exact count), the scrape after.
    t_base: int
    t_go: int
    t_end: int
    t_after: int

    def in_window(self, ts: int) -> bool:
        return self.t_go <= ts <= self.t_end


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    """The agent with a small ring buffer, and one flood through it: what went in (Tally), what came out
    (its log), what it counted lost (/metrics)."""
    require_kvm()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSTATE_RINGBUF_PAGES", str(SMALL_RING_PAGES))
        agent = Agent(tmp_path_factory.mktemp("overflow"))
    tally = Collector()
    try:
        tally.start(Tally(tally, ringbuf_pages=16384))
        flood = lb.Flood(FLOOD_RATE, 1)
        try:
            # Its set-up (vcpu_create, cpuid) is received before the window opens.
            agent.wait_events(lambda evs: any(e.tgid == flood.pid and e.kind == "cpuid" for e in evs))
            t_base = time.monotonic_ns()
            base = Counters.of(agent)
            t_go = time.monotonic_ns()
            flood.go()
            sent = flood.wait()["sent"]
            _marker(agent, t_go)  # received: the agent has caught up with the flood
            t_end = time.monotonic_ns()
            _marker(agent, t_end)  # every record made before t_end is received, or lost
            assert wait_until(lambda: any(r[0] == os.getpid() and r[1] > t_end for r in tally.backend.made[-500:]),
                              10), "the second reader did not get the marker"
            time.sleep(2 * HEALTH_EVERY_S)  # the agent has copied the kernel's loss counter since
            after = Counters.of(agent)
            t_after = time.monotonic_ns()
            tally_lost = tally.backend.lost()
        finally:
            flood.finish()
    except BaseException:
        agent.stop()
        raise
    finally:
        tally.close()
    yield Overflow(agent, sent, flood.pid, base, after, tally.backend.made, tally_lost, agent.events(),
                   t_base, t_go, t_end, t_after)
    agent.stop()


def _marker(agent: Agent, since: int) -> None:
    """Events of this process, made until the agent receives one (the ring buffer is read in order: what
    was reserved before it has been received, or was lost). Made while the ring buffer is still full, a
    marker is lost too, and counted so."""
    for _ in range(50):
        arch_prctl_get(ARCH_GET_XCOMP_SUPP)
        if wait_until(lambda: any(e.tgid == os.getpid() and e.ts > since for e in agent.events()[-1000:]), 0.2):
            return
    raise AssertionError("the agent received none of 50 markers")


def test_flood_losses_are_counted_exactly(overflow):
    o = overflow
    lost = o.after.lost["ringbuf"] - o.base.lost["ringbuf"]
    made = [r for r in o.made if o.in_window(r[1])]
    seen = [e for e in o.events if o.in_window(e.ts)]
    flood_made = sum(r[0] == o.flood for r in made)
    flood_seen = sum(e.tgid == o.flood for e in seen)
    others = [r for r in made if r[0] not in (o.flood, os.getpid())]
    # Other VMMs' KVM_CREATE_VM records: they only name a VM, so when received they are in no count.
    vm_creates = sum(r[2] == decode.EV_VM_CREATE for r in others)
    print(f"flood of {o.sent} calls through a {SMALL_RING_PAGES}-page ring: {flood_seen} received, {lost} "
          f"lost (with those of {len(others)} records of other processes made meanwhile, {vm_creates} "
          f"KVM_CREATE_VM)")
    assert o.tally_lost == 0, "the second reader lost records: it cannot count what the kernel made"
    assert flood_made == o.sent  # one record per call
    assert lost > 0, "the flood did not overflow the ring buffer"
    assert o.after.lost["reader"] == o.base.lost["reader"] and o.after.lost["events_log"] == 0
    # Every record made was received or counted lost: sent = seen + lost, other processes' records included.
    assert len(made) - vm_creates <= len(seen) + lost <= len(made)
    # On a quiet host, from /metrics alone: around the two scrapes, only the flood and this process's markers.
    if all(r[0] in (o.flood, os.getpid()) for r in o.made if o.t_base - 10**9 <= r[1] <= o.t_after):
        markers = sum(r[0] == os.getpid() for r in o.made if o.t_base <= r[1] <= o.t_after)
        assert o.sent + markers == (o.after.received - o.base.received) + lost


def test_loss_alert_fires_on_the_agents_series(overflow, tmp_path):
    """promtool on the agent's own loss counters before and after the flood, as two scrapes a minute apart
    would have seen them."""
    o = overflow
    labels = 'job="xstate-agent",instance="hv:9477"'
    series = [{"series": f'xstate_events_lost_total{{{labels},stage="{stage}"}}',
               "values": f"{o.base.lost[stage]}x10 {n}x10"} for stage, n in o.after.lost.items()]
    losing = {s: n - o.base.lost[s] for s, n in o.after.lost.items() if n > o.base.lost[s]}
    assert set(losing) == {"ringbuf"}
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "XstateEventsLost")
    alerts = 'ALERTS{alertname="XstateEventsLost"}'

    def firing(stage):
        return {"labels": f'ALERTS{{alertname="XstateEventsLost",alertstate="firing",{labels},severity="warning",'
                          f'stage="{stage}"}}', "value": 1}
    test = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "promql_expr_test": [
            {"expr": alerts, "eval_time": "9m", "exp_samples": []},
            {"expr": alerts, "eval_time": "12m", "exp_samples": [firing(s) for s in losing]},
            # The alert's value, which its description gives: the events lost.
            {"expr": rule["expr"], "eval_time": "12m",
             "exp_samples": [{"labels": f'{{{labels},stage="{s}"}}', "value": n} for s, n in losing.items()]},
            {"expr": alerts, "eval_time": "18m", "exp_samples": []},  # no loss for 5 minutes: resolved
        ]}]}
    path = tmp_path / "loss.test.yml"
    path.write_text(yaml.safe_dump(test))
    r = subprocess.run([need("promtool"), "test", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_agent_recovers_when_the_flood_stops(overflow):
    agent = overflow.agent
    before = Counters.of(agent)
    logged = len(agent.events())
    for _ in range(RECOVERY):  # fewer records than the small ring holds
        arch_prctl_get(ARCH_GET_XCOMP_SUPP)

    def mine(evs):
        return sum(e.kind == "perm" and e.tgid == os.getpid() for e in evs[logged:])
    assert mine(agent.wait_events(lambda evs: mine(evs) >= RECOVERY)) == RECOVERY
    time.sleep(2 * HEALTH_EVERY_S)  # the agent has copied the kernel's loss counter since
    now = Counters.of(agent)
    assert now.lost == before.lost, "events lost after the flood"
    assert now.received >= before.received + RECOVERY
