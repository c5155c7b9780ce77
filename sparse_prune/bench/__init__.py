"""Benchmark harness: interleaved timing of dense and sparse variants in one process."""

from sparse_prune.timing import describe_device, time_interleaved

__all__ = ["describe_device", "time_interleaved"]
