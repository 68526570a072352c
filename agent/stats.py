"""Statistics of the pipeline, kvm_stat style: plain counters kept per event, read at scrape time.

`Stats` is an Observer of the Pipeline (`observe(ev, violations)`). Per event it
does a few dict and attribute updates (no prometheus_client call, no lock, no
allocation but a small key tuple); everything else, tracked state, per-VM
gauges, ageing of per-VM series, is computed when `snapshot()` is called,
which the Prometheus collector does at each scrape, from another thread.

Threads: `observe` runs in the pipeline's thread only. The methods the live
side calls (`lost`, `set_lost`, `probe`, `set_vm_name`, `observe_latency`)
may be called from any thread. `snapshot` copies what it reads.

The live side (probes) uses it so:

    stats = Stats(engine, per_vm=True)
    stats.measure_latency(time.monotonic_ns)      # events' ts are CLOCK_MONOTONIC
    stats.probe("kvm_exit", "tracepoint", attached=True, kinds=("xcr0", "xfd", "xfd_err"))
    stats.lost("ringbuf", 0)                      # declare the stage: its counter starts at 0
    stats.set_lost("ringbuf", total_from_bpf_map) # or stats.lost("reader", n) as losses happen
    stats.set_vm_name(vm, "web-1")                # QEMU -name, for the vm label
    Pipeline(engine, printer, log, observers=[stats])

Accounting of the live agent. An event is *received* when the reader has
taken its record out of the BPF ring buffer and decoded it (the backend hands
it to LiveRunner.on_event); the runner writes it to the events log, if any,
then the pipeline judges it and `observe` counts it here, once, in
xstate_events_total: received and judged are the same events, whatever became
of their log line. Over a span at whose end the agent has drained the ring
buffer (as it does when it stops):

    records the probes made = received + lost["ringbuf"] + lost["reader"]
                              (+ KVM_CREATE_VM records, which name a VM and are no event)
    received = sum of xstate_events_total = "N events judged" (the summary at stop)
             = event lines written to the events log + lost["events_log"]

`ringbuf` counts the records the kernel could not reserve (ring buffer full),
`reader` the records taken out but not decodable. tests/live/test_reliability.py
checks both equations on a real kernel.

Cardinality: the `vm` label (per-VM metrics) is bounded by `max_vms`; VMs
past the cap are counted together under the label `_other`. A VM that the
policy engine no longer tracks (its vCPUs destroyed, its process gone or
evicted) keeps its series for `vm_retention` seconds, so that Prometheus
sees its last values and the alert rules can name it, then its series go.
"""

import hashlib
import json
import sys
import threading
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass

from agent import __version__
from agent.events import Fpstate, FpuLoad, Perm, Xcr0, Xfd, XfdErr
from agent.events.model import EVENT_TYPES

# Label values.
ACCEPTED, REFUSED = "accepted", "refused"
NO_VM = ""  # violations of process-level rules (arch_prctl calls) name no VM
OTHER_VM = "_other"  # VMs past --max-vms, counted together
VM_NAME_MAX = 128

DEFAULT_MAX_VMS = 512
DEFAULT_VM_RETENTION = 900.0

# Loss stages the agent knows of; the live side may report others.
LOSS_STAGES = ("ringbuf", "reader", "events_log")

# The `source` values of each kind that has one (spec/events.md); "" for the others.
SOURCES = {"xcr0": ("guest", "host"), "xfd": ("guest", "host"), "xfd_err": ("nm", "guest", "host")}
# Every (kind, source, accepted) that an event can be counted under, accepted then refused.
EVENT_KEYS = tuple((t.kind, src, ok) for t in EVENT_TYPES for src in SOURCES.get(t.kind, ("",))
                   for ok in (True, False))

# Latency from the kernel event (its `ts`, CLOCK_MONOTONIC) to its verdict.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The histogram samples one event in this many.
LATENCY_SAMPLE_EVERY = 8
_LATENCY_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)


def rules_hash(rules) -> str:
    """A short digest of the rule table in force: changes when a rule's id, severity, kinds or text do."""
    table = json.dumps([r.to_dict() for r in rules], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(table.encode()).hexdigest()[:16]


def clean_vm_name(name: str) -> str:
    """A human VM name as a label value: printable, at most VM_NAME_MAX characters."""
    name = "".join(ch if ch.isprintable() else "?" for ch in name)
    return name[:VM_NAME_MAX] or "?"


class VmStats:
    """Counters of one VM (or of the `_other` group, or of the host when the vm label is off)."""

    __slots__ = ("xsetbv", "xfd_writes", "nm_saves", "violations", "gone_since")

    def __init__(self):
        self.xsetbv = 0
        self.xfd_writes = 0
        self.nm_saves = 0
        self.violations: Counter = Counter()
        self.gone_since: float | None = None


@dataclass
class VmRow:
    """What the metrics say about one `vm` label value."""

    xsetbv: int = 0
    xfd_writes: int = 0
    nm_saves: int = 0
    amx_vcpus: int = 0
    fpu_bytes: int = 0
    passthrough_vcpus: int = 0


@dataclass
class Snapshot:
    """A consistent-enough copy of the statistics, taken at scrape time."""

    per_vm: bool
    profile: str
    dyn: int
    rules_hash: str
    version: str
    python: str
    # (kind, source, result) -> events
    events: dict
    # (option, feature, result) -> calls; feature is "" for GET_* calls
    perm: dict
    # (rule, severity, vm) -> violations; vm is None when the vm label is off
    violations: dict
    # vm label (None when off) -> VmRow
    vms: dict
    amx_vms: int
    lost: dict
    # (probe, backend) -> 1 or 0
    probes: dict
    # kind -> attached probes that feed it
    sources: dict
    tracked_processes: int
    tracked_vcpus: int
    max_processes: int
    max_vcpus: int
    evicted_processes: int
    evicted_vcpus: int
    vm_labels: int
    max_vms: int
    vm_overflows: int
    # (cumulative bucket counts, one per LATENCY_BUCKETS then +Inf; sum in seconds), or None
    latency: tuple | None = None


class Stats:
    """Counters of everything the pipeline sees, plus the agent's health, for the exporters."""

    def __init__(self, engine, *, per_vm: bool = True, max_vms: int = DEFAULT_MAX_VMS,
                 vm_retention: float = DEFAULT_VM_RETENTION, clock=time.monotonic):
        if max_vms < 1:
            raise ValueError("max_vms must be at least 1")
        self.engine = engine
        self.per_vm = per_vm
        self.max_vms = max_vms
        self.vm_retention = vm_retention
        self._clock = clock
        self._lock = threading.Lock()
        self._hashed = (None, "")  # (rules, their rules_hash), for the rules_hash property

        # Hot counters, written by the pipeline's thread only.
        self._index = {key: i for i, key in enumerate(EVENT_KEYS)}
        self._counts = [0] * len(EVENT_KEYS)  # events by EVENT_KEYS
        self.perm: dict = {}  # (option, feature or None, accepted: bool) -> calls
        self.violations: Counter = Counter()  # rule id, host-wide
        self._vms: dict[str, VmStats] = {}
        self._other = VmStats()  # VMs past max_vms
        self._host = VmStats()  # everything, when the vm label is off
        self._no_vm = VmStats()  # violations that name no VM
        self.vm_overflows = 0  # events counted under _other
        self._fpu_size: dict[tuple, int] = {}  # (tgid, vm, vcpu) -> guest FPU buffer bytes

        # Health, written by the live side from any thread.
        self._lost: Counter = Counter()
        self._probes: dict[tuple, tuple] = {}  # (probe, backend) -> (attached, kinds)
        self._names: dict[str, str] = {}

        self._lat_clock = None
        self._lat_every = LATENCY_SAMPLE_EVERY
        self._lat_counts = [0] * (len(_LATENCY_BOUNDS_NS) + 1)
        self._lat_sum = [0]  # nanoseconds
        self._lat_on = False

        self._build_observe()

    @property
    def rules_hash(self) -> str:
        """rules_hash() of the rules the engine judges with now (a reload may change its profile)."""
        rules = self.engine.rules
        if rules is not self._hashed[0]:
            self._hashed = (rules, rules_hash(rules))
        return self._hashed[1]

    def set_vm_labels(self, per_vm: bool, max_vms: int) -> None:
        """New vm label options (a configuration reload), from the pipeline's thread.

        Turning the label on or off starts the per-VM counters, or the host's, from zero. A lower
        max_vms holds for VMs labelled from now on: those that have a label keep it while they live.
        """
        if max_vms < 1:
            raise ValueError("max_vms must be at least 1")
        with self._lock:
            if per_vm != self.per_vm:
                self._vms.clear()
                self._other, self._host, self._no_vm = VmStats(), VmStats(), VmStats()
            self.per_vm, self.max_vms = per_vm, max_vms
        self._build_observe()

    # ---- the hot path ---------------------------------------------------------------------------
    #
    # `observe` is a closure over plain lists and dicts (no attribute lookups, no Counter, no
    # method call but the handler of the event's kind): ~0.3 us per event on the CI machines.

    def _build_observe(self) -> None:
        counts = self._counts
        index = self._index
        vms = self._vms
        sizes = self._fpu_size
        new_vm = self._new_vm
        per_vm = self.per_vm
        host = self._host
        perm = self.perm
        count_violations = self._count_violations
        cap = 2 * self.engine.state.max_vcpus
        prune = self._prune_sizes

        def vm_of(vm):
            if not per_vm:
                return host
            vs = vms.get(vm)
            return vs if vs is not None else new_vm(vm)

        def with_ret(kind):
            ok, refused = index[(kind, "", True)], index[(kind, "", False)]

            def count(ev):
                counts[ok if ev.ret == 0 else refused] += 1
            return count

        def plain(kind):
            i = index[(kind, "", True)]

            def count(ev):
                counts[i] += 1
            return count

        def by_source(kind):
            return {src: index[(kind, src, True)] for src in SOURCES[kind]}

        xcr0_i, xfd_i, xfd_err_i = by_source("xcr0"), by_source("xfd"), by_source("xfd_err")
        perm_ok, perm_refused = index[("perm", "", True)], index[("perm", "", False)]
        fpstate_ok, fpstate_refused = index[("fpstate", "", True)], index[("fpstate", "", False)]
        fpu_load_i = index[("fpu_load", "", True)]

        def perm_(ev):
            ok = ev.ret == 0
            counts[perm_ok if ok else perm_refused] += 1
            key = (ev.option, ev.feature, ok)
            try:
                perm[key] += 1
            except KeyError:
                perm[key] = 1

        # A refused operation's slot is the accepted one's plus one. vm_of() is inlined: these are hot.
        def xcr0(ev):
            src = ev.source
            counts[xcr0_i[src] + (ev.ret != 0)] += 1
            if src == "guest":
                vs = vms.get(ev.vm) if per_vm else host
                if vs is None:
                    vs = new_vm(ev.vm)
                vs.xsetbv += 1

        def xfd(ev):
            src = ev.source
            counts[xfd_i[src] + (ev.ret != 0)] += 1
            if src == "guest":
                vs = vms.get(ev.vm) if per_vm else host
                if vs is None:
                    vs = new_vm(ev.vm)
                vs.xfd_writes += 1

        def xfd_err(ev):
            src = ev.source
            counts[xfd_err_i[src] + (ev.ret != 0)] += 1
            if src == "nm":
                vs = vms.get(ev.vm) if per_vm else host
                if vs is None:
                    vs = new_vm(ev.vm)
                vs.nm_saves += 1

        def fpstate(ev):
            if ev.ret == 0:
                counts[fpstate_ok] += 1
                if ev.guest and ev.size is not None:
                    if len(sizes) >= cap:
                        prune()
                    sizes[(ev.tgid, ev.vm, ev.vcpu)] = ev.size
            else:
                counts[fpstate_refused] += 1

        def fpu_load(ev):
            counts[fpu_load_i] += 1
            size = ev.guest_size
            if size is not None:
                key = (ev.tgid, ev.vm, ev.vcpu)
                if sizes.get(key) != size:
                    if len(sizes) >= cap:
                        prune()
                    sizes[key] = size

        handlers = {Perm: perm_, Xcr0: xcr0, Xfd: xfd, XfdErr: xfd_err, Fpstate: fpstate, FpuLoad: fpu_load}
        # The other kinds (VcpuCreate, Cpuid, Xsave; VcpuDestroy, Passthrough, Exec, Exit), and any kind
        # added to the model later, are counted by result alone.
        for t in EVENT_TYPES:
            if t not in handlers:
                handlers[t] = with_ret(t.kind) if "ret" in t.__struct_fields__ else plain(t.kind)
        self._vm_of = vm_of

        lat_clock = self._lat_clock
        if lat_clock is None:
            def observe(ev, violations):
                handlers[ev.__class__](ev)
                if violations:
                    count_violations(ev, violations)
        else:
            lat_counts = self._lat_counts
            lat_sum = self._lat_sum
            bounds = _LATENCY_BOUNDS_NS
            every = self._lat_every
            countdown = [every]

            def observe(ev, violations):
                handlers[ev.__class__](ev)
                if violations:
                    count_violations(ev, violations)
                countdown[0] -= 1
                if not countdown[0]:
                    # One event in `every`: reading the clock costs as much as counting an event.
                    countdown[0] = every
                    ns = lat_clock() - ev.ts
                    if ns > 0:
                        lat_counts[bisect_left(bounds, ns)] += 1
                        lat_sum[0] += ns
                    else:  # clocks of two CPUs; never a negative delay
                        lat_counts[0] += 1
        # Observer protocol: observe(ev, violations) counts one judged event.
        self.observe = observe

    def _new_vm(self, vm: str) -> VmStats:
        if len(self._vms) >= self.max_vms:
            self.vm_overflows += 1
            return self._other
        with self._lock:
            vs = self._vms.get(vm)
            if vs is None:
                vs = self._vms[vm] = VmStats()
        return vs

    def _count_violations(self, ev, violations) -> None:
        vm = getattr(ev, "vm", None)
        vs = self._host if not self.per_vm else self._no_vm if vm is None else self._vm_of(vm)
        for v in violations:
            rid = v.rule.id
            self.violations[rid] += 1
            vs.violations[rid] += 1

    def observe_latency(self, ns: int) -> None:
        """One event's delay from the kernel to its verdict, in nanoseconds (for the live side's own use)."""
        ns = max(ns, 0)
        with self._lock:
            self._lat_counts[bisect_left(_LATENCY_BOUNDS_NS, ns)] += 1
            self._lat_sum[0] += ns
            self._lat_on = True

    # ---- hooks for the live side ----------------------------------------------------------------

    def measure_latency(self, clock=time.monotonic_ns, every: int = LATENCY_SAMPLE_EVERY) -> None:
        """Measure the latency of one event in `every` against `clock` (the clock of the events' `ts`).

        Call it before feeding events (the live side does; a replayed log's `ts` is not a clock).
        """
        if every < 1:
            raise ValueError("every must be at least 1")
        self._lat_clock = clock
        self._lat_every = every
        self._lat_on = True
        self._build_observe()

    def lost(self, stage: str, n: int = 1) -> None:
        """`n` events lost at `stage` (`ringbuf`, `reader`, `events_log`...); n=0 declares the stage."""
        with self._lock:
            self._lost[stage] += n

    def set_lost(self, stage: str, total: int) -> None:
        """The running total of losses at `stage`, as a kernel map counts them; it never goes down."""
        with self._lock:
            if total > self._lost[stage]:
                self._lost[stage] = total

    def probe(self, probe: str, backend: str, attached: bool, kinds=()) -> None:
        """Whether `probe` of `backend` is attached, and which event kinds it produces."""
        with self._lock:
            self._probes[(probe, backend)] = (bool(attached), tuple(kinds))

    def set_vm_name(self, vm: str, name: str | None) -> None:
        """A human name for the VM `vm` (e.g. QEMU's -name), used as its `vm` label."""
        with self._lock:
            if name:
                self._names[vm] = clean_vm_name(name)
            else:
                self._names.pop(vm, None)

    # ---- scrape time ----------------------------------------------------------------------------

    def _prune_sizes(self) -> None:
        live = self.engine.state.vcpus
        for key in [k for k in list(self._fpu_size) if k not in live]:
            self._fpu_size.pop(key, None)

    def _engine_vcpus(self) -> list:
        """(key, vCPU) pairs of the engine, copied (the pipeline's thread changes them)."""
        vcpus = self.engine.state.vcpus
        for _ in range(5):
            try:
                return list(vcpus.items())
            except RuntimeError:  # changed while copied
                continue
        return []

    @staticmethod
    def _copy(d: dict) -> dict:
        for _ in range(5):
            try:
                return dict(d)
            except RuntimeError:
                continue
        return {}

    def snapshot(self) -> Snapshot:
        engine = self.engine
        st = engine.state
        dyn = engine.profile.dyn
        now = self._clock()
        vcpus = self._engine_vcpus()
        sizes = self._copy(self._fpu_size)

        # Per-VM gauges from the engine's vCPUs, and which VMs it still tracks.
        gauges: dict[str, list] = {}
        amx_vm_ids = set()
        for key, c in vcpus:
            g = gauges.get(key[1])
            if g is None:
                g = gauges[key[1]] = [0, 0, 0]
            gf = c.guest_features
            if gf is not None and gf & dyn:
                g[0] += 1
                amx_vm_ids.add(key[1])
            g[1] += sizes.get(key, 0)
            if c.passthrough is True:
                g[2] += 1
        if len(sizes) > len(vcpus):
            self._prune_sizes()

        with self._lock:
            names = dict(self._names)
            if self.per_vm:
                self._age_vms(gauges, now)
            vms = dict(self._vms)
            lost = dict(self._lost)
            probes = dict(self._probes)
            for vm in list(names):
                if vm not in vms and vm not in gauges:
                    del self._names[vm]

        rows: dict = {}
        violations: dict = {}
        rules = {r.id: r.severity for r in engine.rules}

        def row(label) -> VmRow:
            r = rows.get(label)
            if r is None:
                r = rows[label] = VmRow()
            return r

        def add_counters(label, vs: VmStats) -> None:
            r = row(label)
            r.xsetbv += vs.xsetbv
            r.xfd_writes += vs.xfd_writes
            r.nm_saves += vs.nm_saves
            for rid, n in self._copy(vs.violations).items():
                k = (rid, rules.get(rid, ""), label)
                violations[k] = violations.get(k, 0) + n

        if self.per_vm:
            for vm, vs in vms.items():
                add_counters(names.get(vm, vm), vs)
            if self._other.xsetbv or self._other.xfd_writes or self._other.nm_saves or self._other.violations:
                add_counters(OTHER_VM, self._other)
            for rid, n in self._copy(self._no_vm.violations).items():
                violations[(rid, rules.get(rid, ""), NO_VM)] = n
            for vm, g in gauges.items():
                r = row(names.get(vm, vm) if vm in vms else OTHER_VM)
                r.amx_vcpus += g[0]
                r.fpu_bytes += g[1]
                r.passthrough_vcpus += g[2]
        else:
            add_counters(None, self._host)
            r = row(None)
            for g in gauges.values():
                r.amx_vcpus += g[0]
                r.fpu_bytes += g[1]
                r.passthrough_vcpus += g[2]
            # Every rule of the profile from zero, so that increase() sees the first violation.
            for rid, sev in rules.items():
                violations.setdefault((rid, sev, None), 0)

        events = {(k, src, ACCEPTED if ok else REFUSED): n
                  for (k, src, ok), n in zip(EVENT_KEYS, list(self._counts)) if n}
        perm = {(o, "" if f is None else str(f), ACCEPTED if ok else REFUSED): n
                for (o, f, ok), n in self._copy(self.perm).items()}

        sources: dict[str, int] = {}
        for (attached, kinds) in probes.values():
            for kind in kinds:
                sources[kind] = sources.get(kind, 0) + attached

        latency = None
        if self._lat_on:
            counts = list(self._lat_counts)
            cumulative, total = [], 0
            for n in counts:
                total += n
                cumulative.append(total)
            latency = (cumulative, self._lat_sum[0] / 1e9)

        return Snapshot(
            per_vm=self.per_vm, profile=engine.profile.name, dyn=dyn, rules_hash=self.rules_hash,
            version=__version__, python=".".join(map(str, sys.version_info[:3])),
            events=events, perm=perm, violations=violations, vms=rows, amx_vms=len(amx_vm_ids),
            lost=lost, probes={k: int(a) for k, (a, _) in probes.items()}, sources=sources,
            tracked_processes=len(st.procs), tracked_vcpus=len(st.vcpus),
            max_processes=st.max_processes, max_vcpus=st.max_vcpus,
            evicted_processes=st.evicted_processes, evicted_vcpus=st.evicted_vcpus,
            vm_labels=len(vms), max_vms=self.max_vms, vm_overflows=self.vm_overflows, latency=latency,
        )

    def _age_vms(self, live: dict, now: float) -> None:
        """Under the lock: VMs the engine tracks get a series; VMs gone for vm_retention lose theirs."""
        for vm, vs in list(self._vms.items()):
            if vm in live:
                vs.gone_since = None
            elif vs.gone_since is None:
                vs.gone_since = now
            elif now - vs.gone_since >= self.vm_retention:
                del self._vms[vm]
        for vm in live:
            if vm not in self._vms and len(self._vms) < self.max_vms:
                self._vms[vm] = VmStats()
