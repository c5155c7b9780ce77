"""``report()``: per layer, what runs (format, backend, kernel), its bytes and FLOPs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparse_prune import backends
from sparse_prune.convert import PLAN_ATTR
from sparse_prune.nn import SparseLinear, SparseMLP
from sparse_prune.shrink import DENSE_SHAPE_ATTR


def _plan_fields(row: dict[str, Any], module: nn.Module) -> None:
    """Rows say why their layer is what it is; layers placed by format='auto' say so, with the
    measured dense/chosen ratio."""
    plan = module.__dict__.get(PLAN_ATTR)
    if plan is None:
        return
    row["why"] = plan["reason"]
    if "ratio" in plan:
        row["format"] = f"auto:{row['format'] if plan['format'] != 'dense' else 'dense'}"
        row["auto_speedup"] = plan["ratio"]


def report(model: nn.Module) -> list[dict[str, Any]]:
    """One row per Linear-like module: name, format, backend, kernel (what really runs),
    shape, density, bytes (every stored array, plus device payloads: a weight materialized for
    cuBLAS, cuSPARSELt's compressed copy, the CSR row schedule), dense_bytes,
    flops (per input row, of what the kernel really computes: dense for rebuild paths, see
    :func:`sparse_prune.backends.flops_per_row`), why (the plan's reason). Layers placed by
    ``format="auto"`` show ``auto:<choice>`` and ``auto_speedup`` (measured dense ms / chosen
    ms). The two layers of a :class:`~sparse_prune.nn.SparseMLP` that runs as one op on their
    device carry ``"mlp": "sparse_mlp"``. ``format_report(rows)`` prints them."""
    rows = []
    in_fused_mlp = set()
    for name, module in model.named_modules():
        if isinstance(module, SparseMLP):
            fc1, _ = module.layers()
            if module.fused(torch.empty(0, device=fc1.values.device)):
                in_fused_mlp.update(f"{name}.{child}" if name else child for child in module.names)
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            fmt = module.weight_format
            elem = fmt.values.element_size()
            # device payloads a kernel needs besides the portable format count too
            extra = sum(t.numel() * t.element_size() for t in (module.dense_weight, module.cslt_packed, module.sm90_e, module.row_order)
                        if t is not None)
            rows.append({"name": name, "format": module.format_name, "backend": module.backend,
                         "kernel": module.kernel_name, "shape": list(fmt.shape), "density": fmt.density,
                         "bytes": fmt.nbytes + extra, "dense_bytes": fmt.shape[0] * fmt.shape[1] * elem,
                         "flops": backends.flops_per_row(module.format_name, module.backend, fmt)})
            if module.activation:
                rows[-1]["activation"] = module.activation + (" (fused)" if module.fused_activation else "")
            if name in in_fused_mlp:
                rows[-1]["mlp"] = "sparse_mlp"
            _plan_fields(rows[-1], module)
        elif isinstance(module, nn.Linear):
            w = module.weight
            # a Linear cut by dependency-aware shrinking remembers its shape before the cut
            n, k = getattr(module, DENSE_SHAPE_ATTR, w.shape)
            cut = (n, k) != tuple(w.shape)
            rows.append({"name": name, "format": "shrink (cut)" if cut else "nn.Linear", "backend": "torch",
                         "kernel": "F.linear", "shape": [n, k],
                         "density": float((w != 0).sum()) / (n * k) if n * k else 1.0,
                         "bytes": w.numel() * w.element_size(), "dense_bytes": n * k * w.element_size(),
                         "flops": 2 * w.numel()})
            _plan_fields(rows[-1], module)
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`report` rows with totals."""
    auto = any("auto_speedup" in r for r in rows)
    head = ("name", "format", "backend", "kernel", "shape", "density", "bytes", "dense_bytes", "flops") + (
        ("auto_speedup",) if auto else ())
    cells = [[str(r["name"]), r["format"], r["backend"],
              r.get("kernel", "") + (f" [{r['mlp']}]" if "mlp" in r else ""), "x".join(map(str, r["shape"])),
              f"{r['density']:.3f}", str(r["bytes"]), str(r["dense_bytes"]), str(r["flops"])]
             + ([f"{r['auto_speedup']:.2f}x" if "auto_speedup" in r else ""] if auto else []) for r in rows]
    cells.append(["total", "", "", "", "", "", str(sum(r["bytes"] for r in rows)),
                  str(sum(r["dense_bytes"] for r in rows)), str(sum(r["flops"] for r in rows))] + ([""] if auto else []))
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
