"""agent.privileges: capability names, user lookup, what BPF map access needs, and real drops in child
processes (as root: dropping is one-way, so never in the test process itself)."""

import errno
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from agent import privileges as p

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: drops privileges for real (in a child)")


def test_names():
    assert p.names(0) == []
    assert p.names(1 << p.CAP_BPF | 1) == ["CAP_CHOWN", "CAP_BPF"]
    assert p.names(1 << 45) == ["cap_45"]  # a capability newer than this table
    assert len(p.CAP_NAMES) == 41 and p.CAP_NAMES[p.CAP_SYS_ADMIN] == "CAP_SYS_ADMIN"


def test_lookup_user():
    assert p.lookup_user("root") == ("root", 0, 0)
    assert p.lookup_user("0") == ("root", 0, 0)
    assert p.lookup_user("4242424") == ("4242424", 4242424, 4242424)  # a uid without a passwd entry
    with pytest.raises(p.PrivilegeError, match="no such user"):
        p.lookup_user("no-such-user-xstate")


@pytest.mark.parametrize("err, held, kept, why", [
    (errno.EBADF, 1 << p.CAP_BPF, 0, "needs no capability"),
    # Linux before 5.19 with kernel.unprivileged_bpf_disabled: every bpf() call needs CAP_BPF.
    (errno.EPERM, 1 << p.CAP_BPF, 1 << p.CAP_BPF, "EPERM.*CAP_BPF kept"),
    (errno.EPERM, 0, 0, "CAP_BPF is not held"),
])
def test_map_access_needs(monkeypatch, err, held, kept, why):
    seen = []

    def probe():
        seen.append(p.capget()[0])
        return err
    monkeypatch.setattr(p, "_bpf_errno_on_bad_fd", probe)
    before = p.capget()
    got, reason = p.map_access_needs(held)
    assert got == kept
    assert re.search(why, reason), reason
    assert seen == [0]  # probed with no effective capability
    assert p.capget() == before  # and given back


def test_the_real_probe_answers():
    # Whatever the kernel, a lookup on fd -1 fails: EBADF, or EPERM before Linux 5.19.
    assert p._bpf_errno_on_bad_fd() in (errno.EBADF, errno.EPERM)


def test_describe():
    line = p.describe({"user": "nobody", "uid": 65534, "gid": 65534, "kept": [], "dropped": ["CAP_CHOWN"] * 40,
                       "bounding": [], "bounding_unchanged": None, "no_new_privs": True, "why": "because"})
    assert line == ("dropped 40 capabilities, kept none (because); bounding set: empty; no_new_privs; "
                    "uid 65534 gid 65534 (nobody)")


CHILD = textwrap.dedent("""
    import errno, json, sys, threading, time
    from agent import privileges as p
    user, force_eperm, thread, writable = json.loads(sys.argv[1])
    if force_eperm:
        p._bpf_errno_on_bad_fd = lambda: errno.EPERM
    if thread:
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
    try:
        result = p.drop_privileges(user, writable)
    except p.PrivilegeError as e:
        print(json.dumps({"error": str(e)}))
        sys.exit(0)
    status = dict(line.rstrip("\\n").split(":\\t", 1) for line in open("/proc/self/status") if ":\\t" in line)
    print(json.dumps({"result": result, "status": {k: status[k] for k in p.STATUS_KEYS}}))
""")


def _child(user=None, force_eperm=False, thread=False, writable=()):
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([user, force_eperm, thread, list(writable)])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _mask(status, key):
    return int(status[key], 16)


@ROOT_ONLY
def test_drop_as_root_keeps_uid_0_without_any_capability():
    got = _child()
    st, res = got["status"], got["result"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert _mask(st, key) == 0, key
    assert st["NoNewPrivs"] == "1" and st["Uid"].split() == ["0"] * 4
    assert res["kept"] == [] and "CAP_SYS_ADMIN" in res["dropped"] and res["bounding"] == []


@ROOT_ONLY
def test_drop_to_nobody():
    got = _child("nobody")
    st, res = got["status"], got["result"]
    assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split()[0] == str(p.lookup_user("nobody")[2])
    assert all(_mask(st, k) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
    assert st["NoNewPrivs"] == "1" and res["user"] == "nobody"


@ROOT_ONLY
def test_drop_to_nobody_keeping_cap_bpf_where_map_access_needs_it():
    # As on a kernel before 5.19 with unprivileged BPF disabled: CAP_BPF survives the switch (PR_SET_KEEPCAPS).
    got = _child("nobody", force_eperm=True)
    st, res = got["status"], got["result"]
    bpf = 1 << p.CAP_BPF
    assert (_mask(st, "CapPrm"), _mask(st, "CapEff"), _mask(st, "CapBnd")) == (bpf, bpf, bpf)
    assert (_mask(st, "CapInh"), _mask(st, "CapAmb")) == (0, 0)
    assert st["Uid"].split() == ["65534"] * 4 and st["NoNewPrivs"] == "1"
    assert res["kept"] == ["CAP_BPF"] and "CAP_BPF" not in res["dropped"]


@ROOT_ONLY
def test_a_thread_started_before_is_refused():
    assert "must be dropped before other threads start" in _child(thread=True)["error"]


@ROOT_ONLY
def test_unknown_user_and_unwritable_log_directory(tmp_path):
    assert "no such user" in _child("no-such-user-xstate")["error"]
    tmp_path.chmod(0o755)
    # pytest's base directory is root's only: nobody could not rotate or reopen an events log there.
    assert _child("nobody", writable=[str(tmp_path)])["error"] == \
        f"{tmp_path} is not writable by uid 65534: make it nobody's"
    assert "error" not in _child(writable=[str(tmp_path)])  # uid 0 owns it
