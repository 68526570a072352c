"""python -m agent.probes [--no-attach] [--backend tracepoint|kprobe] [--only SOURCE,...]:
the BTF offsets this kernel gives, then (as root) compile and attach a
backend and report per event source (probe group) and the time each step
took. Groundwork for `xstate-agent doctor`. Exit 0 when every source asked
for attached."""

import sys
import time

from agent.probes.btf import BtfError, KernelBtf


def _arg(argv: list[str], name: str, default: str | None = None) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def main(argv: list[str]) -> int:
    backend_name = _arg(argv, "--backend", "tracepoint")
    if backend_name not in ("tracepoint", "kprobe"):
        print(f"unknown backend {backend_name!r} (tracepoint or kprobe)")
        return 2
    only = _arg(argv, "--only")
    t0 = time.perf_counter()
    try:
        if backend_name == "kprobe":
            from agent.probes.kprobe_plan import resolve
        else:
            from agent.probes.offsets import resolve
        offsets = resolve(KernelBtf())
    except BtfError as e:
        print(f"BTF: {e}")
        return 1
    print(f"BTF: resolved {len(offsets.values)} offsets in {time.perf_counter() - t0:.3f} s")
    for name, value in sorted(offsets.values.items()):
        print(f"  {name:36} {value:6d}  ({value:#x})")
    for name, why in sorted(offsets.errors.items()):
        print(f"  {name:36} missing: {why}")
    if "--no-attach" in argv:
        return 0

    from agent.events.model import KINDS
    if backend_name == "kprobe":
        from agent.probes.kprobe_backend import REPORTS, REQUIRES, SOURCES, BackendError, KprobeBackend
        groups = tuple(only.split(",")) if only else tuple(SOURCES)
        backend = KprobeBackend(lambda event, raw: None, groups=groups, offsets=offsets)
        hookless = {g for g, src in SOURCES.items() if not src.slots}
    else:
        from agent.probes.offsets import REQUIRES
        from agent.probes.tracepoint_backend import PROBES, REPORTS, BackendError, TracepointBackend
        groups = tuple(only.split(",")) if only else tuple(PROBES)
        backend = TracepointBackend(lambda event, raw: None, groups=groups, offsets=offsets)
        hookless = {g for g, tps in PROBES.items() if not tps}
    try:
        backend.start()
    except BackendError as e:
        print(f"backend: {e}")
        _statuses(backend, REPORTS, REQUIRES, hookless)
        return 1
    finally:
        backend.close()
    t = backend.timings
    extra = f"kallsyms {t.kallsyms_s:.3f} s, " if backend_name == "kprobe" else ""
    print(f"backend {backend_name}: BTF {t.btf_s:.3f} s, {extra}compile {t.compile_s:.3f} s, "
          f"load+attach {t.attach_s:.3f} s; sched_process_exit "
          f"{'has group_dead' if backend.exit_has_group_dead else 'lacks group_dead: signal->live'}")
    _statuses(backend, REPORTS, REQUIRES, hookless)
    blind = [k for k in KINDS if k not in backend.kinds_covered()]
    print(f"event kinds without an attached source: {', '.join(blind) or 'none'}")
    return 0 if all(s.attached for s in backend.status.values()) else 1


def _statuses(backend, reports, requires, hookless) -> None:
    for group, status in backend.status.items():
        state = "attached" if status.attached else "NOT attached: " + str(status.reason)
        print(f"  {group:12} {state}")
        hooks = status.tracepoints
        if hooks:
            where = f"via {', '.join(hooks)}"
        elif group in hookless:
            where = f"(extra code in {', '.join(requires.get(group, ())) or 'other sources'}'s programs)"
        else:
            where = ""
        print(f"  {'':12}   reports {reports[group]} {where}".rstrip())
        for note in getattr(status, "notes", ()):
            print(f"  {'':12}   note: {note}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
