"""Benchmarks: `python -m bench.guidance` (guider cost on CPU)."""
