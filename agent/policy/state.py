"""What the policy remembers about processes and vCPUs, bounded by LRU caps.

None means unknown: the agent did not see what set it (it started late, or
the value is hidden by XFD passthrough). Rules never fire on unknowns.
"""

from collections import OrderedDict

HOST, GUEST = 0, 1
DEFAULT_MAX_PROCESSES = 4096
DEFAULT_MAX_VCPUS = 65536


class Proc:
    """A process (tgid): its permission masks, per family (HOST, GUEST)."""

    __slots__ = ("tgid", "allowed", "exact", "granted", "vcpu_created", "vcpus")

    def __init__(self, tgid: int):
        self.tgid = tgid
        # Bits known granted; the whole mask when exact.
        self.allowed = [0, 0]
        self.exact = [False, False]
        # Bits that calls of the family showed granted (XS016).
        self.granted = [0, 0]
        self.vcpu_created = False
        self.vcpus: set = set()

    def reset_permissions(self) -> None:
        """exec(): the kernel drops every dynamic permission, and we know it."""
        self.allowed = [0, 0]
        self.exact = [True, True]
        self.granted = [0, 0]
        self.vcpu_created = False


class VCpu:
    __slots__ = ("xcr0", "xfd", "xfd_err", "supported", "guest_features", "passthrough",
                 "last_xfd_write", "nonzero_xfd", "proc", "key")

    def __init__(self, created: bool, proc: Proc | None = None):
        # The owner and the tracker's key, so that one lookup in Tracker.index finds all three.
        self.proc = proc
        self.key = None
        if created:
            # The state right after an observed KVM_CREATE_VCPU.
            self.xcr0, self.xfd, self.xfd_err = 1, 0, 0
            self.guest_features, self.passthrough = 0, False
            self.last_xfd_write, self.nonzero_xfd = 0, False
        else:
            self.xcr0 = self.xfd = self.xfd_err = None
            self.guest_features = self.passthrough = None
            self.last_xfd_write = self.nonzero_xfd = None
        self.supported = None


class Tracker:
    """Processes and vCPUs, least recently seen evicted past the caps."""

    def __init__(self, max_processes: int = DEFAULT_MAX_PROCESSES, max_vcpus: int = DEFAULT_MAX_VCPUS):
        if max_processes < 1 or max_vcpus < 1:
            raise ValueError("the caps on tracked processes and vCPUs must be at least 1")
        self.max_processes = max_processes
        self.max_vcpus = max_vcpus
        self.procs: OrderedDict[int, Proc] = OrderedDict()
        self.vcpus: OrderedDict[tuple, VCpu] = OrderedDict()
        # The same vCPUs by tgid, vm, then vCPU id: an event finds its vCPU without
        # building (and hashing, twice) a key tuple. Engine.judge() reads it.
        self.index: dict[int, dict[str, dict[int, VCpu]]] = {}
        self.evicted_processes = 0
        self.evicted_vcpus = 0

    def proc(self, tgid: int) -> Proc:
        p = self.procs.get(tgid)
        if p is None:
            p = self.procs[tgid] = Proc(tgid)
            if len(self.procs) > self.max_processes:
                self._evict_proc()
        else:
            self.procs.move_to_end(tgid)
        return p

    def vcpu(self, p: Proc, vm: str, vcpu: int) -> VCpu:
        """The vCPU, first seen now with everything unknown if it was not tracked."""
        key = (p.tgid, vm, vcpu)
        c = self.vcpus.get(key)
        if c is None:
            c = self._add(p, key, VCpu(False, p))
            # A vCPU exists, so the process has created one.
            p.vcpu_created = True
        else:
            self.vcpus.move_to_end(key)
        return c

    def create_vcpu(self, p: Proc, vm: str, vcpu: int) -> VCpu:
        key = (p.tgid, vm, vcpu)
        self.vcpus.pop(key, None)
        p.vcpu_created = True
        return self._add(p, key, VCpu(True, p))

    def _add(self, p: Proc, key: tuple, c: VCpu) -> VCpu:
        c.key = key
        self.vcpus[key] = c
        p.vcpus.add(key)
        self.index.setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = c
        if len(self.vcpus) > self.max_vcpus:
            old, _ = self.vcpus.popitem(last=False)
            self._unindex(old)
            owner = self.procs.get(old[0])
            if owner is not None:
                owner.vcpus.discard(old)
            self.evicted_vcpus += 1
        return c

    def _unindex(self, key: tuple) -> None:
        vms = self.index[key[0]]
        ids = vms[key[1]]
        del ids[key[2]]
        if not ids:
            del vms[key[1]]
            if not vms:
                del self.index[key[0]]

    def destroy_vcpu(self, tgid: int, vm: str, vcpu: int) -> None:
        key = (tgid, vm, vcpu)
        if self.vcpus.pop(key, None) is not None:
            self._unindex(key)
            self.procs[tgid].vcpus.discard(key)

    def forget_vcpus(self, p: Proc) -> None:
        for key in p.vcpus:
            del self.vcpus[key]
        p.vcpus.clear()
        # All of the process's vCPUs, and only they, are under its tgid.
        self.index.pop(p.tgid, None)

    def forget(self, tgid: int) -> None:
        p = self.procs.pop(tgid, None)
        if p is not None:
            self.forget_vcpus(p)

    def _evict_proc(self) -> None:
        _, p = self.procs.popitem(last=False)
        self.evicted_vcpus += len(p.vcpus)
        self.forget_vcpus(p)
        self.evicted_processes += 1
