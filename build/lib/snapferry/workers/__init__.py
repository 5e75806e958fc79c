"""Processes: Temporal client factory, worker assembly, the embedded stack and the CLI."""
