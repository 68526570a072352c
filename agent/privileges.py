"""Least privilege for the live agent, once its probes are attached.

Attaching needs root (or CAP_BPF, CAP_PERFMON and friends); what the agent
does afterwards does not: it polls the ring buffer (epoll and mmap on a map
fd it holds), reads and updates BPF maps through open fds, reads
/proc/PID/cmdline (world-readable), appends to an open events log and
serves metrics on a socket bound before. So drop_privileges():

- drops every capability from the effective, permitted, inheritable and
  ambient sets and from the bounding set, but what map access through an
  open fd still needs on this kernel: nothing since Linux 5.19 (Debian 12's
  6.1 included); before, with kernel.unprivileged_bpf_disabled set, every
  bpf() call needs CAP_BPF (CAP_SYS_ADMIN before 5.8). That is probed, not
  guessed: a bpf() call on a bad fd with the capabilities lowered answers
  EBADF, or EPERM where the capability is needed;
- with a user, switches to it (supplementary groups, gid, uid): a uid 0
  without capabilities still owns, and can write, every root-owned file;
- sets no_new_privs: no exec can gain a privilege back (setuid binaries,
  file capabilities, root's own capabilities at exec).

Capabilities, the bounding set and no_new_privs belong to each thread, and a
thread inherits them from the thread that starts it: call this while the
process has one thread (start the metrics server's thread afterwards). It
checks every thread in /proc/self/task and raises PrivilegeError if one did
not end up in the same state.
"""

import ctypes
import errno
import os
import pwd
import threading
from collections.abc import Iterable

CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAP_SETPCAP, CAP_SYS_ADMIN, CAP_BPF = 8, 21, 39

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_KEEPCAPS, PR_CAPBSET_READ, PR_CAPBSET_DROP = 8, 23, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SYS_bpf, BPF_MAP_LOOKUP_ELEM = 321, 1  # x86_64: the agent watches Intel AMX hosts

_libc = ctypes.CDLL(None, use_errno=True)


class PrivilegeError(Exception):
    """Privileges could not be dropped as asked: the agent must not go on."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ret: int, what: str) -> int:
    if ret == -1:
        e = ctypes.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(e)}")
    return ret


def capget() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability masks."""
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capget")
    return tuple(getattr(data[0], s) | getattr(data[1], s) << 32 for s in ("effective", "permitted", "inheritable"))


def capset(effective: int, permitted: int, inheritable: int) -> None:
    data = (_CapData * 2)()
    for i in (0, 1):
        data[i] = _CapData(effective >> 32 * i & 0xFFFFFFFF, permitted >> 32 * i & 0xFFFFFFFF,
                           inheritable >> 32 * i & 0xFFFFFFFF)
    _check(_libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    """prctl(2); -1 with ctypes' errno set on failure. Its variadic arguments are unsigned longs."""
    ulong = ctypes.c_ulong
    return _libc.prctl(ctypes.c_int(option), ulong(arg), ulong(arg3), ulong(0), ulong(0))


def bits(mask: int) -> list[int]:
    return [bit for bit in range(64) if mask >> bit & 1]


def names(mask: int) -> list[str]:
    return [CAP_NAMES[bit] if bit < len(CAP_NAMES) else f"cap_{bit}" for bit in bits(mask)]


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


def bounding_set() -> int:
    return sum(1 << cap for cap in range(last_cap() + 1) if _prctl(PR_CAPBSET_READ, cap) == 1)


def lookup_user(user: str) -> tuple[str, int, int]:
    """(name, uid, gid) of a user name, or of a numeric uid (its own number as gid when no passwd entry has it)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"no such user: {user!r}") from None
        try:
            pw = pwd.getpwuid(int(user))
        except KeyError:
            return user, int(user), int(user)
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def _bpf_errno_on_bad_fd() -> int:
    """The errno of a map lookup on fd -1: EBADF when map access through an fd is checked against the fd
    alone; EPERM when every bpf() call needs CAP_BPF (kernel.unprivileged_bpf_disabled, before Linux 5.19)."""
    attr = (ctypes.c_uint64 * 4)(0xFFFFFFFF, 0, 0, 0)  # union bpf_attr: map_fd, key, value, flags
    if _libc.syscall(ctypes.c_long(SYS_bpf), ctypes.c_int(BPF_MAP_LOOKUP_ELEM), attr, ctypes.c_uint(32)) == 0:
        return 0
    return ctypes.get_errno()


def map_access_needs(permitted: int) -> tuple[int, str]:
    """(capabilities that map access through open fds needs here, why), found by a bpf() call with every
    capability lowered from the effective set (and raised again after)."""
    cap = CAP_BPF if last_cap() >= CAP_BPF else CAP_SYS_ADMIN
    effective, held, inheritable = capget()
    capset(0, held, inheritable)
    try:
        err = _bpf_errno_on_bad_fd()
    finally:
        capset(effective, held, inheritable)
    if err == errno.EBADF:
        return 0, "BPF map access through open fds needs no capability on this kernel"
    why = f"bpf() without capabilities fails here ({errno.errorcode.get(err, err)}), "
    if not permitted >> cap & 1:
        return 0, why + f"and {CAP_NAMES[cap]} is not held"
    return 1 << cap, why + f"{CAP_NAMES[cap]} kept for BPF map access"


def _status(task: str) -> dict[str, str]:
    with open(f"/proc/self/task/{task}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


STATUS_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


def _check_threads() -> None:
    """Every thread of the process in this thread's state (capabilities, bounding set, ids, no_new_privs)."""
    me = _status(str(threading.get_native_id()))
    for task in os.listdir("/proc/self/task"):
        try:
            other = _status(task)
        except OSError:
            continue  # ended meanwhile
        differ = [k for k in STATUS_KEYS if other.get(k) != me.get(k)]
        if differ:
            raise PrivilegeError(f"thread {task} ({other.get('Name')}) kept its {', '.join(differ)}: privileges "
                                 f"must be dropped before other threads start")


def drop_privileges(user: str | None = None, writable_dirs: Iterable[str] = ()) -> dict:
    """Drop every capability but what map access still needs (see the module's doc), switch to `user`
    if given, set no_new_privs; then check that `writable_dirs` (the events log's: it is rotated and
    reopened by name) can still be written to. Call it once the probes are attached, with one thread.
    What was done, for a log line (describe()). Raises PrivilegeError if anything of it fails: the
    caller must stop."""
    who = lookup_user(user) if user else None
    effective, permitted, _ = capget()
    keep, why = map_access_needs(permitted)
    # The bounding set only shrinks with CAP_SETPCAP; no_new_privs stops any exec from using what is left.
    can_bound = bool(effective >> CAP_SETPCAP & 1)
    if can_bound:
        for cap in bits(bounding_set() & ~keep):
            _check(_prctl(PR_CAPBSET_DROP, cap), f"dropping {names(1 << cap)[0]} from the bounding set")
    if _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) == -1 and ctypes.get_errno() != errno.EINVAL:
        _check(-1, "clearing the ambient set")  # EINVAL: a kernel before 4.3 has none
    if who is not None:
        name, uid, gid = who
        if keep:  # setuid() from root clears the permitted set, unless told to keep it
            _check(_prctl(PR_SET_KEEPCAPS, 1), "PR_SET_KEEPCAPS")
        try:
            # glibc applies these to every thread of the process.
            os.setgroups(os.getgrouplist(name, gid))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as e:
            raise PrivilegeError(f"switching to user {name} (uid {uid}, gid {gid}): {e.strerror}") from None
        if keep:
            _check(_prctl(PR_SET_KEEPCAPS, 0), "PR_SET_KEEPCAPS")
    capset(keep, keep, 0)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "PR_SET_NO_NEW_PRIVS")

    if capget() != (keep, keep, 0):
        raise PrivilegeError(f"capabilities still held: {', '.join(names(capget()[1] & ~keep))}")
    if who is not None and (os.getresuid() != (who[1],) * 3 or os.getresgid() != (who[2],) * 3):
        raise PrivilegeError(f"still uid {os.getresuid()}, gid {os.getresgid()}")
    _check_threads()
    for d in writable_dirs:
        if not os.access(d, os.W_OK | os.X_OK):
            raise PrivilegeError(f"{d} is not writable by uid {os.getuid()}"
                                 + (f": make it {who[0]}'s" if who else ""))
    return {
        "user": who[0] if who else None,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "kept": names(keep),
        "dropped": names(permitted & ~keep),
        "bounding": names(bounding_set()),
        "bounding_unchanged": None if can_bound else "no CAP_SETPCAP to shrink it",
        "no_new_privs": True,
        "why": why,
    }


def describe(result: dict) -> str:
    """One line for the log, from drop_privileges()'s result."""
    kept = ", ".join(result["kept"]) or "none"
    line = (f"dropped {len(result['dropped'])} capabilities, kept {kept} ({result['why']}); "
            f"bounding set: {', '.join(result['bounding']) or 'empty'}")
    if result["bounding_unchanged"]:
        line += f" (unchanged: {result['bounding_unchanged']})"
    line += f"; no_new_privs; uid {result['uid']} gid {result['gid']}"
    return line + (f" ({result['user']})" if result["user"] else "")
