"""python -m agent.probes [--no-attach]: the BTF offsets this kernel gives, then
(as root) compile and attach the tracepoint backend and report per probe group
and the time each step took. Groundwork for `xstate-agent doctor`."""

import sys
import time

from agent.probes.btf import BtfError, KernelBtf
from agent.probes.offsets import resolve


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    try:
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
    from agent.probes.offsets import REQUIRES
    from agent.probes.tracepoint_backend import REPORTS, BackendError, TracepointBackend
    backend = TracepointBackend(lambda event, raw: None, offsets=offsets)
    try:
        backend.start()
    except BackendError as e:
        print(f"backend: {e}")
        return 1
    finally:
        backend.close()
    t = backend.timings
    print(f"backend: compile {t.compile_s:.3f} s, load+attach {t.attach_s:.3f} s; "
          f"sched_process_exit {'has group_dead' if backend.exit_has_group_dead else 'lacks group_dead: signal->live'}")
    for group, status in backend.status.items():
        state = "attached" if status.attached else "NOT attached: " + str(status.reason)
        print(f"  {group:11} {state}")
        where = f"via {', '.join(status.tracepoints)}" if status.tracepoints else \
            f"(extra code in {', '.join(REQUIRES.get(group, ()))}'s programs)"
        print(f"  {'':11}   reports {REPORTS[group]} {where}")
    blind = [k for k in KINDS if k not in backend.kinds_covered()]
    print(f"event kinds without an attached source: {', '.join(blind) or 'none'}")
    return 0 if all(s.attached for s in backend.status.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
