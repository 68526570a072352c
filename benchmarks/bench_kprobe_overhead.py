"""Per-event cost of each probe of the kprobe backend, as a ratio to an empty
program on the same hook.

    tests/vm/run-kernel 6.12 -- .venv/bin/python benchmarks/bench_kprobe_overhead.py [--scale F] [--rounds R] [--detail]
    sudo .venv/bin/python benchmarks/bench_kprobe_overhead.py --kernels 6.1,6.12 [--scale F] [--rounds R] [--detail]

The first form runs inside the kernel harness (or on any host with kprobes,
root, BCC and /dev/kvm); the second, on the host, boots each kernel in turn
through tests/vm/run-kernel, runs the first form there and prints each
kernel's tables, then the ratios side by side.

With BPF_ENABLE_STATS on, two passes of the same workload:

  agent  the real KprobeBackend, every source asked for (what it chooses on
         this kernel: backend.attached), its ring drained between actions
  empty  benchmarks/floor/empty.bpf.c's `empty` (returns at once) attached as
         kprobe, kretprobe or tracepoint to exactly the hooks the agent chose

Each hook gets its own instance of its program (BCC loads one per function
name, and the backend puts kp_ioctl_ret on three functions), so the kernel's
run_cnt and run_time_ns are per hook. The workload, one action after another,
each many times: arch_prctl XCOMP GET and REQ; on a vCPU that never runs,
KVM_SET_CPUID2 (plain, and exposing AMX so that KVM tries to grow the guest
FPU buffer), KVM_SET_XCRS, KVM_SET_MSRS (XFD, XFD_ERR, an unrelated MSR),
KVM_GET/SET_XSAVE; KVM_RUN of a guest that halts; a VM with two vCPUs made
and closed; a process exec'd and exiting; in --rounds, each hook's ns per run
being the median over rounds. Printed: per hook its runs, each pass's ns per
run and their ratio, and the geometric mean of the ratios; per action the
programs' total time per action in each pass and their ratio (--detail: hook
by hook).

run_time_ns is the program's own time: the kprobe machinery (breakpoint or
ftrace, the kretprobe trampoline) costs the same in both passes and is not in
it. Under QEMU's software emulation absolute times mean little; the ratios
are what to compare. Nothing is asserted.
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
import livebench as lb  # noqa: E402

RESULT_TAG = "BENCH-KPROBE-RESULT "  # the guest's JSON line, which the host mode reads
# Actions per pass at --scale 1: some 30 s of workload per pass under TCG.
COUNTS = {"arch_prctl GET_XCOMP_GUEST_PERM": 8000, "arch_prctl REQ_XCOMP_GUEST_PERM(18)": 8000,
          "KVM_SET_CPUID2": 2000, "KVM_SET_CPUID2 with AMX (refused)": 2000, "KVM_SET_XCRS (XCR0)": 8000,
          "KVM_SET_MSRS XFD": 5000, "KVM_SET_MSRS XFD_ERR": 5000, "KVM_SET_MSRS SYSENTER_CS": 5000,
          "KVM_GET_XSAVE": 5000, "KVM_SET_XSAVE": 5000, "KVM_RUN (guest hlt)": 8000,
          "VM + 2 vCPUs made and closed": 150, "exec + exit (/bin/true)": 60}


# -- the workload ------------------------------------------------------------------


class Workload:
    """The actions, on a VM kept open across both passes: its vCPUs keep
    their state, and KVM's scheduler static key stays on (flipping it while
    probes fire once crashed 6.12 under TCG: tests/vm/guest/conftest.py, keeper)."""

    HLT_LOOP = b"\xf4\xeb\xfd"  # hlt; jmp back to it: every KVM_RUN exits at the next hlt

    def __init__(self, scale: float, rounds: int):
        from agent import kvmctl
        from agent.kvmctl import Vm
        from agent.xstate import XTILE
        self.k, self.Vm, self.scale, self.rounds = kvmctl, Vm, scale, rounds
        self.vm = Vm()
        self.cpu = self._vcpu(0)  # set-ioctls only: KVM refuses another CPUID after a KVM_RUN
        self.runner = self._vcpu(1)
        self.entries = self.vm.supported_cpuid()
        self.amx = self.vm.supported_cpuid()
        for e in self.amx:
            if e.function == 0xD and e.index == 0:
                e.eax |= XTILE
        for v in (self.cpu, self.runner):
            self._check(self.vm.set_cpuid(v, self.entries) == 0, "KVM_SET_CPUID2")
        reason, _ = self.vm.guest(self.runner, self.HLT_LOOP)
        self._check(reason == kvmctl.KVM_EXIT_HLT, f"first KVM_RUN exit {reason}")
        ret, self.image = Vm.get_xsave(self.cpu)
        self._check(ret == 0, "KVM_GET_XSAVE")
        self.xcr0 = kvmctl.leaf_d0(self.entries) & 0x7  # x87, SSE, AVX where offered: valid everywhere

    def _vcpu(self, vcpu_id: int) -> int:
        fd = self.vm.create_vcpu(vcpu_id)
        self._check(fd >= 0, f"KVM_CREATE_VCPU {fd}")
        return fd

    @staticmethod
    def _check(ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(f"workload set-up failed: {what}")

    def _run(self) -> None:
        reason = self.vm.run(self.runner)
        if reason != self.k.KVM_EXIT_HLT:  # anything else and the loop measures something else
            raise RuntimeError(f"KVM_RUN exit {reason}, not hlt")

    def _churn(self) -> None:
        vm = self.Vm()
        vm.create_vcpu(0)
        vm.create_vcpu(1)
        vm.close()

    def actions(self) -> list[tuple[str, int, object]]:
        """(name, count in one round, step) in order; the steps' results are
        left alone but KVM_RUN's (refused calls are part of the workload)."""
        k, Vm, v = self.k, self.Vm, self.cpu
        steps = {
            "arch_prctl GET_XCOMP_GUEST_PERM": lambda: k.arch_prctl_get(k.ARCH_GET_XCOMP_GUEST_PERM),
            "arch_prctl REQ_XCOMP_GUEST_PERM(18)": lambda: k.arch_prctl(k.ARCH_REQ_XCOMP_GUEST_PERM, ctypes.c_long(18)),
            "KVM_SET_CPUID2": lambda: self.vm.set_cpuid(v, self.entries),
            "KVM_SET_CPUID2 with AMX (refused)": lambda: self.vm.set_cpuid(v, self.amx),
            "KVM_SET_XCRS (XCR0)": lambda: Vm.set_xcrs(v, [(0, self.xcr0)]),
            "KVM_SET_MSRS XFD": lambda: Vm.set_msrs(v, [(k.MSR_IA32_XFD, 0)]),
            "KVM_SET_MSRS XFD_ERR": lambda: Vm.set_msrs(v, [(k.MSR_IA32_XFD_ERR, 0)]),
            "KVM_SET_MSRS SYSENTER_CS": lambda: Vm.set_msrs(v, [(0x174, 0x10)]),
            "KVM_GET_XSAVE": lambda: Vm.get_xsave(v),
            "KVM_SET_XSAVE": lambda: Vm.set_xsave(v, self.image),
            "KVM_RUN (guest hlt)": self._run,
            "VM + 2 vCPUs made and closed": self._churn,
            "exec + exit (/bin/true)": lambda: subprocess.run(["/bin/true"]),
        }
        return [(name, max(1, round(n * self.scale / self.rounds)), steps[name]) for name, n in COUNTS.items()]

    def close(self) -> None:
        self.vm.close()


# -- one program instance per hook ---------------------------------------------------


def disown(bpf, fns) -> None:
    """BCC holds (and closes at cleanup) one instance per function name: take
    ours out of its hands, so that the caller closes every one."""
    for fn in fns:
        if bpf.funcs.get(fn.name) is fn:
            del bpf.funcs[fn.name]


def hook_label(kind: str, symbol: str) -> str:
    return f"{kind}:{symbol}"


def measure(progs: dict, workload: Workload, drain) -> dict:
    """Runs the workload in rounds, each action's share in each round:
    {action: {"count": total, "seconds": total, "rounds": [{label: [runs, ns]}, ...]}}.
    Kept per round because a few runs that QEMU's thread spent descheduled
    by the host weigh ms each in a sum: the medians over rounds leave them out."""
    out = {}
    for i in range(workload.rounds):
        t_round = time.perf_counter()
        for name, count, step in workload.actions():
            before = lb.prog_stats(progs, {})
            t0 = time.perf_counter()
            for _ in range(count):
                step()
            seconds = time.perf_counter() - t0
            after = lb.prog_stats(progs, {})
            drain()
            hooks = {h: [after[h][1] - before[h][1], after[h][0] - before[h][0]] for h in progs}
            a = out.setdefault(name, {"count": 0, "seconds": 0.0, "rounds": []})
            a["count"] += count
            a["seconds"] += seconds
            a["rounds"].append({h: rn for h, rn in hooks.items() if rn[0]})
        print(f"  round {i + 1}/{workload.rounds}: {time.perf_counter() - t_round:.1f} s", flush=True)
    return out


def agent_pass(workload: Workload) -> dict:
    from agent.probes.kprobe_backend import KprobeBackend

    @dataclass
    class PerHook(KprobeBackend):
        """The real backend, each hook attached with its own program instance."""
        progs: dict = field(default_factory=dict)  # label -> BCC Function

        def _attach_hook(self, BPF, hook) -> None:
            kind, symbol, fn = hook
            self.bpf.funcs.pop(fn.encode(), None)  # BCC would reuse the instance of an earlier hook
            super()._attach_hook(BPF, hook)
            self.progs[hook_label(kind, symbol)] = self.bpf.funcs[fn.encode()]

        def close(self) -> None:
            if self.bpf is not None:
                disown(self.bpf, self.progs.values())
            super().close()
            for fn in self.progs.values():
                os.close(fn.fd)
            self.progs = {}

    backend = PerHook(lambda event, raw: None)
    t0 = time.perf_counter()
    backend.start()
    print(f"agent: started in {time.perf_counter() - t0:.0f} s (compile {backend.timings.compile_s:.0f} s), "
          f"{len(backend.attached)} hooks", flush=True)
    hooks = [(kind, symbol) for kind, symbol, _ in backend.attached]
    programs = {hook_label(kind, symbol): fn for (kind, symbol, fn) in backend.attached}
    try:
        actions = measure(backend.progs, workload, lambda: backend.poll(0))
        backend.poll(0)
        return {"hooks": hooks, "programs": programs, "actions": actions, "events": dict(backend.counts),
                "lost": backend.lost(), "decode_errors": backend.decode_errors,
                "not_attached": {s: st.reason for s, st in backend.status.items() if not st.attached}}
    finally:
        backend.close()


def empty_pass(hooks: list, workload: Workload) -> dict:
    from bcc import BPF

    from agent.probes.kprobe_backend import KprobeBackend
    from agent.probes.tracepoint_backend import _headers_env
    _headers_env()  # the same kernel headers and clang flags as the agent
    t0 = time.perf_counter()
    b = BPF(src_file=str(lb.FLOOR_SOURCE).encode(), cflags=list(KprobeBackend.QUIET))
    progs = {}
    try:
        for kind, symbol in hooks:
            b.funcs.pop(b"empty", None)  # a new instance per hook (see PerHook)
            fn = b.load_func(b"empty", BPF.TRACEPOINT if kind == "tracepoint" else BPF.KPROBE)
            progs[hook_label(kind, symbol)] = fn
            if kind == "tracepoint":
                b.attach_tracepoint(tp=symbol.encode(), fn_name=fn.name)
            elif kind == "kretprobe":
                b.attach_kretprobe(event=symbol.encode(), fn_name=fn.name)
            else:
                b.attach_kprobe(event=symbol.encode(), fn_name=fn.name)
        print(f"empty: started in {time.perf_counter() - t0:.0f} s, {len(progs)} hooks", flush=True)
        return {"actions": measure(progs, workload, lambda: None)}
    finally:
        disown(b, progs.values())
        b.cleanup()
        for fn in progs.values():
            os.close(fn.fd)


# -- the figures -----------------------------------------------------------------------


def per_run(rounds: list, h: str) -> tuple[int, float | None]:
    """Runs of hook h in all rounds, and the median over rounds of its ns per run."""
    got = [r[h] for r in rounds if h in r]
    return sum(runs for runs, _ in got), statistics.median(ns / runs for runs, ns in got) if got else None


def summarize(agent: dict, empty: dict) -> dict:
    """Per action and hook, then per hook over the whole workload: runs, and
    each pass's ns per run (the median over rounds); per action, the programs'
    total ns per action."""
    per_action, totals = {}, {}
    for name, a in agent["actions"].items():
        e, n = empty["actions"][name], a["count"]
        hooks = {}
        for h in dict.fromkeys(h for r in a["rounds"] + e["rounds"] for h in r):
            (runs, ns), (runs_e, ns_e) = per_run(a["rounds"], h), per_run(e["rounds"], h)
            hooks[h] = [runs / n, ns, runs_e / n, ns_e]
            t = totals.setdefault(h, [0, 0.0, 0, 0.0])
            t[0] += runs
            t[1] += runs * ns if runs else 0
            t[2] += runs_e
            t[3] += runs_e * ns_e if runs_e else 0
        per_action[name] = {"count": n, "seconds": [a["seconds"], e["seconds"]], "hooks": hooks,
                            "runs": sum(x[0] for x in hooks.values()),
                            "agent": sum(x[0] * x[1] for x in hooks.values() if x[0]),
                            "empty": sum(x[2] * x[3] for x in hooks.values() if x[2])}
    per_hook = {}
    for kind, symbol in agent["hooks"]:
        h = hook_label(kind, symbol)
        runs, ns, runs_e, ns_e = totals.get(h, [0, 0, 0, 0])
        per_hook[h] = {"program": agent["programs"][h], "agent": [runs, ns / runs if runs else None],
                       "empty": [runs_e, ns_e / runs_e if runs_e else None]}
    ratios = [r["agent"][1] / r["empty"][1] for r in per_hook.values() if r["agent"][1] and r["empty"][1]]
    return {"hooks": per_hook, "actions": per_action,
            "geomean": statistics.geometric_mean(ratios) if ratios else None}


def ratio(a, b) -> str:
    return f"{a / b:.1f}x" if a and b else "-"


def num(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def print_tables(r: dict, detail: bool = False) -> None:
    s = r["summary"]
    w = hw = max(len("hook"), *(len(h) for h in s["hooks"]))
    print(f"\n== {r['kernel']}: per hook, over the whole workload (ns per run of the program itself)")
    print(f"{'hook':<{w}}  {'program':<22} {'runs':>7} {'agent ns/run':>13} {'empty ns/run':>13} {'ratio':>7}")
    for h, row in s["hooks"].items():
        (runs, a), (runs_e, e) = row["agent"], row["empty"]
        flag = "" if runs == runs_e else f"  (empty pass: {runs_e} runs)"
        print(f"{h:<{w}}  {row['program']:<22} {runs:>7,} {num(a):>13} {num(e):>13} {ratio(a, e):>7}{flag}")
    g = s["geomean"]
    print(f"geometric mean of the ratios: {'-' if g is None else f'{g:.2f}x'}")
    w = max(len("action"), *(len(n) for n in s["actions"]))
    print(f"\n== {r['kernel']}: per action, all programs together")
    print(f"{'action':<{w}} {'count':>6} {'runs/action':>12} {'agent ns':>10} {'empty ns':>10} {'ratio':>7}"
          f" {'agent-empty':>12}")
    for name, a in s["actions"].items():
        print(f"{name:<{w}} {a['count']:>6} {a['runs']:>12.1f} {num(a['agent']):>10} {num(a['empty']):>10}"
              f" {ratio(a['agent'], a['empty']):>7} {num(a['agent'] - a['empty']):>12}")
    if detail:
        print(f"\n== {r['kernel']}: per action and hook (runs per action, ns per run)")
        for name, a in s["actions"].items():
            print(name)
            for h, (runs, a_ns, _, e_ns) in a["hooks"].items():
                print(f"    {h:<{hw}} {runs:>5.1f} x {num(a_ns):>9} ns, empty {num(e_ns):>7} ns,"
                      f" {ratio(a_ns, e_ns):>7}")
    print(f"records sent by the agent: {r['events']}; lost {r['lost']}, undecodable {r['decode_errors']}")
    for src, why in r["not_attached"].items():
        print(f"source {src} not attached: {why}")


def jit() -> str:
    try:
        with open("/proc/sys/net/core/bpf_jit_enable") as f:
            return {"0": "off", "1": "on", "2": "on (debug)"}.get(f.read().strip(), "?")
    except OSError:
        return "?"


def run_here(args) -> int:
    lb.require_root()
    m = lb.machine()
    kernel = os.environ.get("XSTATE_VM") or m["kernel"]
    print(f"== kprobe backend vs empty programs on {kernel}: {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}, "
          f"BCC {m['bcc']}, BPF JIT {jit()}, --scale {args.scale}, --rounds {args.rounds}", flush=True)
    stats_fd = lb.enable_bpf_stats()
    workload = Workload(args.scale, args.rounds)
    try:
        agent = agent_pass(workload)
        empty = empty_pass(agent["hooks"], workload)
    finally:
        workload.close()
        os.close(stats_fd)
    r = {"kernel": kernel, "summary": summarize(agent, empty), "events": agent["events"], "lost": agent["lost"],
         "decode_errors": agent["decode_errors"], "not_attached": agent["not_attached"]}
    print_tables(r, args.detail)
    if args.json:
        print(RESULT_TAG + json.dumps(r), flush=True)
    return 0


# -- host mode: each kernel through the harness ------------------------------------------


def run_kernels(kernels: list[str], guest_args: list[str], timeout: float) -> int:
    sys.path.insert(0, str(ROOT / "tests" / "vm"))
    from harness import RUN_KERNEL, missing
    why = missing()
    if why:
        sys.exit(f"the kernel harness cannot run here: {why}")
    results, rc = {}, 0
    for k in kernels:
        cmd = [str(RUN_KERNEL), "--verbose", "--merge-stderr", "--timeout", str(timeout), k, "--",
               sys.executable, str(Path(__file__).resolve()), *guest_args, "--json"]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        for line in p.stdout:  # the guest's output as it comes, but for the JSON line
            if line.startswith(RESULT_TAG):
                results[k] = json.loads(line[len(RESULT_TAG):])
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        if p.wait():
            print(f"{k}: run-kernel exited {p.returncode}", file=sys.stderr)
            rc = 1
    if len(results) > 1:
        print_side_by_side(results)
    return rc


def print_side_by_side(results: dict) -> None:
    names = [r["kernel"] for r in results.values()]
    rows = {}
    for r in results.values():
        for h, row in r["summary"]["hooks"].items():
            rows.setdefault(h, {})[r["kernel"]] = ratio(row["agent"][1], row["empty"][1])
    w = max(len("geometric mean"), *(len(h) for h in rows))
    print("\n== ratio agent/empty, ns per run, per hook")
    print(f"{'hook':<{w}}  " + "  ".join(f"{n:>22}" for n in names))
    for h, by in rows.items():
        print(f"{h:<{w}}  " + "  ".join(f"{by.get(n, 'not attached'):>22}" for n in names))
    print(f"{'geometric mean':<{w}}  " + "  ".join(
        f"{r['summary']['geomean']:>21.2f}x" if r["summary"]["geomean"] else f"{'-':>22}" for r in results.values()))
    actions = next(iter(results.values()))["summary"]["actions"]
    w = max(len("action"), *(len(a) for a in actions))
    print("\n== ratio agent/empty per action (agent ns - empty ns per action)")
    print(f"{'action':<{w}}  " + "  ".join(f"{n:>22}" for n in names))
    for name in actions:
        cells = []
        for r in results.values():
            a = r["summary"]["actions"][name]
            cells.append(f"{ratio(a['agent'], a['empty'])} ({num(a['agent'] - a['empty'])})")
        print(f"{name:<{w}}  " + "  ".join(f"{c:>22}" for c in cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=None, metavar="LIST",
                    help="on the host: boot these kernels (e.g. 6.1,6.12) in turn through tests/vm/run-kernel")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every action's count (default 1)")
    ap.add_argument("--rounds", type=int, default=5, help="the workload is run in this many rounds (default 5)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per kernel boot (--kernels; default 900)")
    ap.add_argument("--detail", action="store_true", help="also each action's programs, hook by hook")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line (for --kernels)")
    args = ap.parse_args(argv)
    if args.kernels:
        guest = ["--scale", str(args.scale), "--rounds", str(args.rounds)] + (["--detail"] if args.detail else [])
        return run_kernels([k for k in args.kernels.split(",") if k], guest, args.timeout)
    from agent.probes.kprobe_backend import kprobes_possible
    why = kprobes_possible()
    if why:
        sys.exit(f"{why}: run it inside the kernel harness, e.g. --kernels 6.1,6.12")
    return run_here(args)


if __name__ == "__main__":
    sys.exit(main())
