"""Licensing: signed license tokens, the license proxy, the API-side gate and usage metering."""
