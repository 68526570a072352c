"""The statistics observer (agent/stats.py) and its Prometheus exposition (agent/exporters/prometheus.py)."""

import subprocess
import threading
import time

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.events.reader import read_files
from agent.exporters.prometheus import make_registry
from agent.pipeline import Pipeline
from agent.policy.engine import Engine
from agent.stats import LATENCY_BUCKETS, OTHER_VM, Stats, rules_hash
from helpers import (
    AMX, GUEST_SIZE, NO_AMX, TILE, TILEDATA, cpuid, exit_, fpstate, fpu_load, get_guest, passthrough, req_guest,
    vcpu_create, vcpu_destroy, xcr0, xfd, xfd_err, xsave,
)
from promstack import INCIDENTS, need


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def feed(stats_kw=None, *events, engine=None):
    engine = engine or Engine()
    stats = Stats(engine, **(stats_kw or {}))
    Pipeline(engine, observers=[stats]).feed(events)
    return stats


def samples(stats, process=False) -> dict:
    """{(name, frozenset(labels)): value} of a scrape."""
    text = generate_latest(make_registry(stats, process=process)).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scrape, name, **labels):
    return scrape.get((name, frozenset(labels.items())))


def amx_guest(vm="vm-1", vcpu=0, tgid=4242):
    kw = dict(vm=vm, vcpu=vcpu, tgid=tgid)
    return [get_guest(AMX, tgid=tgid), vcpu_create(**kw), cpuid(AMX, **kw),
            fpstate(TILE, size=GUEST_SIZE, **kw), xcr0(AMX, **kw), fpu_load(AMX, guest_size=GUEST_SIZE, **kw)]


def test_events_are_counted_by_kind_source_and_result():
    stats = feed(None, *amx_guest(), xcr0(0x3, source="host", ret=-22), xfd(TILEDATA), xfd_err(TILEDATA),
                 xfd_err(0, source="guest"), xsave("get", NO_AMX, size=4096, ret=-22), req_guest(ret=-16))
    m = samples(stats)
    assert value(m, "xstate_events_total", kind="xcr0", source="guest", result="accepted") == 1
    assert value(m, "xstate_events_total", kind="xcr0", source="host", result="refused") == 1
    assert value(m, "xstate_events_total", kind="xfd_err", source="nm", result="accepted") == 1
    assert value(m, "xstate_events_total", kind="xfd_err", source="guest", result="accepted") == 1
    assert value(m, "xstate_events_total", kind="xsave", source="", result="refused") == 1
    assert value(m, "xstate_events_total", kind="fpu_load", source="", result="accepted") == 1
    assert value(m, "xstate_events_total", kind="perm", source="", result="accepted") == 1
    assert value(m, "xstate_events_total", kind="perm", source="", result="refused") == 1
    assert value(m, "xstate_arch_prctl_calls_total", option="GET_XCOMP_GUEST_PERM", feature="",
                 result="accepted") == 1
    assert value(m, "xstate_arch_prctl_calls_total", option="REQ_XCOMP_GUEST_PERM", feature="18",
                 result="refused") == 1
    total = sum(v for (name, _), v in m.items() if name == "xstate_events_total")
    assert total == 6 + 6


def test_per_vm_counters_and_gauges():
    events = [*amx_guest("web-1", 0), *amx_guest("web-1", 1)[1:], *amx_guest("db-7", 0, tgid=5151),
              xfd(TILEDATA, vm="web-1"), passthrough(True, vm="web-1"), xfd_err(TILEDATA, vm="web-1"),
              xfd_err(TILEDATA, vm="web-1", vcpu=1), xcr0(AMX, vm="db-7", tgid=5151, source="host")]
    m = samples(feed(None, *events))
    assert value(m, "xstate_guest_xsetbv_total", vm="web-1") == 2
    assert value(m, "xstate_guest_xsetbv_total", vm="db-7") == 1  # the host write is not the guest's
    assert value(m, "xstate_guest_xfd_writes_total", vm="web-1") == 1
    assert value(m, "xstate_guest_xfd_err_saves_total", vm="web-1") == 2
    assert value(m, "xstate_guest_xfd_err_saves_total", vm="db-7") == 0
    assert value(m, "xstate_amx_vcpus", vm="web-1") == 2
    assert value(m, "xstate_guest_fpu_buffer_bytes", vm="web-1") == 2 * GUEST_SIZE
    assert value(m, "xstate_xfd_passthrough_vcpus", vm="web-1") == 1
    assert value(m, "xstate_amx_vms") == 2
    assert value(m, "xstate_tracked_vcpus") == 3 and value(m, "xstate_tracked_processes") == 2
    # vcpu never is a label, nor tgid.
    assert not any(k in {"vcpu", "tgid", "pid", "ts"} for _, labels in m for k, _ in labels)


def test_no_vm_label_sums_per_host_and_starts_every_rule_at_zero():
    events = [*amx_guest("web-1"), *amx_guest("db-7", tgid=5151), xfd_err(TILEDATA, vm="db-7", tgid=5151),
              fpstate(TILE, vm="batch-3", tgid=6161, ret=-12)]
    m = samples(feed({"per_vm": False}, *events))
    assert not any(k == "vm" for _, labels in m for k, _ in labels)
    assert value(m, "xstate_guest_xsetbv_total") == 2
    assert value(m, "xstate_guest_xfd_err_saves_total") == 1
    assert value(m, "xstate_amx_vcpus") == 2
    assert value(m, "xstate_guest_fpu_buffer_bytes") == 2 * GUEST_SIZE
    assert value(m, "xstate_violations_total", rule="XS011", severity="critical") == 1
    # Every rule of the profile is there from zero (increase() then sees the first violation).
    rules = [dict(labels)["rule"] for (name, labels) in m if name == "xstate_violations_total"]
    assert sorted(rules) == [r.id for r in Engine().rules]
    assert value(m, "xstate_violations_total", rule="XS001", severity="critical") == 0


def test_violations_name_rule_severity_and_vm():
    events = [get_guest(NO_AMX), vcpu_create(vm="batch-3"), xcr0(AMX, vm="batch-3"),
              fpstate(TILE, vm="db-7", ret=-12), req_guest(ret=-16)]
    stats = feed(None, *events)
    m = samples(stats)
    assert value(m, "xstate_violations_total", rule="XS001", severity="critical", vm="batch-3") == 1
    assert value(m, "xstate_violations_total", rule="XS011", severity="critical", vm="db-7") == 1
    # XS013 is about the process (an arch_prctl call): no VM.
    assert value(m, "xstate_violations_total", rule="XS013", severity="warning", vm="") == 1
    assert stats.violations == {"XS001": 1, "XS011": 1, "XS013": 1}


def test_vms_past_the_cap_are_counted_together():
    events = []
    for n in range(5):
        events += [vcpu_create(vm=f"vm-{n}"), xcr0(0x3, vm=f"vm-{n}")]
    stats = feed({"max_vms": 3}, *events)
    m = samples(stats)
    vms = sorted(dict(labels)["vm"] for (name, labels) in m if name == "xstate_guest_xsetbv_total")
    assert vms == [OTHER_VM, "vm-0", "vm-1", "vm-2"]
    assert value(m, "xstate_guest_xsetbv_total", vm=OTHER_VM) == 2
    assert value(m, "xstate_vm_labels") == 3 and value(m, "xstate_vm_labels_limit") == 3
    assert value(m, "xstate_vm_label_overflows_total") == 2


def test_a_gone_vm_keeps_its_series_for_the_retention_then_loses_them():
    clock = Clock()
    engine = Engine()
    stats = Stats(engine, vm_retention=600, clock=clock)
    p = Pipeline(engine, observers=[stats])
    p.feed([vcpu_create(vm="old", tgid=1), xcr0(0x3, vm="old", tgid=1), fpstate(TILE, vm="old", tgid=1, ret=-12),
            vcpu_create(vm="new", tgid=2)])
    assert value(samples(stats), "xstate_guest_xsetbv_total", vm="old") == 1
    p.feed([exit_(tgid=1)])
    clock.now += 300
    m = samples(stats)
    assert value(m, "xstate_guest_xsetbv_total", vm="old") == 1
    assert value(m, "xstate_violations_total", rule="XS011", severity="critical", vm="old") == 1
    assert value(m, "xstate_amx_vcpus", vm="old") == 0  # no vCPU left
    clock.now += 599  # the retention runs from the first scrape that found the VM gone
    assert value(samples(stats), "xstate_guest_xsetbv_total", vm="old") == 1
    clock.now += 1
    m = samples(stats)
    assert value(m, "xstate_guest_xsetbv_total", vm="old") is None
    assert value(m, "xstate_violations_total", rule="XS011", severity="critical", vm="old") is None
    assert value(m, "xstate_guest_xsetbv_total", vm="new") == 0  # tracked: counted from zero
    # Back again: a new series from zero.
    p.feed([vcpu_create(vm="old", tgid=3), xcr0(0x3, vm="old", tgid=3)])
    assert value(samples(stats), "xstate_guest_xsetbv_total", vm="old") == 1


def test_destroyed_vcpus_leave_the_gauges():
    stats = feed(None, *amx_guest("web-1", 0), *amx_guest("web-1", 1)[1:], vcpu_destroy(vm="web-1", vcpu=1))
    m = samples(stats)
    assert value(m, "xstate_amx_vcpus", vm="web-1") == 1
    assert value(m, "xstate_guest_fpu_buffer_bytes", vm="web-1") == GUEST_SIZE


def test_vm_names_replace_ids_in_labels_and_are_cleaned():
    stats = feed(None, vcpu_create(vm="a"), xcr0(0x3, vm="a"), vcpu_create(vm="b"), xcr0(0x3, vm="b"),
                 vcpu_create(vm="c"), xcr0(0x3, vm="c"))
    stats.set_vm_name("a", "web\n1")
    stats.set_vm_name("b", "x" * 500)
    stats.set_vm_name("c", "web\n1")  # two VMs with one name: one series, summed
    m = samples(stats)
    assert value(m, "xstate_guest_xsetbv_total", vm="web?1") == 2
    assert value(m, "xstate_guest_xsetbv_total", vm="x" * 128) == 1
    stats.set_vm_name("a", None)
    assert value(samples(stats), "xstate_guest_xsetbv_total", vm="a") == 1


def test_health_hooks_of_the_live_side():
    stats = Stats(Engine())
    stats.lost("ringbuf", 0)
    stats.lost("reader", 2)
    stats.set_lost("ringbuf", 40)
    stats.set_lost("ringbuf", 30)  # a total never goes down
    stats.probe("kvm_exit", "tracepoint", True, kinds=["xcr0", "xfd"])
    stats.probe("kvm_fpu", "tracepoint", False, kinds=["fpu_load"])
    stats.probe("kvm_load_guest_fpu", "kprobe", False, kinds=["fpu_load"])
    m = samples(stats)
    assert value(m, "xstate_events_lost_total", stage="ringbuf") == 40
    assert value(m, "xstate_events_lost_total", stage="reader") == 2
    assert value(m, "xstate_probe_attached", probe="kvm_exit", backend="tracepoint") == 1
    assert value(m, "xstate_probe_attached", probe="kvm_fpu", backend="tracepoint") == 0
    assert value(m, "xstate_event_source_probes", kind="xcr0") == 1
    assert value(m, "xstate_event_source_probes", kind="fpu_load") == 0
    assert value(m, "xstate_tracked_evictions_total", object="vcpu") == 0
    # No latency histogram unless the live side measures it (a file's ts is not a clock).
    assert not any(name.startswith("xstate_event_latency") for name, _ in m)


def test_latency_histogram_samples_events_against_the_clock():
    now = [10_000_000_000]
    engine = Engine()
    stats = Stats(engine)
    stats.measure_latency(clock=lambda: now[0], every=1)
    p = Pipeline(engine, observers=[stats])
    p.feed([vcpu_create(ts=now[0] - 30_000), vcpu_create(vcpu=1, ts=now[0] - 2_000_000),
            vcpu_create(vcpu=2, ts=now[0] + 5)])  # a ts ahead of the clock counts as no delay
    m = samples(stats)
    assert value(m, "xstate_event_latency_seconds_count") == 3
    assert value(m, "xstate_event_latency_seconds_bucket", le="1e-05") == 1
    assert value(m, "xstate_event_latency_seconds_bucket", le="5e-05") == 2
    assert value(m, "xstate_event_latency_seconds_bucket", le="0.0025") == 3
    assert value(m, "xstate_event_latency_seconds_sum") == pytest.approx(0.00203)
    assert len(LATENCY_BUCKETS) + 1 == sum(1 for n, _ in m if n == "xstate_event_latency_seconds_bucket")

    sampled = Stats(Engine())
    sampled.measure_latency(clock=lambda: now[0], every=8)
    Pipeline(sampled.engine, observers=[sampled]).feed([vcpu_create(vcpu=n) for n in range(20)])
    assert value(samples(sampled), "xstate_event_latency_seconds_count") == 2


def test_build_and_policy_info():
    m = samples(Stats(Engine("reference", dyn=TILEDATA)))
    info = [dict(labels) for (name, labels) in m if name == "xstate_policy_info"]
    assert info == [{"profile": "reference", "rules_hash": rules_hash(Engine("reference").rules), "dyn": "0x40000"}]
    assert rules_hash(Engine("reference").rules) != rules_hash(Engine("upstream").rules)
    assert [n for n, _ in m if n == "xstate_build_info"]


def test_scrapes_while_the_pipeline_runs():
    """The collector reads from another thread while events flow: no error, counts only grow."""
    events = []
    for _, batch, _ in read_files([str(INCIDENTS)]):
        events.extend(batch)
    engine = Engine(max_vcpus=3, max_processes=2)  # evictions too
    stats = Stats(engine, max_vms=2)
    pipeline = Pipeline(engine, observers=[stats])
    registry = make_registry(stats, process=False)
    done = threading.Event()
    errors = []

    def scrape():
        last = 0
        while not done.is_set():
            try:
                snap = stats.snapshot()
                total = sum(snap.events.values())
                assert total >= last
                last = total
                generate_latest(registry)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    t = threading.Thread(target=scrape)
    t.start()
    for _ in range(300):
        pipeline.feed(events)
    done.set()
    t.join()
    assert not errors
    assert sum(stats.snapshot().events.values()) == 300 * len(events)


def test_observer_cost_per_event():
    """Well under a microsecond per event: plain counters, no prometheus_client call (bound loose for CI)."""
    events = []
    for _, batch, _ in read_files([str(INCIDENTS)]):
        events.extend(batch)
    events *= 500
    stats = Stats(Engine())
    observe = stats.observe
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for ev in events:
            observe(ev, ())
        best = min(best, time.perf_counter() - t0)
    per_event = best / len(events)
    assert per_event < 2e-6, f"{per_event * 1e9:.0f} ns per event"


def test_promtool_accepts_the_exposition_with_every_metric(tmp_path):
    """All metric families, the live side's included, pass `promtool check metrics`."""
    promtool = need("promtool")
    events = []
    for _, batch, _ in read_files([str(INCIDENTS)]):
        events.extend(batch)
    engine = Engine()
    stats = Stats(engine)
    stats.measure_latency(clock=lambda: 10**12, every=1)
    stats.lost("ringbuf", 3)
    stats.probe("kvm_exit", "tracepoint", True, kinds=["xcr0"])
    Pipeline(engine, observers=[stats]).feed(events)
    text = generate_latest(make_registry(stats))
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout + r.stderr).decode()
