"""Drop-in ``nn.Linear`` replacements holding a compact format, ``convert()`` and ``report()``."""

from __future__ import annotations

import copy
import warnings
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from sparse_prune import formats as F
from sparse_prune.masks import MaskSet
from sparse_prune.shrink import DENSE_SHAPE_ATTR, open_mha_out_proj, shrink_groups
from sparse_prune.structure import resolve_param

CONVERT_FORMATS = tuple(F.FORMATS)
BACKENDS = ("auto", "torch", "triton", "cuda")
CUDA_FORMATS = ("2:4", "csr")  # formats with a csrc/ kernel


# format name -> (op in torch.ops.sparse_prune, format fields passed in order, takes out_features)
_OPS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "dense": ("dense_linear", ("values",), False),
    "shrink": ("shrunk_linear", ("values", "out_index", "in_index"), True),
    "2:4": ("semi24_linear", ("values", "meta"), False),
    "csr": ("csr_linear", ("values", "crow_indices", "col_indices"), True),
    "bsr": ("bsr_linear", ("values", "crow_indices", "col_indices"), True),
}


class SparseLinear(nn.Module):
    """``y = x · Wᵀ + b`` with ``W`` held in a compact format; a drop-in ``nn.Linear``.

    Accepts ``x [..., in_features]`` of the weight's dtype and returns ``[..., out_features]``.
    The format's arrays are buffers, so ``.to()``, ``state_dict``, ``deepcopy`` and pickling
    work; ``.to(dtype)`` converts the values (indices keep their integer types).
    """

    def __init__(self, fmt: F._Format, bias: torch.Tensor | None, backend: str = "torch"):
        super().__init__()
        self.format_name = next(k for k, cls in F.FORMATS.items() if isinstance(fmt, cls))
        self.out_features, self.in_features = fmt.shape
        self.backend = resolve_backend(backend, self.format_name, fmt)
        self._format_cls = type(fmt)
        self._static = {f.name: getattr(fmt, f.name) for f in fields(fmt)
                        if not isinstance(getattr(fmt, f.name), torch.Tensor)}
        self._tensor_fields = [f.name for f in fields(fmt) if isinstance(getattr(fmt, f.name), torch.Tensor)]
        for name in self._tensor_fields:
            self.register_buffer(name, getattr(fmt, name))
        # Bound once here so forward only gathers buffers and calls the op.
        self._op_name, self._op_fields, self._op_takes_n = _OPS[self.format_name]
        if self.backend in ("triton", "cuda") and self.format_name != "dense":  # dense: cuBLAS/MKL
            self._op_name += f"_{self.backend}"
        if self._op_name in ("csr_linear_triton", "csr_linear_cuda"):
            # The GPU CSR kernels' row schedule, once here instead of an argsort per call; not
            # persistent: state_dict holds the format only, and load rebuilds it.
            self.register_buffer("row_order", fmt.row_order(), persistent=False)
            self._op_fields = (*self._op_fields, "row_order")
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @property
    def weight_format(self) -> F._Format:
        return self._format_cls(**{n: getattr(self, n) for n in self._tensor_fields}, **self._static)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (masked) weight, rebuilt on demand — for inspection, not for speed."""
        return self.weight_format.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        lead = x.shape[:-1]
        op = getattr(torch.ops.sparse_prune, self._op_name)
        args = [getattr(self, name) for name in self._op_fields]
        if self._op_takes_n:
            args.append(self.out_features)
        y = op(x.reshape(-1, self.in_features), *args, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        fmt = self.weight_format
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format_name}, density={fmt.density:.3f}, backend={self.backend}")


def _triton_block_reason(block: tuple[int, ...]) -> str | None:
    from sparse_prune.kernels.triton_common import BSR_BLOCK_SIDES

    if any(side not in BSR_BLOCK_SIDES for side in block):
        return f"block {block} (each side must be one of {BSR_BLOCK_SIDES})"
    return None


def _triton_fits(format_name: str, fmt: F._Format | None) -> str | None:
    """Why the Triton kernel cannot take this weight, or None."""
    if format_name == "bsr" and fmt is not None:
        return _triton_block_reason(tuple(fmt.block))
    return None


def _cuda_fits(format_name: str, fmt: F._Format | None) -> str | None:
    """Why the csrc/ kernel cannot take this weight, or None."""
    from sparse_prune import ops

    if not ops.has_cuda_extension():
        return f"the CUDA extension is not loaded ({ops.extension_error()})"
    if format_name == "dense":
        return None
    if format_name not in CUDA_FORMATS:
        return f"no CUDA kernel for format {format_name!r} (kernels: {', '.join(CUDA_FORMATS)}; try 'triton')"
    if format_name == "2:4" and fmt is not None:
        if fmt.shape[1] % 16:
            return f"in_features = {fmt.shape[1]} is not a multiple of 16 (one mma.sp K step)"
        if fmt.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {fmt.dtype}: sparse tensor cores take float16/bfloat16"
    return None


def resolve_backend(backend: str, format_name: str, fmt: F._Format | None = None) -> str:
    """The backend a layer runs on. ``auto``: for CUDA weights, cuda where our csrc/ kernel fits,
    else triton where it fits, else torch; torch on the CPU.

    ``ValueError`` for an unknown backend, or ``triton``/``cuda`` where it cannot run or fit.
    """
    from sparse_prune.kernels import triton_common

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        on_cuda = fmt is not None and fmt.device.type == "cuda"
        if on_cuda and format_name != "dense" and _cuda_fits(format_name, fmt) is None:
            backend = "cuda"
        elif on_cuda and _triton_fits(format_name, fmt) is None and triton_common.available():
            backend = "triton"
        else:
            backend = "torch"
    if backend == "cuda":
        reason = _cuda_fits(format_name, fmt)
        if reason is not None:
            raise ValueError(f"backend 'cuda' cannot run format {format_name!r}: {reason}")
    if backend == "triton":
        reason = triton_common.unavailable_reason() or _triton_fits(format_name, fmt)
        if reason is not None:
            raise ValueError(f"backend 'triton' cannot run format {format_name!r} here: {reason}")
        import sparse_prune.kernels.triton_ops  # noqa: F401  (registers the *_triton ops)
    return backend


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def convert(model: nn.Module, masks: MaskSet, format: str = "csr", backend: str = "auto",
            inplace: bool = False, example_inputs: Any = None, cache: str | None = None,
            **format_kw: Any) -> nn.Module:
    """Swap every masked ``nn.Linear`` for a :class:`SparseLinear` holding ``format``.

    Formats: ``CONVERT_FORMATS`` ("dense" = masked dense baseline, "shrink", "2:4", "csr",
    "bsr" with ``block=(bm, bk)``). ``format_kw`` go to the format's ``from_dense``.
    Weights a format cannot take (not 2:4, not structured, not a Linear) keep their module
    with the mask applied, and one warning lists them. The result computes the same function
    as ``masks.apply(copy.deepcopy(model))``: where ``masks.weights`` holds reconstructed
    weights (``sparsegpt``), those are compiled instead of the model's originals.

    ``format="shrink"`` is dependency-aware unless ``coupled=False``: MLP neurons whose fc2
    column and attention heads whose output-projection columns are fully pruned are removed
    from every layer of their group (see :mod:`sparse_prune.shrink`; the attention modules'
    head counts follow); whatever mask is left on a cut layer goes through the generic
    gather/scatter ``Shrunk`` format. ``round_to`` applies to both.

    ``format="auto"`` times, per layer on ``example_inputs`` (required), every format and
    backend that fits its mask against the masked dense layer and keeps the fastest, dense
    included (:mod:`sparse_prune.auto`; ``cache=`` a JSON path to reuse decisions); ``report()``
    shows each choice and its measured ratio. ``backend`` limits the candidates when not "auto".
    """
    if format != "auto" and format not in CONVERT_FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: auto, {', '.join(CONVERT_FORMATS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a sparse_prune.MaskSet, got {type(masks).__name__}")
    masks.validate(model)
    if format == "auto":
        return _convert_auto(model, masks, backend, inplace, example_inputs, cache)
    # Fail before any work, not layer by layer: the per-layer checks without a weight.
    if backend in ("triton", "cuda"):
        resolve_backend(backend, format)
    if backend == "triton" and format == "bsr":
        reason = _triton_block_reason(tuple(format_kw.get("block", (32, 32))))
        if reason:
            raise ValueError(f"backend 'triton' cannot run format 'bsr' with {reason}")
    model = model if inplace else copy.deepcopy(model)
    if masks.weights:  # sparsegpt: compile its reconstructed weights, not the model's
        masks.apply(model)
    cls = F.FORMATS[format]
    left_dense: list[str] = []
    todo: dict[str, torch.Tensor] = dict(masks.items())
    open_mha_out_proj(model, todo)  # torchvision: lets MHA out_proj become a SparseLinear
    coupled = format_kw.pop("coupled", True) if format == "shrink" else False
    if coupled:
        # Whole neurons/heads first: smaller plain GEMMs, no gather/scatter (sparse_prune.shrink).
        todo, _, skipped = shrink_groups(model, todo, format_kw.get("round_to", 1))
        left_dense += [f"{s}: heads/neurons not removed" for s in skipped]
        todo = {name: m for name, m in todo.items() if not bool(m.all())}
    with torch.no_grad():
        for name, mask in todo.items():
            module_name, module, param = resolve_param(model, name)
            weight = getattr(module, param)
            mask = mask.to(weight.device)
            if type(module) is nn.Linear and param == "weight":
                try:
                    fmt = cls.from_dense(weight.detach(), mask, **format_kw)
                except ValueError as exc:
                    left_dense.append(f"{name} ({exc})")
                else:
                    parent, child = _parent(model, module_name)
                    setattr(parent, child, SparseLinear(fmt, module.bias, backend))
                    continue
            else:
                left_dense.append(f"{name} (not an nn.Linear weight)")
            weight.mul_(mask.to(weight.dtype))
    if left_dense:
        warnings.warn(f"format {format!r} left {len(left_dense)} masked weight(s) dense: " + "; ".join(left_dense),
                      stacklevel=2)
    return model


def _convert_auto(model: nn.Module, masks: MaskSet, backend: str, inplace: bool, example_inputs: Any,
                  cache: str | None) -> nn.Module:
    from sparse_prune.auto import AUTO_ATTR, choose

    decisions = choose(model, masks, example_inputs, None if backend == "auto" else [backend], cache)
    model = model if inplace else copy.deepcopy(model)
    if masks.weights:  # sparsegpt: compile its reconstructed weights, not the model's
        masks.apply(model)
    with torch.no_grad():
        for name, mask in masks.items():
            module_name, module, param = resolve_param(model, name)
            weight = getattr(module, param)
            mask = mask.to(weight.device)
            choice = decisions.get(name)
            if choice is None or choice["format"] == "dense":
                weight.mul_(mask.to(weight.dtype))
                if choice is not None:
                    setattr(module, AUTO_ATTR, choice)
                continue
            kw = {k: tuple(v) for k, v in choice["kw"].items()}
            fmt = F.FORMATS[choice["format"]].from_dense(weight.detach(), mask, **kw)
            layer = SparseLinear(fmt, module.bias, choice["backend"])
            setattr(layer, AUTO_ATTR, choice)
            parent, child = _parent(model, module_name)
            setattr(parent, child, layer)
    return model


def _flops_per_row(fmt: F._Format) -> int:
    """Multiply-adds ×2 that the format's kernel performs per input row."""
    n, k = fmt.shape
    if isinstance(fmt, F.CSR):
        return 2 * fmt.nnz
    if isinstance(fmt, F.BSR):
        return 2 * fmt.values.numel()
    if isinstance(fmt, F.SemiStructured):
        return n * k
    if isinstance(fmt, F.Shrunk):
        return 2 * fmt.values.numel()
    return 2 * n * k


def _auto_fields(row: dict[str, Any], module: nn.Module) -> None:
    """Rows of layers placed by format='auto' say so, with the measured dense/chosen ratio."""
    choice = getattr(module, "sparse_prune_auto", None)
    if choice is not None:
        row["format"] = f"auto:{row['format'] if choice['format'] != 'dense' else 'dense'}"
        row["auto_speedup"] = choice["ratio"]


def report(model: nn.Module) -> list[dict[str, Any]]:
    """One row per Linear-like module: name, format, backend, shape, density, bytes,
    dense_bytes, flops (per input row); layers placed by ``format="auto"`` show ``auto:<choice>``
    and ``auto_speedup`` (measured dense ms / chosen ms). ``format_report(rows)`` prints them."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            fmt = module.weight_format
            elem = fmt.values.element_size()
            rows.append({"name": name, "format": module.format_name, "backend": module.backend,
                         "shape": list(fmt.shape), "density": fmt.density, "bytes": fmt.nbytes,
                         "dense_bytes": fmt.shape[0] * fmt.shape[1] * elem, "flops": _flops_per_row(fmt)})
            _auto_fields(rows[-1], module)
        elif isinstance(module, nn.Linear):
            w = module.weight
            # a Linear cut by dependency-aware shrinking remembers its shape before the cut
            n, k = getattr(module, DENSE_SHAPE_ATTR, w.shape)
            cut = (n, k) != tuple(w.shape)
            rows.append({"name": name, "format": "shrink (cut)" if cut else "nn.Linear", "backend": "torch",
                         "shape": [n, k], "density": float((w != 0).sum()) / (n * k) if n * k else 1.0,
                         "bytes": w.numel() * w.element_size(), "dense_bytes": n * k * w.element_size(),
                         "flops": 2 * w.numel()})
            _auto_fields(rows[-1], module)
    return rows


def format_report(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`report` rows with totals."""
    auto = any("auto_speedup" in r for r in rows)
    head = ("name", "format", "backend", "shape", "density", "bytes", "dense_bytes", "flops") + (
        ("auto_speedup",) if auto else ())
    cells = [[str(r["name"]), r["format"], r["backend"], "x".join(map(str, r["shape"])), f"{r['density']:.3f}",
              str(r["bytes"]), str(r["dense_bytes"]), str(r["flops"])]
             + ([f"{r['auto_speedup']:.2f}x" if "auto_speedup" in r else ""] if auto else []) for r in rows]
    cells.append(["total", "", "", "", "", str(sum(r["bytes"] for r in rows)),
                  str(sum(r["dense_bytes"] for r in rows)), str(sum(r["flops"] for r in rows))] + ([""] if auto else []))
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
