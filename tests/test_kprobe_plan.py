"""The kprobe backend's choices without a kernel: which function each source
attaches to, given a fake kallsyms and BTF; the -D defines that follow; the
records only kprobes send, decoded into spec events; release() bookkeeping."""


from agent.events.model import Fpstate, Passthrough, VcpuDestroy, XfdErr
from agent.events.reader import decode_line
from agent.events.writer import encode
from agent.probes import decode as d
from agent.probes import kprobe_plan as kpp
from agent.probes.kprobe_backend import KprobeBackend, Status
from agent.probes.offsets import Offsets
from agent.probes.vmnames import VmNames

# What Debian's 6.1.0-56 and 6.12.117 kernels list (kvm, kvm_amd loaded), as
# read inside tests/vm/run-kernel; 6.18 is the development machines' kernel
# (KVM built in, PVM backend: no vmx/svm modules).
DEBIAN_6_1 = {
    "fpu_xstate_prctl": None, "kvm_arch_vcpu_ioctl": "kvm", "kvm_vm_ioctl": "kvm", "kvm_dev_ioctl": "kvm",
    "kvm_arch_init_vm": "kvm", "kvm_vcpu_ioctl": "kvm", "kvm_set_msr_common": "kvm",
    "fpu_swap_kvm_fpstate": None, "__kvm_set_xcr": "kvm", "kvm_emulate_xsetbv": "kvm",
    "__xfd_enable_feature": None, "fpu_enable_guest_xfd_features": None, "xfd_enable_feature": None,
    "kvm_arch_vcpu_destroy": "kvm", "fpu_free_guest_fpstate": None, "svm_set_msr": "kvm_amd",
    "kvm_arch_vcpu_create": "kvm", "kvm_arch_vcpu_postcreate": "kvm",
}
PARAMS = {
    "fpu_xstate_prctl": ("option", "arg2"),
    "__kvm_set_xcr": ("vcpu", "index", "xcr"),
    "kvm_emulate_xsetbv": ("vcpu",),
    "kvm_set_msr_common": ("vcpu", "msr_info"),
    "fpu_swap_kvm_fpstate": ("guest_fpu", "enter_guest"),
    "__xfd_enable_feature": ("xfd_err", "guest_fpu"),
    "fpu_enable_guest_xfd_features": ("guest_fpu", "xfeatures"),
    "xfd_enable_feature": ("xfd_err",),
    "kvm_vcpu_ioctl": ("filp", "ioctl", "arg"),
    "kvm_arch_vcpu_ioctl": ("filp", "ioctl", "arg"),
    "kvm_vm_ioctl": ("filp", "ioctl", "arg"),
    "kvm_dev_ioctl": ("filp", "ioctl", "arg"),
    "kvm_arch_init_vm": ("kvm", "type"),
    "kvm_arch_vcpu_destroy": ("vcpu",),
    "fpu_free_guest_fpstate": ("gfpu",),
    "kvm_arch_vcpu_create": ("vcpu",),
    "kvm_arch_vcpu_postcreate": ("vcpu",),
}


def offsets(missing=()) -> Offsets:
    """Every define any source may need, resolved (but those in `missing`)."""
    names = {d for s in kpp.SOURCES.values() for d in s.fields}
    names |= {d for s in kpp.SOURCES.values() for sl in s.slots for a in sl.alternatives for d in a.fields}
    names |= set(kpp.base_offsets.SCHED_EXIT_FALLBACK)
    o = Offsets()
    for i, n in enumerate(sorted(names)):
        if n in missing:
            o.errors[n] = f"struct x has no field for {n}"
        else:
            o.values[n] = 8 * i
    return o


def plan(kallsyms=DEBIAN_6_1, params=PARAMS, missing=(), blacklist=(), sources=tuple(kpp.SOURCES), tracepoints=True):
    return kpp.plan(sources, kallsyms, params.get, offsets(missing), set(blacklist), lambda tp: tracepoints)


def via(choice) -> list[str]:
    return [a.name for a in choice.alternatives]


def test_debian_6_1_and_6_12():
    p = plan()
    ok = {s for s, c in p.items() if c.ok}
    assert ok == set(kpp.SOURCES) - {"xfd_nm"}
    assert "handle_nm_fault_irqoff not in kallsyms" in p["xfd_nm"].reason
    assert "vmx_handle_exit_irqoff not in kallsyms" in p["xfd_nm"].reason
    assert via(p["arch_prctl"]) == ["fpu_xstate_prctl"] and p["arch_prctl"].defines == ("PRCTL_ARGS=2",)
    assert via(p["kvm_ioctl"]) == ["kvm_arch_vcpu_ioctl", "kvm_vm_ioctl", "kvm_dev_ioctl"]
    assert via(p["guest_xcr0"]) == ["__kvm_set_xcr", "kvm_vcpu_ioctl"] and p["guest_xcr0"].defines == ()
    assert via(p["fpstate"]) == ["__xfd_enable_feature"]
    assert via(p["vcpu_destroy"]) == ["kvm_arch_vcpu_destroy", "kvm_arch_vcpu_create + kvm_arch_vcpu_postcreate"]
    assert via(p["passthrough"]) == ["svm_set_msr"] and p["passthrough"].notes
    assert p["sched"].hooks == ("tracepoint:sched:sched_process_exit", "tracepoint:sched:sched_process_exec")
    # Returns before entries, each function once.
    assert p["guest_xcr0"].hooks == ("kretprobe:__kvm_set_xcr", "kprobe:__kvm_set_xcr", "kprobe:kvm_vcpu_ioctl")


def test_intel_host_with_inlined_nm_handler_uses_the_exit_handler():
    ks = dict(DEBIAN_6_1, vmx_set_msr="kvm_intel", vmx_handle_exit_irqoff="kvm_intel")
    del ks["svm_set_msr"]
    p = plan(ks)
    assert via(p["passthrough"]) == ["vmx_set_msr"] and not p["passthrough"].notes
    assert via(p["xfd_nm"]) == ["vmx_handle_exit_irqoff"]
    assert p["xfd_nm"].defines == ("NM_VIA_EXIT_IRQOFF",)
    assert {"OFF_VMX_EXIT_REASON", "OFF_VMX_EXIT_INTR_INFO"} <= set(p["xfd_nm"].fields)
    # Where the kernel keeps handle_nm_fault_irqoff out of line, that is the probe.
    p = plan(dict(ks, handle_nm_fault_irqoff="kvm_intel"))
    assert via(p["xfd_nm"]) == ["handle_nm_fault_irqoff"] and p["xfd_nm"].defines == ()
    # kvm_intel's BTF has no vcpu_vmx (not loaded: an AMD host): that way is left out, with the reason.
    p = plan(ks, missing=("OFF_VMX_EXIT_REASON",))
    assert not p["xfd_nm"].ok and p["xfd_nm"].reason.startswith("BTF lacks a field")


def test_fpu_xstate_prctl_signature_is_chosen_by_btf():
    p = plan(params=dict(PARAMS, fpu_xstate_prctl=("tsk", "option", "arg2")))
    assert p["arch_prctl"].ok and p["arch_prctl"].defines == ("PRCTL_ARGS=3",)
    assert p["arch_prctl"].notes == ["5.16-5.17 signature (with the task)"]
    p = plan(params=dict(PARAMS, fpu_xstate_prctl=("option", "arg2", "arg3")))
    assert not p["arch_prctl"].ok and "fpu_xstate_prctl(option, arg2, arg3) in BTF" in p["arch_prctl"].reason
    # No FUNC in BTF: the argument positions are unknown, the source is left out.
    params = {k: v for k, v in PARAMS.items() if k != "fpu_xstate_prctl"}
    p = plan(params=params)
    assert not p["arch_prctl"].ok and "no FUNC in BTF" in p["arch_prctl"].reason
    assert p["kvm_ioctl"].ok  # the others do not need BTF to have their functions


def test_inlined_functions_fall_back_in_order():
    ks = {k: v for k, v in DEBIAN_6_1.items() if k not in ("__kvm_set_xcr", "__xfd_enable_feature",
                                                           "kvm_arch_vcpu_destroy", "kvm_dev_ioctl")}
    p = plan(ks)
    assert via(p["guest_xcr0"]) == ["kvm_emulate_xsetbv", "kvm_vcpu_ioctl"]
    assert p["guest_xcr0"].defines == ("XCR_VIA_XSETBV",) and "VCPU_REG_RCX" in p["guest_xcr0"].fields
    assert via(p["fpstate"]) == ["fpu_enable_guest_xfd_features + xfd_enable_feature"]
    assert p["fpstate"].defines == ("FPSTATE_VIA_CALLERS",)
    assert via(p["vcpu_destroy"])[0] == "fpu_free_guest_fpstate" and p["vcpu_destroy"].defines == ("VCPU_FROM_GFPU",)
    assert via(p["kvm_ioctl"])[-1] == "kvm_arch_init_vm"
    assert all(c.ok for s, c in p.items() if s != "xfd_nm")


def test_signature_mismatch_skips_an_alternative():
    p = plan(params=dict(PARAMS, __kvm_set_xcr=("vcpu", "xcr")))
    assert via(p["guest_xcr0"])[0] == "kvm_emulate_xsetbv"


def test_missing_function_degrades_that_source_and_those_built_on_it():
    ks = {k: v for k, v in DEBIAN_6_1.items() if k != "kvm_set_msr_common"}
    p = plan(ks)
    assert not p["guest_msr"].ok and p["guest_msr"].reason == \
        "IA32_XFD/XFD_ERR writes: kvm_set_msr_common not in kallsyms (inlined or not built)"
    assert p["passthrough"].reason.startswith("needs source kvm_msrs: IA32_XFD/XFD_ERR writes")
    assert p["kvm_ioctl"].ok and p["fpu_load"].ok and p["arch_prctl"].ok
    ks = {k: v for k, v in DEBIAN_6_1.items() if k != "kvm_arch_vcpu_ioctl"}
    p = plan(ks)
    for s in ("kvm_msrs", "kvm_xsave", "fpu_load", "guest_xcr0", "passthrough"):
        assert not p[s].ok and "kvm_arch_vcpu_ioctl not in kallsyms" in p[s].reason, s
    assert p["guest_msr"].ok and p["fpstate"].ok and p["arch_prctl"].ok and p["vcpu_destroy"].ok


def test_blacklisted_function_is_not_used():
    p = plan(blacklist={"__kvm_set_xcr"})
    assert via(p["guest_xcr0"])[0] == "kvm_emulate_xsetbv"


def test_missing_btf_field_disables_only_its_sources():
    p = plan(missing=("OFF_MSR_HOST_INITIATED",))
    bad = {s for s, c in p.items() if not c.ok}
    assert bad == {"kvm_msrs", "guest_msr", "passthrough", "xfd_nm"}
    assert p["guest_msr"].reason == "BTF lacks a field: struct x has no field for OFF_MSR_HOST_INITIATED"


def test_no_tracepoints_means_no_sched():
    p = plan(tracepoints=False)
    assert not p["sched"].ok and "no tracepoint sched:sched_process_exit" in p["sched"].reason
    assert p["kvm_ioctl"].ok


def test_a_source_needs_its_required_sources_asked_for():
    p = plan(sources=("kvm_msrs",))
    assert list(p) == ["kvm_msrs"] and p["kvm_msrs"].reason == "needs source kvm_ioctl: not asked for"
    p = plan(sources=("guest_msr", "fpstate"))
    assert all(c.ok for c in p.values())


def test_cflags():
    o = offsets()
    p = plan()
    flags = kpp.cflags([p[s] for s in ("arch_prctl", "kvm_ioctl", "fpu_load", "sched")], o, exit_has_group_dead=False)
    assert "-DKPROBES=1" in flags and f"-DKP_NGROUPS={len(kpp.SOURCES)}" in flags
    assert "-DWITH_ARCH_PRCTL=1" in flags and "-DPRCTL_ARGS=2" in flags
    assert "-DWITH_KVM_RUN=1" in flags  # fpu_load needs the thread's KVM_RUN
    assert "-DEXIT_HAS_GROUP_DEAD=1" not in flags
    assert f"-DOFF_SIGNAL_LIVE={o.values['OFF_SIGNAL_LIVE']}" in flags
    assert f"-DOFF_VCPU_GUEST_FPU={o.values['OFF_VCPU_GUEST_FPU']}" in flags
    assert "-DGROUP_XFD_NM=12" in flags and "-DWITH_XFD_NM=1" not in flags
    assert flags == sorted(set(flags))


def test_kallsyms_reader(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff81000000 T _text\n"
                 "ffffffff81010000 T fpu_xstate_prctl\n"
                 "ffffffff81010100 t __kvm_set_xcr.isra.0\n"
                 "ffffffff81010200 d kvm_vcpu_ioctl\n"
                 "ffffffffc0010000 t kvm_vcpu_ioctl\t[kvm]\n"
                 "ffffffffc0020000 t svm_set_msr\t[kvm_amd]\n")
    ks = kpp.read_kallsyms(str(f))
    assert ks == {"_text": None, "fpu_xstate_prctl": None, "__kvm_set_xcr.isra.0": None, "kvm_vcpu_ioctl": "kvm",
                  "svm_set_msr": "kvm_amd"}
    assert "__kvm_set_xcr" not in ks  # a clone the compiler renamed is not the function
    assert kpp.read_kallsyms(str(f), wanted={"svm_set_msr"}) == {"svm_set_msr": "kvm_amd"}


def test_every_bpf_function_named_exists_in_the_program():
    from agent.probes.kprobe_backend import BPF_SOURCE
    from agent.probes.tracepoint_backend import program_text
    src = program_text(BPF_SOURCE)  # with its headers, as BCC gets it
    fns = {h[2] for s in kpp.SOURCES.values() for sl in s.slots for a in sl.alternatives for p in a.probes
           for h in p.hooks()}
    for fn in fns:
        assert f"int {fn}(" in src, fn


# ---- records only kprobes send ----------------------------------------------------------------------

def rec(kind, *, value=0, vm=0xFFFF888812345000, check1=0, check2=0, tgid=42, ret=0, arg=0, flags=0, size=0):
    return d.RAW.pack(1000, value, vm, check1, check2, 0, 0, tgid, 43, kind, 0, ret & 0xFFFFFFFF,
                      arg & 0xFFFFFFFF, flags, size, b"qemu")


def event(data):
    e = d.to_event(d.Raw.unpack(data), VmNames(proc="/nonexistent"))
    assert decode_line(encode(e).rstrip(b"\n")) == e
    return e


def test_fpstate_guest_and_host():
    e = event(rec(d.EV_FPSTATE, value=0x40000, arg=1, flags=d.F_VALUE | d.F_GUEST | d.F_CHECKED, size=11008,
                  check1=11072, check2=0x602E7))
    assert isinstance(e, Fpstate)
    assert (e.guest, e.features, e.size, e.ret, e.vcpu) == (True, 0x40000, 11008, 0, 1) and e.vm.startswith("vm-")
    # Refused: the buffer read at return is the old one, its size is left out.
    e = event(rec(d.EV_FPSTATE, value=0x40000, ret=-1, flags=d.F_VALUE | d.F_GUEST | d.F_CHECKED, size=832))
    assert (e.ret, e.size) == (-1, None)
    # The process's own buffer: no VM.
    e = event(rec(d.EV_FPSTATE, value=0x40000, flags=d.F_VALUE | d.F_CHECKED, size=11008))
    assert (e.guest, e.vm, e.vcpu, e.size) == (False, None, None, 11008)


def test_passthrough_vcpu_destroy_and_nm():
    e = event(rec(d.EV_PASSTHROUGH, value=1, arg=2, flags=d.F_VALUE))
    assert isinstance(e, Passthrough) and (e.enabled, e.vcpu) == (True, 2)
    e = event(rec(d.EV_VCPU_DESTROY, arg=3))
    assert isinstance(e, VcpuDestroy) and e.vcpu == 3
    e = event(rec(d.EV_XFD_ERR, value=0x40000, flags=d.F_VALUE | d.F_NM, check1=0x40000))
    assert isinstance(e, XfdErr) and (e.source, e.value, e.ret) == ("nm", 0x40000, 0)


# ---- release() bookkeeping, with a stand-in for BCC ---------------------------------------------------

class FakeTable(dict):
    Key = Leaf = staticmethod(lambda v: v)


class FakeBpf:
    def __init__(self):
        self.tables = {b"group_on": FakeTable()}
        self.detached = []

    def __getitem__(self, name):
        return self.tables[name]

    def detach_kprobe(self, sym, fn):
        self.detached.append(("kprobe", sym.decode(), fn.decode()))

    def detach_kretprobe(self, sym, fn):
        self.detached.append(("kretprobe", sym.decode(), fn.decode()))

    def detach_tracepoint(self, tp):
        self.detached.append(("tracepoint", tp.decode()))


def test_release_hands_back_a_source_and_its_dependents():
    b = KprobeBackend(lambda e, r: None, kallsyms=DEBIAN_6_1, btf_params=PARAMS.get, offsets=offsets(),
                      blacklist=set(), tracepoint_exists=lambda tp: True, exit_has_group_dead=True)
    b.plan()
    b.bpf = FakeBpf()
    for s, c in b.choices.items():  # as _attach() leaves them
        if c.ok:
            b.status[s].attached = True
            b.bpf.tables[b"group_on"][kpp.GROUP_INDEX[s]] = 1
            for p in c.probes:
                for hook in p.hooks():
                    if hook not in b._users:
                        b._users[hook] = set()
                        b.attached.append(hook)
                    b._users[hook].add(s)
    done = b.release(["kvm_ioctl"])
    assert set(done) == {"kvm_ioctl", "kvm_msrs", "kvm_xsave", "fpu_load", "guest_xcr0", "passthrough"}
    assert all(b.status[s] == Status(False, "released to another backend", b.status[s].hooks, b.status[s].via,
                                     b.status[s].notes, True) for s in done)
    on = b.bpf.tables[b"group_on"]
    assert on[kpp.GROUP_INDEX["kvm_msrs"]] == 0 and on[kpp.GROUP_INDEX["guest_msr"]] == 1
    # kvm_set_msr_common stays for guest_msr (its host records stop in the kernel: group_on).
    assert ("kprobe", "kvm_set_msr_common", "kp_set_msr") in b.attached
    assert ("kprobe", "kvm_arch_vcpu_ioctl", "kp_arch_vcpu_ioctl") in b.bpf.detached
    assert ("kprobe", "__kvm_set_xcr", "kp_set_xcr") in b.bpf.detached
    assert b.status["guest_perm"].attached  # arch_prctl still reads it
    assert set(b.release(["arch_prctl"])) == {"arch_prctl", "guest_perm"}
    assert set(b.kinds_covered()) == {"xfd", "xfd_err", "exec", "exit", "fpstate", "vcpu_destroy"}


def test_vm_ids_by_time_whatever_the_decode_order():
    """Two backends' rings are read one after the other: a freed VM's last
    event may be decoded after the creation of a new VM at its address."""
    v = VmNames(proc="/nonexistent")
    old = v.id(7, 0xA, 100)
    v.created(7, 0xA, 200)  # a new VM at the same address
    new = v.id(7, 0xA, 250)
    assert new != old
    assert v.id(7, 0xA, 150) == old  # the freed VM's late event (the other ring)
    assert v.id(7, 0xA, 300) == new and v.id(7, 0xA) == new
    v.created(7, 0xA, 200)  # the same creation again: nothing changes
    assert v.id(7, 0xA, 260) == new
    # A creation seen before any event of the address: older events are another VM's.
    v.created(8, 0xB, 500)
    first = v.id(8, 0xB, 600)
    assert v.id(8, 0xB, 400) != first and v.id(8, 0xB, 700) == first
    v.forget(7)
    assert v.name(old) is None and v.id(7, 0xA, 250) not in (old, new)
