"""The agent sees this process's own arch_prctl XSTATE calls, with the right
option, feature, mask and result (the kernel's, as the syscall returned it)."""

import ctypes

from agent.events.model import Perm
from agent.probes.decode import F_CHECKED
from agent.xstate import PERM_LOCKED, XTILEDATA
from agent.kvmctl import (ARCH_GET_XCOMP_GUEST_PERM, ARCH_GET_XCOMP_PERM, ARCH_GET_XCOMP_SUPP, ARCH_REQ_XCOMP_GUEST_PERM,
                    ARCH_REQ_XCOMP_PERM, arch_prctl, arch_prctl_get)
from livecheck import require

ARCH_GET_FS = 0x1003


def _one(live, mark, with_raw=False):
    got = live.since(mark, 1)
    assert len(got) == 1, got
    event, raw = got[0]
    assert isinstance(event, Perm)
    return (event, raw) if with_raw else event


def test_get_options_report_the_mask_the_caller_got(live):
    for option, name in ((ARCH_GET_XCOMP_SUPP, "GET_XCOMP_SUPP"), (ARCH_GET_XCOMP_PERM, "GET_XCOMP_PERM"),
                         (ARCH_GET_XCOMP_GUEST_PERM, "GET_XCOMP_GUEST_PERM")):
        mark = live.mark()
        ret, mask = arch_prctl_get(option)
        assert ret == 0
        e = _one(live, mark)
        assert (e.option, e.ret, e.mask, e.feature) == (name, 0, mask, None)
        assert e.comm and e.tgid > 0


def test_guest_perm_read_through_btf_matches_the_kernels_answer(live):
    require(live.backend.status["guest_perm"].attached, f"guest_perm: {live.backend.status['guest_perm'].reason}")
    mark = live.mark()
    ret, mask = arch_prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    e, raw = _one(live, mark, with_raw=True)
    assert ret == 0 and raw.flags & F_CHECKED
    # The kernel answers __state_perm & XFEATURE_MASK_USER_SUPPORTED; what we
    # read is __state_perm itself (it may add supervisor bits and the lock flag).
    assert raw.check1 & mask == mask
    assert (raw.check1 & ~PERM_LOCKED & ~mask) < (1 << 17) or mask == 0, hex(raw.check1)


def test_supported_features_include_x87_and_sse(live):
    mark = live.mark()
    ret, mask = arch_prctl_get(ARCH_GET_XCOMP_SUPP)
    assert ret == 0 and mask & 0x3 == 0x3
    assert _one(live, mark).mask == mask


def test_req_guest_perm_for_amx(live):
    _, supported = arch_prctl_get(ARCH_GET_XCOMP_SUPP)
    mark = live.mark()
    ret = arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, ctypes.c_long(18))
    if not supported & XTILEDATA:
        assert ret < 0  # no AMX on this CPU: refused (-EOPNOTSUPP)
    e = _one(live, mark)
    assert (e.option, e.feature, e.ret, e.mask) == ("REQ_XCOMP_GUEST_PERM", 18, ret, None)


def test_req_perm_invalid_feature(live):
    mark = live.mark()
    ret = arch_prctl(ARCH_REQ_XCOMP_PERM, ctypes.c_long(1000))
    assert ret == -22  # idx >= XFEATURE_MAX
    e = _one(live, mark)
    # Beyond the model's 0..63 the feature is left out, the call still counts.
    assert (e.option, e.feature, e.ret) == ("REQ_XCOMP_PERM", None, -22)


def test_failed_get_has_no_mask(live):
    mark = live.mark()
    ret = arch_prctl(ARCH_GET_XCOMP_SUPP, ctypes.c_void_p(8))  # unmapped address: put_user fails
    assert ret == -14
    e = _one(live, mark)
    assert (e.option, e.ret, e.mask) == ("GET_XCOMP_SUPP", -14, None)


def test_other_options_are_filtered_in_the_kernel(live):
    mark = live.mark()
    fs = ctypes.c_uint64(0)
    assert arch_prctl(ARCH_GET_FS, ctypes.byref(fs)) == 0
    assert live.since(mark, 1, timeout=0.2) == []


def test_nothing_lost(live):
    live.assert_nothing_lost()
