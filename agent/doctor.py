"""xstate-agent doctor: what this host lets the live agent see.

It does what `run` does at start-up (choose a backend per event source,
compile, load and attach every probe this kernel allows), reports each probe
and the host facts that decide them (BTF, kernel headers for BCC, tracefs,
privileges, kprobes), then detaches. Like `run`, it mounts tracefs when it is
missing (as root).

Exit status: 0 when every event source has a working probe; 1 when one has
none (with --strict: when any probe failed to attach on a backend this host
can run; a backend the host cannot run at all, e.g. kprobes on a kernel
without them, is a fallback under `auto`, not a failure).
"""

import fcntl
import os
import time
from dataclasses import asdict, dataclass

from agent import __version__
from agent.events.model import EVENT_TYPES
from agent.live import Probes, kprobe_support
from agent.probes.btf import SYSFS_BTF
from agent.probes.tracepoint_backend import DEFAULT_HEADERS, bcc_available, tracefs_root

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
KVM_GET_API_VERSION = 0xAE00


@dataclass
class Check:
    name: str
    ok: bool | None  # None: informational (neither needed nor harmful)
    detail: str


def _capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def check_privileges() -> Check:
    caps = _capabilities()
    have = [n for n, bit in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
            if caps >> bit & 1]
    euid = os.geteuid()
    who = "root (uid 0)" if euid == 0 else f"uid {euid}"
    ok = euid == 0 or {"CAP_BPF", "CAP_PERFMON"} <= set(have) or "CAP_SYS_ADMIN" in have
    detail = f"{who}; effective: {', '.join(have) or 'none of CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN'}"
    if not ok:
        detail += " (loading BPF programs and attaching tracepoints needs root, or CAP_BPF with CAP_PERFMON)"
    return Check("privileges", ok, detail)


def check_btf(offsets) -> Check:
    path = os.path.join(SYSFS_BTF, "vmlinux")
    if not os.path.exists(path):
        return Check("BTF", False, f"{path} is missing (a kernel built without CONFIG_DEBUG_INFO_BTF): no probe "
                                   f"that reads kernel structs can be built")
    detail = f"{path} ({os.path.getsize(path) / 1e6:.1f} MB)"
    if offsets is None:
        from agent.probes.btf import BtfError
        from agent.probes.offsets import resolve
        try:
            offsets = resolve()
        except (BtfError, OSError) as e:
            return Check("BTF", False, f"{detail}: unreadable: {e}")
    detail += f": {len(offsets.values)} struct offsets resolved"
    if offsets.errors:
        detail += f", missing: {'; '.join(f'{k}: {v}' for k, v in sorted(offsets.errors.items()))}"
    return Check("BTF", not offsets.errors, detail)


def check_headers() -> Check:
    env = os.environ.get("BCC_KERNEL_SOURCE")
    release = os.uname().release
    if env:
        where, how = env, "BCC_KERNEL_SOURCE"
    elif os.path.isdir(DEFAULT_HEADERS):
        where, how = DEFAULT_HEADERS, "default; scripts/install-deps.sh merges Debian's linux-headers there"
    else:
        where, how = f"/lib/modules/{release}/build", "BCC's default"
    if not os.path.isdir(where):
        return Check("kernel headers", False, f"{where} ({how}) does not exist: BCC cannot compile the probes "
                                              f"(run scripts/install-deps.sh, or set BCC_KERNEL_SOURCE)")
    generated = os.path.exists(os.path.join(where, "include", "generated", "autoconf.h"))
    linux = os.path.isdir(os.path.join(where, "include", "linux"))
    version = None
    for rel in ("include/config/kernel.release", ".xstate-agent-source"):
        try:
            with open(os.path.join(where, rel)) as f:
                version = f.read().strip()
                break
        except OSError:
            continue
    ok = generated and linux
    detail = f"{where} ({how})" + (f", for {version}" if version else "")
    if not ok:
        detail += ": incomplete (needs include/linux and include/generated/autoconf.h: Debian's -common and " \
                  "-amd64 header trees merged)"
    elif version and not version.startswith(release):
        detail += f"; running {release}: fine, struct offsets come from BTF, not from these headers"
    return Check("kernel headers", ok, detail)


def check_tracefs(note: str | None) -> Check:
    root = tracefs_root()
    if root is None:
        return Check("tracefs", False, note or "not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
    return Check("tracefs", True, root + (f" ({note})" if note else ""))


def check_kprobes(needed: bool) -> Check:
    k = kprobe_support(thorough=True)
    return Check("kprobes", k.available or (False if needed else None),
                 ("supported: " if k.available else "not supported: ") + k.summary)


def check_bcc() -> Check:
    why = bcc_available()
    if why:
        return Check("BCC", False, why)
    import bcc
    return Check("BCC", True, f"{getattr(bcc, '__version__', '?')} ({os.path.dirname(bcc.__file__)})")


def check_kvm() -> Check:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return Check("/dev/kvm", None, f"cannot open: {e.strerror} (the probes attach all the same; selftest needs it)")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
    finally:
        os.close(fd)
    return Check("/dev/kvm", None, f"KVM API version {version}")


def check_lockdown() -> Check:
    try:
        with open("/sys/kernel/security/lockdown") as f:
            text = f.read().strip()
    except OSError:
        return Check("lockdown", None, "unknown (securityfs not mounted or no lockdown LSM)")
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text
    # confidentiality forbids bpf_probe_read_kernel: the probes that read KVM's structs fail.
    return Check("lockdown", mode != "confidentiality", mode)


def diagnose(backend: str = "auto") -> dict:
    """Everything doctor reports, as a JSON-able dict."""
    t0 = time.perf_counter()
    headers = check_headers()  # before the loader sets BCC_KERNEL_SOURCE to its default
    probes = Probes(backend, lambda event, raw=None: None, thorough=True)
    error = None
    try:
        probes.start()
    except Exception as e:  # noqa: BLE001 - NoProbes, or anything BCC raises: reported, never fatal
        error = str(e)
    tp = probes.backends.get("tracepoint")
    offsets = getattr(tp, "offsets", None)
    timings = probes.timings()
    probes.close()
    checks = [check_privileges(), check_bcc(), check_btf(offsets), headers, check_tracefs(probes.tracefs_note),
              check_kprobes(backend == "kprobe"), check_lockdown(), check_kvm()]
    observed = {k for p in probes.plans.values() if p.attached for k in p.kinds}
    wanted = {k for p in probes.plans.values() for k in p.kinds}
    sources = [{
        "source": p.source, "kinds": list(p.kinds), "backend": p.backend, "attached": p.attached,
        "applicable": p.applicable, "probes": [asdict(t) for t in p.tried],
    } for p in probes.plans.values()]
    failures = probes.failures()
    # A source no backend can serve on this host (kprobe-only on a kernel without kprobes) leaves its
    # kinds blind, but fails nothing.
    ok = any(p.attached for p in probes.plans.values()) and all(
        p.attached for p in probes.plans.values() if p.applicable)
    return {
        "version": __version__,
        "kernel": f"{os.uname().release} {os.uname().machine}",
        "backend": backend,
        "checks": [asdict(c) for c in checks],
        "sources": sources,
        "blind_kinds": sorted(wanted - observed),
        # Kinds of the event format that no probe of this version produces on any backend.
        "unobservable_kinds": sorted({t.kind for t in EVENT_TYPES} - wanted),
        "failed_probes": [f"{s} ({t.backend})" for s, t in failures],
        "error": error,
        "timings": dict(timings, total_s=round(time.perf_counter() - t0, 3)),
        "ok": ok,
        "strict_ok": ok and not failures,
    }


def render_text(d: dict) -> str:
    order = "kprobe, then tracepoint per source" if d["backend"] == "auto" else "only"
    out = [f"xstate-agent {d['version']} doctor: kernel {d['kernel']}, backend {d['backend']} ({order})", "", "host"]
    mark = {True: "ok  ", False: "FAIL", None: "info"}
    for c in d["checks"]:
        out.append(f"  {mark[c['ok']]}  {c['name']:<15} {c['detail']}")
    out += ["", "probes (event source, kinds it reports, backend, state)"]
    for s in d["sources"]:
        kinds = ", ".join(s["kinds"]) or "(fields of others)"
        for i, p in enumerate(s["probes"] or [{"backend": "-", "attached": False, "reason": "not tried",
                                               "hooks": [], "backend_unavailable": False}]):
            head = f"  {s['source']:<12} {kinds:<28}" if i == 0 else " " * 43
            if p["attached"]:
                state = "attached" + (f": {', '.join(p['hooks'])}" if p["hooks"] else " (code in other probes)")
            elif p["backend_unavailable"]:
                state = f"unavailable: {p['reason']}"
            else:
                state = f"NOT attached: {p['reason']}"
            out.append(f"{head} {p['backend']:<11} {state}")
    out.append("")
    if d["blind_kinds"]:
        out.append(f"blind to: {', '.join(d['blind_kinds'])} (no attached probe reports them)")
    if d["unobservable_kinds"]:
        out.append(f"not observed by this version on any backend: {', '.join(d['unobservable_kinds'])}")
    t = d["timings"]
    steps = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f} s" for k, v in t.items() if k not in ("start_s", "total_s"))
    n_ok = sum(s["attached"] for s in d["sources"])
    n_applicable = sum(s["applicable"] for s in d["sources"])
    n_na = len(d["sources"]) - n_applicable
    verdict = "ok" if d["ok"] else "FAIL"
    out.append(f"result: {verdict}: {n_ok}/{n_applicable} event sources have a working probe"
               + (f" ({n_na} not applicable on this host)" if n_na else "")
               + (f"; failed probes: {', '.join(d['failed_probes'])}" if d["failed_probes"] else "")
               + f" (start-up {t['start_s']:.2f} s" + (f": {steps}" if steps else "") + ")")
    return "\n".join(out)
