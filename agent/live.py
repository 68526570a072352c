"""The live agent: probe backends chosen per event source, the reader loop (the events log it writes:
agent/eventlog.py).

    probes = Probes("auto", runner.on_event)   # auto | kprobe | tracepoint
    probes.start()                             # NoProbes if no source got a probe
    runner = LiveRunner(pipeline, stats, probes, log)
    runner.run(stop)                           # poll every 2 ms until stop is set
    runner.close()                             # detach, drain, flush, free

Backends are chosen per event source (a probe group of agent/probes: its
tracepoints or functions and the events they produce). With `auto` each
source gets the first backend that attaches it, in AUTO_ORDER (kprobe, what
production hosts use, then tracepoint); a source is handed to one backend
only, so no event is reported twice. The kprobe backend is not in this
version: it is reported unavailable with the reason (a kernel without
CONFIG_KPROBES, as on the CI machines, or this build), and `auto` uses
tracepoints for every source.

The reader runs in the caller's thread: backend.poll(2 ms) hands the ring
buffer's records over as events, which are appended to the events log in one
write per batch, then judged (Pipeline). The probes submit records without a
wakeup (BPF_RB_NO_WAKEUP): the 2 ms poll is the reader's timer, so the kernel
event to verdict latency is about 1-3 ms.
"""

import gzip
import os
import threading
import time
from dataclasses import dataclass, field

from agent.eventlog import LiveEventLog
from agent.probes.tracepoint_backend import (KINDS, PROBES, TRACEFS_ENV, BackendError, TracepointBackend,
                                             tracefs_root)

DEFAULT_EVENTS_LOG = "/var/log/xstate-agent/events.jsonl"
BACKENDS = ("kprobe", "tracepoint")
AUTO_ORDER = ("kprobe", "tracepoint")
POLL_MS = 2
# How often the loss counters of the kernel and the reader are copied to the statistics.
HEALTH_EVERY_S = 0.5

def sources() -> tuple[str, ...]:
    """Every event source this version knows, in attach order."""
    return tuple(PROBES)


def kinds_of(source: str) -> tuple[str, ...]:
    """The event kinds a source produces (none for guest_perm, which adds a field to others)."""
    return KINDS.get(source, ())


# ---- what the kernel allows ---------------------------------------------------------------------

def kernel_config(option: str) -> tuple[str | None, str | None]:
    """(value, where) of a kernel config option: "y"/"m"/... , "n" when "is not set", or (None, None)
    when no config file of the running kernel is readable (/proc/config.gz, /boot/config-RELEASE)."""
    release = os.uname().release
    for path in ("/proc/config.gz", f"/boot/config-{release}", f"/lib/modules/{release}/config"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(option + "="):
                return line.split("=", 1)[1].strip().strip('"'), path
            if line == f"# {option} is not set":
                return "n", path
        return "n", path  # absent from a complete config: not set
    return None, None


def kallsyms_has(symbol: str) -> bool | None:
    """Whether /proc/kallsyms lists `symbol`; None if it cannot be read."""
    try:
        with open("/proc/kallsyms", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return f" {symbol}\n".encode() in data or f" {symbol}\t".encode() in data


@dataclass
class KprobeSupport:
    available: bool
    evidence: list[str]

    @property
    def summary(self) -> str:
        return "; ".join(self.evidence)


def kprobe_support(thorough: bool = False) -> KprobeSupport:
    """Can this kernel attach kprobes? The kernel config decides when it is readable; otherwise
    (or with `thorough`, for doctor) the traces kprobes leave: register_kprobe in /proc/kallsyms,
    the kprobe PMU that perf_event_open attaches through, tracefs kprobe_events, debugfs kprobes/."""
    evidence = []
    value, where = kernel_config("CONFIG_KPROBES")
    verdict = None
    if value is not None:
        verdict = value in ("y", "m")
        evidence.append(f"{where}: CONFIG_KPROBES={value}" if verdict else f"{where}: CONFIG_KPROBES is not set")
    if verdict is not None and not thorough:
        return KprobeSupport(verdict, evidence)
    signs = []
    sym = kallsyms_has("register_kprobe")
    if sym is not None:
        signs.append(sym)
        evidence.append(f"register_kprobe {'in' if sym else 'not in'} /proc/kallsyms")
    pmu = os.path.exists("/sys/bus/event_source/devices/kprobe")
    signs.append(pmu)
    evidence.append(f"kprobe PMU {'present' if pmu else 'absent'} (/sys/bus/event_source/devices/kprobe)")
    root = tracefs_root()
    if root is not None:
        ev = os.path.exists(os.path.join(root, "kprobe_events"))
        signs.append(ev)
        evidence.append(f"{root}/kprobe_events {'present' if ev else 'absent'}")
    if os.path.isdir("/sys/kernel/debug/tracing") or os.path.ismount("/sys/kernel/debug"):
        dbg = os.path.exists("/sys/kernel/debug/kprobes")
        signs.append(dbg)
        evidence.append(f"/sys/kernel/debug/kprobes {'present' if dbg else 'absent'}")
    if verdict is None:
        verdict = any(signs)
    return KprobeSupport(verdict, evidence)


def ensure_tracefs() -> tuple[str | None, str | None]:
    """(tracefs root, note): mounts tracefs at /sys/kernel/tracing when it is not mounted and we are
    root (the CI machines boot without it); the note says what was done or why it is missing."""
    root = tracefs_root()
    if root is not None:
        return root, None
    if TRACEFS_ENV in os.environ:  # pointed elsewhere on purpose (tests): nothing to mount
        return None, f"no tracefs at {os.environ[TRACEFS_ENV]} ({TRACEFS_ENV})"
    mounted = []
    try:
        with open("/proc/self/mounts") as f:
            mounted = [line.split()[1] for line in f if line.split()[2:3] == ["tracefs"]]
    except OSError:
        pass
    if mounted:
        return None, f"tracefs at {mounted[0]} cannot be read by uid {os.geteuid()} (run as root)"
    if os.geteuid() != 0:
        return None, "tracefs is not mounted and only root can mount it (mount -t tracefs nodev /sys/kernel/tracing)"
    import subprocess
    r = subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True, text=True)
    root = tracefs_root()
    if root is None:
        return None, f"tracefs is not mounted and mounting it failed: {r.stderr.strip() or r.returncode}"
    return root, f"mounted tracefs at {root}"


# ---- backends per source ------------------------------------------------------------------------

@dataclass
class ProbeState:
    """One source on one backend."""
    backend: str
    attached: bool = False
    reason: str | None = None
    hooks: tuple[str, ...] = ()  # tracepoints / functions
    # The whole backend cannot run on this host (e.g. kprobes on a kernel without them): with
    # `auto` that is a fallback, not a failed probe (doctor --strict).
    backend_unavailable: bool = False


@dataclass
class SourcePlan:
    source: str
    kinds: tuple[str, ...]
    backend: str | None = None  # the backend that serves it, if any
    tried: list[ProbeState] = field(default_factory=list)  # in the order tried

    @property
    def attached(self) -> bool:
        return self.backend is not None


class NoProbes(Exception):
    """No event source could get a probe."""


class Probes:
    """The live backends, one per source, behind the backend API (poll, lost, close)."""

    def __init__(self, choice: str, on_event, *, only: tuple[str, ...] | None = None, thorough: bool = False):
        if choice not in ("auto",) + BACKENDS:
            raise ValueError(f"unknown backend {choice!r}")
        self.choice = choice
        self.on_event = on_event
        self.thorough = thorough
        self.plans = {s: SourcePlan(s, kinds_of(s)) for s in sources() if only is None or s in only}
        self.backends: dict[str, object] = {}  # name -> started backend
        self.kprobes: KprobeSupport | None = None
        self.tracefs_note: str | None = None
        self.start_s = 0.0

    @property
    def order(self) -> tuple[str, ...]:
        return AUTO_ORDER if self.choice == "auto" else (self.choice,)

    def start(self) -> None:
        t0 = time.perf_counter()
        try:
            for name in self.order:
                todo = [s for s, p in self.plans.items() if not p.attached]
                if not todo:
                    break
                getattr(self, f"_start_{name}")(todo)
        finally:
            self.start_s = time.perf_counter() - t0
        if not any(p.attached for p in self.plans.values()):
            raise NoProbes("no event source has a working probe: " + self.why_not())

    def why_not(self) -> str:
        """Why sources have no probe, each reason once with the sources it concerns."""
        reasons: dict[tuple, list[str]] = {}
        for s, p in self.plans.items():
            if not p.attached:
                for t in p.tried:
                    reasons.setdefault((t.backend, t.reason), []).append(s)
        unattached = [s for s, p in self.plans.items() if not p.attached]

        def detail(backend):
            return f" [{self.kprobes.summary}]" if backend == "kprobe" and self.kprobes else ""
        return "; ".join(f"{b}: {why}{detail(b)} ({'every source' if srcs == list(self.plans) else ', '.join(srcs)})"
                         for (b, why), srcs in reasons.items()) or ", ".join(unattached)

    def failures(self) -> list[tuple[str, ProbeState]]:
        """(source, probe) of every probe that could not attach on a backend this host can run."""
        return [(s, t) for s, p in self.plans.items() for t in p.tried if not t.attached and not t.backend_unavailable]

    def _start_kprobe(self, todo: list[str]) -> None:
        self.kprobes = kprobe_support(self.thorough)
        if self.kprobes.available:
            why = "the kprobe backend is not in this version of xstate-agent (this kernel has kprobes)"
        else:
            why = "this kernel has no kprobes"
        for s in todo:
            self.plans[s].tried.append(ProbeState("kprobe", False, why, backend_unavailable=True))

    def _start_tracepoint(self, todo: list[str]) -> None:
        root, self.tracefs_note = ensure_tracefs()
        if root is None:
            for s in todo:
                self.plans[s].tried.append(ProbeState("tracepoint", False, self.tracefs_note,
                                                      tuple(tp for tp, _ in PROBES.get(s, ()))))
            return
        backend = TracepointBackend(self.on_event, groups=tuple(todo))
        try:
            backend.start()
        except Exception as e:  # noqa: BLE001 - BackendError, or what BTF/BCC raised: the reason of every source
            if not isinstance(e, BackendError):
                e = f"{type(e).__name__}: {e}"
            backend.close()
            for s in todo:
                st = backend.status.get(s)
                reason = st.reason if st is not None and st.reason else str(e)
                hooks = st.tracepoints if st is not None else tuple(tp for tp, _ in PROBES.get(s, ()))
                self.plans[s].tried.append(ProbeState("tracepoint", False, reason, hooks))
            return
        self.backends["tracepoint"] = backend
        for s in todo:
            st = backend.status.get(s)
            if st is None:
                self.plans[s].tried.append(ProbeState("tracepoint", False, "not built by the tracepoint backend"))
                continue
            self.plans[s].tried.append(ProbeState("tracepoint", st.attached, st.reason, st.tracepoints))
            if st.attached:
                self.plans[s].backend = "tracepoint"

    # -- the backend API, over every started backend --

    def poll(self, timeout_ms: int = POLL_MS) -> None:
        for b in self.backends.values():
            b.poll(timeout_ms)

    def lost(self) -> int:
        return sum(b.lost() for b in self.backends.values())

    @property
    def decode_errors(self) -> int:
        return sum(getattr(b, "decode_errors", 0) for b in self.backends.values())

    def vm_name(self, vm: str) -> str | None:
        for b in self.backends.values():
            vms = getattr(b, "vms", None)
            if vms is not None and (name := vms.name(vm)):
                return name
        return None

    def detach(self) -> None:
        """Stop new records (the ring buffer stays readable, for a last drain)."""
        for b in self.backends.values():
            b.detach()

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        self.backends = {}

    def report_to(self, stats) -> None:
        """Every probe tried, attached or not, with the kinds it produces (xstate_probe_attached)."""
        for p in self.plans.values():
            for t in p.tried:
                stats.probe(p.source, t.backend, t.attached, p.kinds)

    def summary(self) -> str:
        by_backend: dict[str, list[str]] = {}
        for p in self.plans.values():
            by_backend.setdefault(p.backend or "none", []).append(p.source)
        return "; ".join(f"{b}: {', '.join(s)}" for b, s in by_backend.items())

    def timings(self) -> dict:
        out = {"start_s": round(self.start_s, 3)}
        tp = self.backends.get("tracepoint")
        if tp is not None:
            t = tp.timings
            out.update(btf_s=round(t.btf_s, 3), compile_s=round(t.compile_s, 3), attach_s=round(t.attach_s, 3))
        return out


# ---- the reader loop ----------------------------------------------------------------------------

class LiveRunner:
    """Backend records → events log → policy → sinks, in the caller's thread."""

    def __init__(self, pipeline, stats=None, log: LiveEventLog | None = None):
        self.pipeline = pipeline
        self.stats = stats
        self.log = log
        self.probes: Probes | None = None
        self._batch: list = []
        self._batch_vms: set = set()  # vm ids in the batch
        self._batch_gone: list = []  # tgids that exec'd or exited in the batch
        self._names: dict[str, str | None] = {}  # vm id -> human name, as the backend gave it
        self._vms_of: dict[int, set[str]] = {}  # tgid -> its vm ids, forgotten at exec/exit
        self._next_health = 0.0
        self.reopen_log = threading.Event()  # set from a signal handler (SIGHUP)
        self.on_hup = None  # called on SIGHUP, in this thread, before the log is reopened (the config reload)

    def on_event(self, event, raw=None) -> None:
        """The backends' callback (from inside poll())."""
        self._batch.append(event)
        vm = getattr(event, "vm", None)
        if vm is not None:
            self._batch_vms.add(vm)
            if vm not in self._names and self.probes is not None:
                self._names[vm] = self.probes.vm_name(vm)
                self._vms_of.setdefault(event.tgid, set()).add(vm)
        elif event.kind in ("exec", "exit"):
            self._batch_gone.append(event.tgid)

    def step(self, timeout_ms: int = POLL_MS) -> int:
        """One poll of the backends, then the batch through the pipeline. Events handled."""
        self.probes.poll(timeout_ms)
        n = self._flush()
        if self.reopen_log.is_set():
            self.reopen_log.clear()
            if self.on_hup is not None:
                self.on_hup()
            if self.log is not None:
                self.log.reopen()
        if time.monotonic() >= self._next_health:
            self.health()
        return n

    def _flush(self) -> int:
        batch = self._batch
        if not batch:
            return 0
        self._batch = []
        lines = self.log.write(batch) if self.log is not None else None
        if lines is not None:
            self.pipeline.feed(batch, self.log.path, lines)
        else:
            self.pipeline.feed(batch)
        vms, self._batch_vms = self._batch_vms, set()
        if self.stats is not None:
            # After the verdicts: the statistics keep a name only for a VM the engine tracks.
            for vm in vms:
                name = self._names.get(vm)
                if name:
                    self.stats.set_vm_name(vm, name)
        if self._batch_gone:
            for tgid in self._batch_gone:
                for vm in self._vms_of.pop(tgid, ()):
                    self._names.pop(vm, None)
            self._batch_gone = []
        return len(batch)

    def health(self) -> None:
        self._next_health = time.monotonic() + HEALTH_EVERY_S
        if self.stats is not None and self.probes is not None:
            self.stats.set_lost("ringbuf", self.probes.lost())
            self.stats.set_lost("reader", self.probes.decode_errors)

    def run(self, stop) -> None:
        """Poll until `stop` (a threading.Event, set from a signal handler) is set."""
        while not stop.is_set():
            self.step(POLL_MS)

    def drain(self, limit_s: float = 5.0) -> int:
        """Detach, then hand over what the ring buffer still holds (for at most limit_s)."""
        self.probes.detach()
        total = 0
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            n = self.step(0)
            total += n
            if not n:
                break
        self.health()
        return total

    def close(self) -> None:
        try:
            if self.probes is not None and self.probes.backends:
                self.drain()
        finally:
            if self.log is not None:
                self.log.close()
            if self.probes is not None:
                self.probes.close()


def process_age() -> float | None:
    """Seconds since this process started (its start time in /proc/self/stat, in clock ticks since boot)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError):
        return None


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify units) about our state; nothing without $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    import socket
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError:
        pass
