"""xstate-agent selftest: does the agent running on this host see what happens here, with the right values?

Design: the selftest talks to the running agent only through what the agent
already produces, so it needs no control channel and works against an agent
started by anyone (systemd, scripts/run):

  1. it tails the agent's events log (`run --events-log PATH`; scripts/run
     writes /var/log/xstate-agent/events.jsonl) from its current end;
  2. it makes real system calls in its own process: arch_prctl XSTATE GET and
     REQ calls; a KVM VM through /dev/kvm ioctls (a vCPU, KVM_SET_CPUID2 with
     what KVM supports, a valid and a refused XCR0 write, an XFD write, a
     real-mode guest that runs `hlt`); a child process that makes one
     arch_prctl call and exits;
  3. it computes every value the agent should report from the kernel's own
     answers to those calls (ioctl results, KVM_GET_XCRS, KVM_GET_MSRS,
     KVM_GET_SUPPORTED_CPUID, CPUID leaf 0xD sizes), then waits for the events
     of its own process in the log and compares them field by field;
  4. with --metrics URL, it also reads the agent's /metrics: the VM it made
     must have no violation, and each kind it checked an attached probe.

A check that fails says what was expected and what the agent reported (or
that nothing came within --timeout). Exit 0: every check passed; 1: one failed.
"""

import ctypes
import json
import os
import time
import urllib.request
from dataclasses import dataclass, field

from agent.events.reader import decode_line
from agent.xstate import XTILEDATA

VM = object()  # in an expectation: the vm id the agent gave the selftest's VM (from its vcpu_create)


@dataclass
class Result:
    name: str
    ok: bool
    detail: str


@dataclass
class Expect:
    name: str
    kind: str
    match: dict  # fields that pick the event (with VM: our VM)
    want: dict = field(default_factory=dict)  # fields then compared
    check: object = None  # extra: check(event) -> error text or None
    tgid: int | None = None  # default: this process
    show: tuple = ()  # more fields to print


class LogTail:
    """New complete lines of a growing file, from its end when opened; follows a rotation."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "rb")
        self._f.seek(0, os.SEEK_END)
        self._ino = os.fstat(self._f.fileno()).st_ino
        self._partial = b""
        self.invalid: list[str] = []

    def events(self) -> list:
        try:
            st = os.stat(self.path)
            if st.st_ino != self._ino or st.st_size < self._f.tell():
                self._f.close()
                self._f = open(self.path, "rb")  # rotated or cut: the new file from its start
                self._ino, self._partial = st.st_ino, b""
        except OSError:
            pass
        data = self._partial + self._f.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if not line.strip() or line.startswith(b"#"):
                continue
            try:
                out.append(decode_line(line))
            except ValueError as e:
                self.invalid.append(f"{e}: {line[:200]!r}")
        return out

    def close(self) -> None:
        self._f.close()


class Selftest:
    def __init__(self, events_log: str, metrics: str | None = None, timeout: float = 5.0, say=print):
        self.events_log = events_log
        self.metrics = metrics
        self.timeout = timeout
        self.say = say
        self.results: list[Result] = []
        self.expects: list[Expect] = []
        self.seen: list = []  # events of this process and its child, in log order
        self.tgids = {os.getpid()}
        self.vm_id: str | None = None

    def result(self, name: str, ok: bool, detail: str) -> None:
        r = Result(name, ok, detail)
        self.results.append(r)
        self.say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    # -- the agent's side --

    def _collect(self, tail: LogTail) -> None:
        for ev in tail.events():
            if ev.tgid in self.tgids:
                self.seen.append(ev)

    def _wait(self, tail: LogTail, until, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._collect(tail)
            if until():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    # -- running --

    def run(self) -> bool:
        try:
            tail = LogTail(self.events_log)
        except OSError as e:
            self.result("events log", False, f"{self.events_log}: {e.strerror}: is the agent running with "
                                             f"--events-log {self.events_log}? (scripts/run writes it)")
            return False
        try:
            return self._run(tail)
        finally:
            tail.close()

    def _run(self, tail: LogTail) -> bool:
        from agent import kvmctl as k

        # 1. Is the agent there at all? One GET call, and its event in the log.
        ret, supp = k.arch_prctl_get(k.ARCH_GET_XCOMP_SUPP)
        ping = Expect("agent sees this process: arch_prctl(ARCH_GET_XCOMP_SUPP)", "perm",
                      {"option": "GET_XCOMP_SUPP"}, {"ret": ret, "mask": supp if ret == 0 else None})
        if not self._wait(tail, lambda: self._find(ping, 0) is not None, self.timeout):
            self.result(ping.name, False, f"no event of this process (pid {os.getpid()}) in {self.events_log} within "
                                          f"{self.timeout:g} s: is the agent running, writing this log, with its "
                                          f"arch_prctl probe attached (xstate-agent doctor)?")
            return False
        self.expects.append(ping)

        # 2. arch_prctl XSTATE permission calls.
        for option, name in ((k.ARCH_GET_XCOMP_PERM, "GET_XCOMP_PERM"),
                             (k.ARCH_GET_XCOMP_GUEST_PERM, "GET_XCOMP_GUEST_PERM")):
            ret, mask = k.arch_prctl_get(option)
            self.expects.append(Expect(f"arch_prctl(ARCH_{name})", "perm", {"option": name},
                                       {"ret": ret, "mask": mask if ret == 0 else None}))
        for option, name in ((k.ARCH_REQ_XCOMP_PERM, "REQ_XCOMP_PERM"),
                             (k.ARCH_REQ_XCOMP_GUEST_PERM, "REQ_XCOMP_GUEST_PERM")):
            ret = k.arch_prctl(option, ctypes.c_long(18))
            self.expects.append(Expect(f"arch_prctl(ARCH_{name}, XTILEDATA)", "perm", {"option": name},
                                       {"feature": 18, "ret": ret}))

        # 3. A child process: its call and its exit.
        child = self._child(k)
        if child is not None:
            self.tgids.add(child)
            self.expects.append(Expect("child process: arch_prctl(ARCH_GET_XCOMP_SUPP)", "perm",
                                       {"option": "GET_XCOMP_SUPP"}, {"ret": 0, "mask": supp}, tgid=child))
            self.expects.append(Expect("child process: exit", "exit", {}, tgid=child))

        # 4. A VM through KVM ioctls.
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.result("KVM", False, "/dev/kvm is not there or not read-write: the KVM checks cannot run")
        else:
            self._kvm(k)

        # 5. Wait for everything, then compare.
        self._wait(tail, lambda: all(self._find(e, 0) is not None for e in self.expects), self.timeout)
        self._judge()
        if tail.invalid:
            self.result("events log is valid", False, f"{len(tail.invalid)} lines the spec reader refuses, "
                                                      f"first: {tail.invalid[0]}")
        if self.metrics:
            self._metrics()
        return all(r.ok for r in self.results)

    def _child(self, k) -> int | None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one call, then gone
            try:
                os.close(r)
                k.arch_prctl_get(k.ARCH_GET_XCOMP_SUPP)
            finally:
                os._exit(0)
        os.close(w)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            self.result("child process", False, f"exited with {status}")
            return None
        return pid

    def _kvm(self, k) -> None:
        vm = k.Vm()
        try:
            fd = vm.create_vcpu(0)
            if fd < 0:
                self.result("KVM_CREATE_VCPU", False, f"failed: {os.strerror(-fd)}")
                return
            self.expects.append(Expect("KVM_CREATE_VCPU", "vcpu_create", {"vcpu": 0}, {"ret": 0}))

            entries = vm.supported_cpuid()
            supported = k.leaf_d0(entries) if k.leaf(entries, 0xD, 0) else 0
            ret = vm.set_cpuid(fd, entries)
            self.expects.append(Expect("KVM_SET_CPUID2", "cpuid", {"vm": VM, "vcpu": 0},
                                       {"xcr0_supported": supported, "ret": ret}))

            # XCR0: x87 and whatever of SSE/AVX KVM supports (valid); plus XTILEDATA without XTILECFG
            # (refused on every CPU: the two AMX bits go together).
            valid = 0x1 | supported & 0x2
            valid |= supported & 0x4 if valid & 0x2 else 0
            ret = vm.set_xcrs(fd, [(0, valid)])
            readback = vm.get_xcr0(fd)
            if ret != 0 or readback != valid:
                self.result("KVM_SET_XCRS (valid)", False, f"the kernel refused XCR0 {valid:#x}: ret {ret}, "
                                                           f"XCR0 now {readback:#x}")
            self.expects.append(Expect(f"KVM_SET_XCRS XCR0={valid:#x} (valid)", "xcr0",
                                       {"vm": VM, "vcpu": 0, "source": "host", "value": valid}, {"ret": ret}))
            bad = valid | XTILEDATA
            ret = vm.set_xcrs(fd, [(0, bad)])
            if ret == 0:
                self.result("KVM_SET_XCRS (invalid)", False, f"the kernel accepted XCR0 {bad:#x}")
            self.expects.append(Expect(f"KVM_SET_XCRS XCR0={bad:#x} (refused)", "xcr0",
                                       {"vm": VM, "vcpu": 0, "source": "host", "value": bad}, {"ret": ret}))

            # IA32_XFD: XTILEDATA goes in only where the CPU has XFD and the guest's CPUID AMX.
            n = vm.set_msrs(fd, [(k.MSR_IA32_XFD, XTILEDATA)])
            self.expects.append(Expect(f"KVM_SET_MSRS IA32_XFD={XTILEDATA:#x}", "xfd",
                                       {"vm": VM, "vcpu": 0, "source": "host", "value": XTILEDATA},
                                       {"ret": 0 if n == 1 else -1}))
            got, values = vm.get_msrs(fd, [k.MSR_IA32_XFD])
            xfd = values[0] if got == 1 else 0

            # A real-mode guest that halts: KVM_RUN loads the guest FPU state (fpu_load).
            reason, rip = vm.guest(fd, k.HLT)
            if reason != k.KVM_EXIT_HLT:
                self.result("KVM_RUN (hlt guest)", False, f"exit reason {reason}, expected KVM_EXIT_HLT")

            def room(ev):
                errors = []
                if supported & ~ev.guest_features:
                    errors.append(f"guest_features {ev.guest_features:#x} lacks room for xcr0_supported "
                                  f"{supported:#x}")
                try:
                    size = k.xstate_standard_size(entries, ev.guest_features)
                    if ev.guest_size is not None and ev.guest_size != size:
                        errors.append(f"guest_size {ev.guest_size}, but CPUID leaf 0xD gives {size} bytes for "
                                      f"{ev.guest_features:#x}")
                except LookupError as e:
                    errors.append(str(e))
                return "; ".join(errors) or None
            self.expects.append(Expect("KVM_RUN of a hlt guest: fpu_load", "fpu_load", {"vm": VM, "vcpu": 0},
                                       {"xfd": xfd}, check=room, show=("guest_features", "guest_size")))
        finally:
            vm.close()

    # -- comparing --

    def _fields(self, e: Expect, which: dict) -> dict:
        return {f: self.vm_id if v is VM else v for f, v in which.items()}

    def _find(self, e: Expect, start: int):
        tgid = os.getpid() if e.tgid is None else e.tgid
        match = self._fields(e, e.match)
        for ev in self.seen[start:]:
            if ev.kind == e.kind and ev.tgid == tgid and all(getattr(ev, f, None) == v for f, v in match.items()):
                if e.kind == "vcpu_create" and self.vm_id is None:
                    self.vm_id = ev.vm
                return ev
        return None

    def _judge(self) -> None:
        for e in self.expects:
            ev = self._find(e, 0)
            if ev is None:
                shown = {f: _show(v, f) for f, v in self._fields(e, e.match).items()}
                self.result(e.name, False, f"no {e.kind} event {shown or ''} within {self.timeout:g} s")
                continue
            want = self._fields(e, e.want)
            wrong = {f: (_show(v, f), _show(getattr(ev, f, None), f)) for f, v in want.items()
                     if getattr(ev, f, None) != v}
            extra = e.check(ev) if e.check else None
            shown = list(e.match) + list(e.want) + list(e.show)
            summary = ", ".join(f"{f} {_show(getattr(ev, f, None), f)}" for f in shown if f != "option")
            if wrong or extra:
                detail = "; ".join([f"{f}: expected {a}, agent reported {b}" for f, (a, b) in wrong.items()]
                                   + ([extra] if extra else []))
                self.result(e.name, False, detail)
            else:
                self.result(e.name, True, summary or "seen")

    def _metrics(self) -> None:
        try:
            with urllib.request.urlopen(self.metrics, timeout=5) as r:
                text = r.read().decode()
        except (OSError, ValueError) as e:
            self.result("metrics", False, f"{self.metrics}: {e}")
            return
        samples = _parse_metrics(text)
        if self.vm_id is not None:
            bad = {labels.get("rule"): v for name, labels, v in samples
                   if name == "xstate_violations_total" and labels.get("vm") == self.vm_id and v}
            self.result(f"metrics: no violation for this VM ({self.vm_id})", not bad,
                        f"violations {bad}" if bad else "none")
        kinds = {e.kind for e in self.expects}
        have = {labels.get("kind"): v for name, labels, v in samples if name == "xstate_event_source_probes"}
        blind = sorted(kd for kd in kinds if not have.get(kd))
        self.result("metrics: an attached probe for each kind checked", not blind,
                    f"no probe for {', '.join(blind)}" if blind else ", ".join(sorted(kinds)))


MASKS = ("mask", "value", "xcr0_supported", "xfd", "guest_features", "guest_perm", "xstate_bv")


def _show(v, name: str = ""):
    return f"{v:#x}" if name in MASKS and isinstance(v, int) else v


def _parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of each sample of a Prometheus text exposition (enough of the format for ours)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in _split_labels(rest.rstrip("}")):
                key, _, val = part.partition("=")
                labels[key] = json.loads(val)
        try:
            out.append((name, labels, float(value)))
        except ValueError:
            continue
    return out


def _split_labels(s: str) -> list[str]:
    parts, cur, quoted, escaped = [], [], False, False
    for ch in s:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p for p in parts if p]
