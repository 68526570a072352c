"""The event model (spec/events.md): one typed representation for every producer and consumer."""

from agent.events.model import (  # noqa: F401
    EVENT_TYPES,
    KINDS,
    Cpuid,
    Event,
    Exec,
    Exit,
    FpuLoad,
    Fpstate,
    Passthrough,
    Perm,
    VcpuCreate,
    VcpuDestroy,
    VcpuEvent,
    Xcr0,
    Xfd,
    XfdErr,
    Xsave,
)
