"""Live probes: BTF offsets, BPF loading, and decoding to agent.events.model."""
