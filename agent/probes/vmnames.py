"""VM identities for events: an opaque stable id per VM ("vm-3f0c9a1b2e")
in place of the kernel's `struct kvm` address, and a human name for labels,
taken from the VMM's command line (QEMU `-name`, else `-uuid`).

An id is a keyed hash of what identifies the VM on this host: its VMM's pid
and start time, its `struct kvm` address, and which VM at that address it
is. So an agent restarted while VMs run gives them the ids it gave them
before, and an events log appended across restarts replays as one history.
The key (VM_ID_KEY, made at the first run, readable by root only) keeps
the address out of reach: no kernel pointer leaves the agent, not even
hashed in a way anyone could reverse by trying addresses.

Ids are keyed by (tgid, address): an address can be reused by a later VM,
so the backend calls created() when it sees a new VM (KVM_CREATE_VM), which
gives the next VM at that address a new id, and forget() when the process
execs or exits.
"""

import hashlib
import os
import re
import unicodedata

from agent.stats import OTHER_VM

NAME_MAX = 64  # characters of a human name kept (it ends up in metric labels)
ID_PREFIX = "vm-"
# Whoever names a VM (a tenant, through the cloud's API) writes into the agent's metric labels, and
# from there into alert notifications (Slack, e-mail, Markdown), dashboards and operators' shells:
# of a name, letters and digits of any script, space and "-_.,:@+=" are kept; every other character
# (control and format characters, quotes, backslash, <>&/, `$*|{}[]()...) becomes "_".
_KEPT = frozenset(" -_.,:@+=")
# A name must not pass for another series: an unnamed VM's id, or the VMs past --max-vms.
_RESERVED = re.compile(rf"{re.escape(ID_PREFIX)}[0-9a-f]+|{re.escape(OTHER_VM)}")
# The hash key of VM ids (XSTATE_VM_ID_KEY to put it elsewhere).
VM_ID_KEY = "/var/lib/xstate-agent/vm-id.key"


def vm_id_key(path: str | None = None) -> bytes:
    """The host's key for VM ids: read, else made (root only), else one for this run only (ids are then
    stable for the run, not across restarts)."""
    path = path or os.environ.get("XSTATE_VM_ID_KEY", VM_ID_KEY)
    try:
        with open(path, "rb") as f:
            key = f.read(64)
        if len(key) >= 16:
            return key
    except OSError:
        pass
    key = os.urandom(32)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    except OSError:
        pass  # (another agent made it meanwhile: the next start reads that one)
    return key


def process_start(tgid: int, proc: str = "/proc") -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), "" if gone: with
    the pid, what tells this process from another that had its pid."""
    try:
        with open(os.path.join(proc, str(tgid), "stat"), "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _qemu_keyval(value: str, implied: str) -> dict[str, str]:
    """QEMU's `key=value,key=value` option syntax; a first element without '='
    belongs to the implied key; ',,' stands for a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if value[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    out: dict[str, str] = {}
    for n, part in enumerate(parts):
        key, eq, val = part.partition("=")
        if not eq:
            if n == 0:
                out.setdefault(implied, part)
            continue
        out.setdefault(key, val)
    return out


def _option(args: list[str], name: str) -> str | None:
    """Value of QEMU option `-name`/`--name` (given as `name`), the last one winning as in QEMU."""
    found = None
    for i, arg in enumerate(args):
        if arg in (f"-{name}", f"--{name}") and i + 1 < len(args):
            found = args[i + 1]
    return found


def sanitise(name: str) -> str | None:
    """The name with only letters, digits, space and "-_.,:@+=" (others become '_'), trimmed, at most
    NAME_MAX characters; None if that is empty or reserved (vm-N, _other)."""
    name = "".join(ch if ch.isalnum() or ch in _KEPT else "_" for ch in unicodedata.normalize("NFC", name))
    name = name.strip()[:NAME_MAX].rstrip()
    return name if name and not _RESERVED.fullmatch(name) else None


def name_from_cmdline(cmdline: bytes) -> str | None:
    """A human VM name from a VMM's /proc/<pid>/cmdline (NUL-separated).

    QEMU: `-name guest=NAME,...` or `-name NAME[,...]` (libvirt passes the
    former), else `-uuid UUID`. Anything else: None.
    """
    args = cmdline.decode("utf-8", "replace").split("\0")
    if args and args[-1] == "":
        args.pop()
    value = _option(args, "name")
    if value is not None:
        guest = _qemu_keyval(value, "guest").get("guest")
        if guest and (name := sanitise(guest)):
            return name
    uuid = _option(args, "uuid")
    return sanitise(uuid) if uuid else None


def read_cmdline(tgid: int, proc: str = "/proc") -> bytes | None:
    try:
        with open(os.path.join(proc, str(tgid), "cmdline"), "rb") as f:
            return f.read(65536)
    except OSError:
        return None  # gone already, or not ours to read


class VmNames:
    """VM ids by (tgid, struct kvm address), in generations: a VM created at
    an address a freed one had gets a new id from its creation on.

    With the time of each event and creation (the backends pass the records'
    ts), the id does not depend on the order records are decoded in: two
    backends' rings, read one after the other, may hand over a VM's events
    before the record of its creation.
    """

    def __init__(self, proc: str = "/proc", key: bytes | None = None):
        # (tgid, kvm) -> [[since_ts, id or None], ...], ascending since (-1: before any creation seen)
        self._ids: dict[tuple[int, int], list[list]] = {}
        self._names: dict[str, str | None] = {}  # id -> human name
        self._by_tgid: dict[int, str | None] = {}  # one cmdline read per process
        self._starts: dict[int, str] = {}  # tgid -> its start time
        self._epochs: dict[int, int] = {}  # tgid -> how many times forgotten (exec) in this run
        self._made: dict[tuple[int, int], int] = {}  # (tgid, kvm) -> ids made there, for the next one's
        self._proc = proc
        self._key = key if key is not None else vm_id_key()

    def _new(self, tgid: int, kvm: int) -> str:
        if tgid not in self._starts:
            self._starts[tgid] = process_start(tgid, self._proc)
        n = self._made.get((tgid, kvm), 0)
        self._made[(tgid, kvm)] = n + 1
        what = f"{tgid}:{self._starts[tgid]}:{self._epochs.get(tgid, 0)}:{kvm:x}:{n}"
        vm = ID_PREFIX + hashlib.blake2b(what.encode(), key=self._key[:64], digest_size=5).hexdigest()
        if tgid not in self._by_tgid:
            cmdline = read_cmdline(tgid, self._proc)
            self._by_tgid[tgid] = name_from_cmdline(cmdline) if cmdline else None
        self._names[vm] = self._by_tgid[tgid]
        return vm

    def id(self, tgid: int, kvm: int, ts: int | None = None) -> str:
        """The VM's opaque id, made (and its human name resolved) when first
        seen: that of the VM at `kvm` at time `ts` (None: the latest)."""
        gens = self._ids.get((tgid, kvm))
        if gens is None:
            gens = self._ids[(tgid, kvm)] = [[-1, None]]
        gen = gens[-1]
        if ts is not None:
            for g in reversed(gens):
                if g[0] <= ts:
                    gen = g
                    break
            else:  # before every creation seen there: a VM of its own
                gen = [-1, None]
                gens.insert(0, gen)
        if gen[1] is None:
            gen[1] = self._new(tgid, kvm)
        return gen[1]

    def name(self, vm: str) -> str | None:
        """The human name of VM id `vm` (from its VMM's command line), or None."""
        return self._names.get(vm)

    def created(self, tgid: int, kvm: int, ts: int | None = None) -> None:
        """A new VM at `kvm` (at time `ts`): if a freed VM had that address,
        its id is not reused (for events from `ts` on; without `ts`, for
        every later id() call, and the freed VM's id is forgotten)."""
        key = (tgid, kvm)
        gens = self._ids.get(key)
        if ts is None:
            if gens is not None:
                for _, vm in self._ids.pop(key):
                    if vm is not None:
                        self._names.pop(vm, None)
            return
        if gens is None:
            self._ids[key] = [[ts, None]]
        elif all(g[0] != ts for g in gens):
            gens.append([ts, None])
            gens.sort(key=lambda g: g[0])

    def forget(self, tgid: int) -> None:
        """The process exec'd or exited: its VMs are gone (and its command line may change)."""
        for key in [k for k in self._ids if k[0] == tgid]:
            for _, vm in self._ids.pop(key):
                if vm is not None:
                    self._names.pop(vm, None)
        for key in [k for k in self._made if k[0] == tgid]:
            del self._made[key]
        self._by_tgid.pop(tgid, None)
        # After an exec the same pid (and start time) runs other VMs: a new epoch; after an exit the
        # pid's next process has another start time.
        self._epochs[tgid] = self._epochs.get(tgid, 0) + 1
        self._starts.pop(tgid, None)
