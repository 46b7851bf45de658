"""Chaos and soak suites: real processes on loopback, faults injected under load."""
