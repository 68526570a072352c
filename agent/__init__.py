"""xstate-agent: watches dynamic XSAVE (Intel AMX) state handling on KVM hosts."""

__version__ = "0.1.0"
