"""Benchmarks: `python -m benchmarks.<group>.<name>` from the repository root (see docs/benchmarks)."""
