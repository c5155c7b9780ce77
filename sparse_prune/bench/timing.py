"""Interleaved medians: every variant is timed in the same rounds, so drift hits all alike."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: str | torch.device) -> str:
    """GPU name for CUDA devices, CPU model and thread count otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def git_commit(default: str = "unknown") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return default
    return out.stdout.strip() or default


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def time_interleaved(fns: dict[str, Callable[[], object]], device: str | torch.device = "cpu",
                     warmup: int = 2, reps: int = 5) -> dict[str, float]:
    """Median milliseconds of each callable, timed round-robin (A B C, A B C, ...).

    ``warmup`` untimed rounds first (allocator, autotuning, lazy init). Raises ``ValueError``
    for ``reps < 1`` or ``warmup < 0``.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    run = _timer(torch.device(device))
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                samples[name].append(run(fn))
    return {name: statistics.median(ts) for name, ts in samples.items()}
