"""Interleaved timing: every variant is timed in the same rounds (order rotating), so drift
hits all alike; medians and spreads of the samples."""

from __future__ import annotations

import gc
import platform
import re
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


def cpu_slug() -> str:
    """This CPU's model name as a folder name (``cpu-`` is the caller's): lower case, trademark
    marks dropped, runs of other characters as ``-`` ("Intel(R) Xeon(R) Processor" ->
    ``intel-xeon-processor``). Results of a CPU go to ``benchmarks/results/cpu-<slug>/``."""
    name = re.sub(r"\((r|tm)\)", "", _cpu_name().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


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


def time_samples(fns: dict[str, Callable[[], object]], device: str | torch.device = "cpu",
                 warmup: int = 2, reps: int = 5) -> dict[str, list[float]]:
    """Milliseconds of every call of each callable, timed in rounds.

    Each round runs every callable once; the order rotates by one each round (A B C, B C A,
    C A B, ...), so no variant always runs first (after an idle gap) or last. Python's garbage
    collector is off inside a round, as ``timeit`` has it, and collects between rounds what the
    calls left. ``warmup`` untimed rounds first (allocator, autotuning, lazy init). On CUDA each
    call is timed with events and synchronized. The caller's collector state (enabled, frozen
    objects) is the same afterwards. Raises ``ValueError`` for ``reps < 1``, ``warmup < 0`` or
    no callables.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    if not fns:
        raise ValueError("fns must hold at least one callable")
    run = _timer(torch.device(device))
    names = list(fns)
    gc_was_enabled = gc.isenabled()
    # Everything alive now is frozen for the rounds (gc.freeze: out of every collection), so the
    # full collection between rounds walks only what the calls made: a full collection over
    # torch's and triton's objects took 0.1 s in a fresh process and 0.4 s late in the test
    # suite, which was most of format="auto"'s time (ViT-B/16 at 90%: 34.5-35.5 s -> 17.5-19.6 s). Where
    # the caller froze objects itself nothing more is frozen (unfreeze would thaw the caller's
    # too): the rounds then walk whatever it left unfrozen.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for fn in fns.values():
                    fn()
            samples: dict[str, list[float]] = {name: [] for name in names}
            for r in range(reps):
                # Python's garbage collector off while timing, as timeit does: a collection
                # triggered inside a call is noise of the interpreter, not of the variant (perf:
                # gc_collect_main was ~4% of a 90%-sparse ViT-B/16 forward)
                gc.collect()
                gc.disable()
                for i in range(len(names)):
                    name = names[(i + r) % len(names)]
                    samples[name].append(run(fns[name]))
                if gc_was_enabled:
                    gc.enable()
    finally:
        if freeze:
            gc.unfreeze()
        if gc_was_enabled:
            gc.enable()
    return samples


def spread(samples: list[float]) -> dict[str, float]:
    """``{"median", "q1", "q3", "min", "max"}`` of a list of timings (quartiles by linear
    interpolation; with one sample all five are that sample)."""
    if not samples:
        raise ValueError("samples must not be empty")
    ordered = sorted(samples)

    def quantile(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median": statistics.median(ordered), "q1": quantile(0.25), "q3": quantile(0.75),
            "min": ordered[0], "max": ordered[-1]}


def time_interleaved(fns: dict[str, Callable[[], object]], device: str | torch.device = "cpu",
                     warmup: int = 2, reps: int = 5) -> dict[str, float]:
    """Median milliseconds of each callable, timed in rotating rounds (:func:`time_samples`)."""
    return {name: statistics.median(ts) for name, ts in time_samples(fns, device, warmup, reps).items()}
