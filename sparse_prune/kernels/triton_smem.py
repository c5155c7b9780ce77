"""Shared memory of our Triton kernels: the per-SM limits, the estimate, the autotune pruner.

Every Triton kernel of ours states what it loads per iteration of its inner loop
(``smem_estimate`` in its module). Triton's software pipeliner keeps ``num_stages - 1``
copies of every such tile in shared memory (cp.async/TMA ring buffers), and a dot operand
built in registers (the 2:4 expansion) takes one more staging buffer; :func:`pipelined` adds
that up. The estimate is **an upper bound of what Triton allocates**: the AOT sweep
(:mod:`sparse_prune.kernels.triton_aot`, ``make gpu-compile``) compiles every kernel x config x
dtype x flag for sm_80 and sm_90 and fails when ``metadata.shared`` exceeds it.

:func:`pruner` turns an estimate into the autotuner's ``early_config_prune``: on a GPU, the
configs whose estimate exceeds the device's opt-in shared memory per block are dropped
before any is compiled or timed, per dtype and per device, so no config the autotuner can try
fails to launch with ``OutOfResources``. At least one config always stays (the smallest).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Opt-in shared memory per thread block (bytes), by compute capability: CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability" (163 KB on 8.0/8.7, 99 KB on
# 8.6/8.9/12.x, 227 KB on 9.0/10.x). On a GPU the driver's own figure is used instead.
SMEM_LIMITS = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
# The archs the AOT sweep compiles for (GPUTarget("cuda", arch, 32)).
AOT_ARCHS = (80, 90)

__all__ = ["AOT_ARCHS", "SMEM_LIMITS", "device_smem_limit", "pipelined", "pruner", "select"]


def pipelined(num_stages: int, *tile_bytes: int, staged: int = 0) -> int:
    """Bytes for loop-carried loads ``tile_bytes`` (one iteration's tiles) multi-buffered over
    ``max(1, num_stages - 1)`` stages, plus ``staged`` bytes of one-off staging (a dot operand
    that is computed in registers and goes through shared memory to the tensor cores)."""
    return max(1, num_stages - 1) * sum(tile_bytes) + staged


def device_smem_limit(device: torch.device | int | None = None) -> int:
    """Opt-in shared memory per block of a CUDA device: the driver's figure (as Triton checks
    it at launch), else :data:`SMEM_LIMITS` by compute capability."""
    try:
        from triton.runtime import driver

        index = torch.device("cuda", device).index if isinstance(device, int) else (
            (device.index if device.index is not None else torch.cuda.current_device())
            if isinstance(device, torch.device) else torch.cuda.current_device())
        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 (no driver/older Triton: the table is the same rule)
        major, minor = torch.cuda.get_device_capability(device)
        return SMEM_LIMITS.get(10 * major + minor, SMEM_LIMITS[80])


def select(configs: list, estimates: list[int], limit: int) -> list:
    """The configs whose estimate is at most ``limit``; the smallest one when none is."""
    kept = [c for c, size in zip(configs, estimates, strict=True) if size <= limit]
    return kept or [configs[estimates.index(min(estimates))]]


def pruner(estimate: Callable[..., int], dtype_arg: str = "x_ptr") -> Callable:
    """``early_config_prune`` for ``triton.autotune``: keep the configs whose
    ``estimate(config.kwargs, config.num_stages, dtype, **constexprs)`` fits the device of
    ``named_args[dtype_arg]`` (the smallest one when none does). CPU tensors (the
    interpreter) are not pruned."""
    def prune(configs, named_args, **kwargs):
        x = named_args[dtype_arg]
        if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
            return configs
        sizes = [estimate(c.kwargs, c.num_stages, x.dtype, **kwargs) for c in configs]
        return select(configs, sizes, device_smem_limit(x.device))
    return prune
