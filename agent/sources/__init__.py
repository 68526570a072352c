"""Where events come from: recorded logs here, live probes in agent/probes."""
