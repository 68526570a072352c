"""Loads bpf/tracepoints.bpf.c with BCC, attaches its probes one by one, and
turns ring-buffer records into agent.events.model events.

Kernel struct offsets come from BTF (agent.probes.offsets) as -D defines; a
probe group whose fields BTF lacks is left out of the build with a reason,
and the others still run.
"""

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.probes import decode
from agent.probes.offsets import GROUPS, Offsets, resolve

BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "tracepoints.bpf.c"
# Where scripts/install-deps.sh merges Debian's split header trees.
DEFAULT_HEADERS = "/var/lib/xstate-agent/kernel-headers"

# group -> (tracepoint, BPF function). Exits are attached before entries, so
# that no call is recorded at entry without a handler for its exit.
PROBES = {
    "arch_prctl": (("syscalls:sys_exit_arch_prctl", "on_exit_arch_prctl"),
                   ("syscalls:sys_enter_arch_prctl", "on_enter_arch_prctl")),
    "kvm_ioctl": (("syscalls:sys_exit_ioctl", "on_exit_ioctl"),
                  ("syscalls:sys_enter_ioctl", "on_enter_ioctl")),
    "guest_perm": (),  # no tracepoint: extra reads in the arch_prctl probes
}
assert PROBES.keys() == GROUPS.keys()


@dataclass
class Status:
    """Per probe group: attached, or why not."""
    attached: bool = False
    reason: str | None = None


@dataclass
class Timings:
    btf_s: float = 0.0
    compile_s: float = 0.0  # BPF(): clang + map creation
    attach_s: float = 0.0  # program loads (verifier) + tracepoint attach


class BackendError(Exception):
    pass


def bcc_available() -> str | None:
    """None if BCC can be imported, else why not."""
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"BCC's Python binding is not importable ({e}); install python3-bpfcc (scripts/install-deps.sh)"
    return None


def _headers_env() -> None:
    # BCC reads BCC_KERNEL_SOURCE from the environment when it compiles.
    if "BCC_KERNEL_SOURCE" not in os.environ and os.path.isdir(DEFAULT_HEADERS):
        os.environ["BCC_KERNEL_SOURCE"] = DEFAULT_HEADERS


@dataclass
class TracepointBackend:
    """Usage: b = TracepointBackend(on_event); b.start(); loop b.poll(); b.close()."""

    on_event: Callable  # (event: agent.events.model.Event, raw: decode.Raw) -> None
    groups: tuple[str, ...] = tuple(PROBES)
    ringbuf_pages: int = 4096  # 16 MiB: a 2 ms poll then absorbs >100k events/s
    # No wakeup per event: poll() drains on a timer (see bpf/tracepoints.bpf.c).
    wakeup_per_event: bool = False
    offsets: Offsets | None = None
    status: dict[str, Status] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    vms: decode.VmNames = field(default_factory=decode.VmNames)
    decode_errors: int = 0
    bpf: object = None

    def start(self) -> None:
        """Resolve offsets, compile, attach. Raises BackendError if nothing could attach."""
        why = bcc_available()
        if why:
            raise BackendError(why)
        from bcc import BPF

        t0 = time.perf_counter()
        if self.offsets is None:
            self.offsets = resolve()
        self.timings.btf_s = time.perf_counter() - t0

        build = []
        for g in self.groups:
            err = self.offsets.group_error(g)
            self.status[g] = Status(reason=f"BTF lacks a field: {err}" if err else None)
            if not err:
                build.append(g)
        cflags = [f"-DEVENT_SIZE={decode.EVENT_SIZE}", f"-DRINGBUF_PAGES={self.ringbuf_pages}",
                  f"-DSUBMIT_FLAGS={0 if self.wakeup_per_event else 'BPF_RB_NO_WAKEUP'}"] + self.offsets.cflags(build)
        _headers_env()

        t0 = time.perf_counter()
        try:
            self.bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        except Exception as e:
            raise BackendError(f"BCC could not compile {BPF_SOURCE.name} (BCC_KERNEL_SOURCE="
                               f"{os.environ.get('BCC_KERNEL_SOURCE', 'unset')}): {e}") from e
        self.timings.compile_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for g in build:
            try:
                for tp, fn in PROBES[g]:
                    f = self.bpf.load_func(fn.encode(), BPF.TRACEPOINT)
                    self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=f.name)
                self.status[g] = Status(attached=True)
            except Exception as e:  # BCC raises bare Exception
                self.status[g] = Status(reason=f"attach failed: {e}")
        self.timings.attach_s = time.perf_counter() - t0
        if not any(s.attached for s in self.status.values()):
            raise BackendError("no probe attached: " + "; ".join(f"{g}: {s.reason}" for g, s in self.status.items()))
        self.bpf[b"events"].open_ring_buffer(self._on_raw)

    def _on_raw(self, _ctx, data, size) -> None:
        raw = decode.Raw.unpack(ctypes.string_at(data, size))
        try:
            event = decode.to_event(raw, self.vms)
        except (KeyError, ValueError):
            self.decode_errors += 1
            return
        if event is not None:
            self.on_event(event, raw)

    def poll(self, timeout_ms: int = 2) -> None:
        """Wait up to timeout_ms, then hand every waiting record to on_event.
        Without a wakeup per event the wait always lasts timeout_ms: call this
        in a loop, it is the reader's timer."""
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()

    def lost(self) -> int:
        """Records dropped in BPF because the ring buffer was full."""
        return sum(sum(v) for v in self.bpf[b"lost"].values()) if self.bpf else 0

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
