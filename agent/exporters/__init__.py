"""Exporters: how the agent's statistics leave the host (Prometheus)."""
