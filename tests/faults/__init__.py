"""Faults injected and bad input, met through the CLI as a user meets them (docs/reliability.md lists them)."""
