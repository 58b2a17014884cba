"""Benchmarks: `python -m bench` (`make bench`) writes the quality, speed and memory tables; the parts run
alone as `python -m bench.guidance` (guider cost) and `python -m bench.memory` (peak memory per method)."""
