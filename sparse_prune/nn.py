"""``SparseLinear``: the drop-in ``nn.Linear`` replacement holding a compact format.

Conversion (which layer gets which format) lives in :mod:`sparse_prune.convert`, kernels and
backend resolution in :mod:`sparse_prune.backends`.
"""

from __future__ import annotations

import warnings
from dataclasses import fields

import torch
from torch import nn

from sparse_prune import backends, ops
from sparse_prune import formats as F
from sparse_prune.checks import check_2to4_meta_once

ACTIVATIONS = (None, "gelu")

INFERENCE_ONLY = (
    "SparseLinear is inference-only: its compact weight has no gradient. To finetune a pruned "
    "model, train it before converting, with the masks attached (masks.attach(model) keeps the "
    "pruned weights at zero, as torch.nn.utils.prune does), then sp.convert(model, "
    "sp.MaskSet.from_model(model)); or convert with format='shrink', whose cut layers are plain "
    "nn.Linear. Run a converted model under torch.no_grad() or torch.inference_mode()."
)


class _InferenceOnly(torch.autograd.Function):
    """Identity on the output; its backward raises :data:`INFERENCE_ONLY` (instead of autograd's
    "element 0 of tensors does not require grad", or a silently frozen layer)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(INFERENCE_ONLY)


def _checked_activation(activation: str | None) -> str | None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def _check_bias(bias: torch.Tensor | None, fmt, where: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{where} must be a tensor or None, got {type(bias).__name__}")
    if bias.dtype != fmt.dtype:
        raise ValueError(f"{where}: dtype {bias.dtype} must be the weight values' dtype {fmt.dtype}")
    if tuple(bias.shape) != (fmt.shape[0],):
        raise ValueError(f"{where}: shape {tuple(bias.shape)} must be [out_features] = ({fmt.shape[0]},)")


class SparseLinear(nn.Module):
    """``y = x · Wᵀ + b`` with ``W`` held in a compact format; a drop-in ``nn.Linear``.

    Accepts ``x [..., in_features]`` of the weight's dtype and returns ``[..., out_features]``.
    The format's arrays are buffers, so ``.to()``, ``state_dict``, ``deepcopy`` and pickling
    work; ``.to(dtype)`` converts the values (indices keep their integer types).

    ``backend`` is what was asked for (kept as :attr:`requested_backend`); :attr:`backend` is
    what runs, resolved by :func:`sparse_prune.backends.resolve_backend` for the weight's device
    now and again whenever the module is moved or cast (``.to``, ``.cuda``, ``.half``), so a
    layer built on the CPU runs our GPU kernels after ``.to("cuda")``. An explicit backend that
    cannot run on the new device raises its ``ValueError`` at the next call. Raises
    ``ValueError`` at construction for an unknown backend or one that cannot take the weight.

    ``activation="gelu"`` applies the exact (erf) GELU to the output: inside the kernel where
    its epilogue fuses it (:data:`sparse_prune.backends.FUSED_GELU`), after it otherwise, so the
    result is the same either way. ``convert`` sets it where the model's Linear feeds a GELU.

    Inference-only: no gradient flows through the compact weight (nor back to the input). Where
    autograd would record the call (grad mode on, and the module in training mode or an input
    that requires grad) the output carries a node whose backward raises ``RuntimeError`` with
    :data:`INFERENCE_ONLY`, which says how to finetune instead; the forward values are the same.
    (In eager mode; under ``torch.compile`` the node is left out, as its backward would be traced.)

    Validated at every door: the format's :meth:`~sparse_prune.formats.WeightFormat.validate`
    runs at construction (``validate=False`` only for a format just built by ``from_dense``)
    and on every ``load_state_dict`` (a load hook, strict or not, ``assign`` or not), before any
    array reaches a kernel; ``bias`` must be a 1-D ``[out_features]`` tensor of the values'
    dtype. A bad array is a ``ValueError`` naming its state-dict key, and this layer keeps its arrays.
    """

    def __init__(self, fmt: F.WeightFormat, bias: torch.Tensor | None, backend: str = "auto",
                 activation: str | None = None, *, validate: bool = True):
        super().__init__()
        self.activation = _checked_activation(activation)
        self.format_name = F.format_name(fmt)
        if validate:
            fmt.validate()
        _check_bias(bias, fmt, "bias")
        self.out_features, self.in_features = fmt.shape
        self.requested_backend = backend
        self._format_cls = type(fmt)
        self._static = {f.name: getattr(fmt, f.name) for f in fields(fmt)
                        if not isinstance(getattr(fmt, f.name), torch.Tensor)}
        self._tensor_fields = [f.name for f in fields(fmt) if isinstance(getattr(fmt, f.name), torch.Tensor)]
        for name in self._tensor_fields:
            self.register_buffer(name, getattr(fmt, name))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._bind_error: ValueError | None = None
        self._bound_key: tuple | None = None
        self._bind()

    def _bind(self) -> None:
        """Resolve the backend for the buffers' current device and prepare what its kernel
        needs once (the CSR row schedule, or the materialized weight for ``dense``); the extra
        buffers are not persistent: ``state_dict`` holds the format only."""
        fmt = self.weight_format
        if self.format_name == "2:4":  # once per meta tensor: a kernel never sees invalid metadata
            check_2to4_meta_once(fmt.meta, self.in_features)
        self.backend = backends.resolve_backend(self.requested_backend, self.format_name, fmt)
        self.kernel_name = backends.kernel_label(self.format_name, self.backend, fmt.device, fmt.dtype)
        self._kernel_key = (self.format_name, self.backend)
        self._bound_key = self._bound_to()
        self.fused_activation = self.activation is not None and self._kernel_key in backends.FUSED_GELU
        self._bind_error = None
        needs_order = self.format_name == "csr" and self.backend in ("cuda", "triton")
        self.register_buffer("row_order", fmt.row_order() if needs_order else None, persistent=False)
        self.register_buffer("dense_weight", fmt.to_dense() if self.backend == "dense" else None,
                             persistent=False)
        packed, self.cslt_alg = (backends.cusparselt_payload(fmt)
                                 if self.backend == "cusparselt" and fmt.device.type == "cuda" else (None, 0))
        self.register_buffer("cslt_packed", packed, persistent=False)
        a, e = (backends.sm90_payload(fmt) if self.backend == "cuda:sm90" and fmt.device.type == "cuda"
                else (None, None))
        self.register_buffer("sm90_a", a, persistent=False)
        self.register_buffer("sm90_e", e, persistent=False)
        if self.backend == "torch" and fmt.device.type == "cuda" and self.format_name not in ("dense", "shrink"):
            warnings.warn(backends.TORCH_ON_CUDA_WARNING, stacklevel=3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """``load_state_dict``: the incoming format arrays are validated as they come, before
        they replace the buffers — before torch casts or assigns them (an int64 index past
        int32's range is refused, not wrapped); a partial state dict (``strict=False``) with the
        arrays it keeps. A bad one is a ``ValueError`` naming the layer, the field and its
        state-dict key; the module is left as it was. The bias must be floating (with
        ``assign=True``, of the values' dtype). The layer is re-bound afterwards, so payloads
        derived from the old arrays (sm90 metadata, cuSPARSELt pack, CSR row schedule,
        materialized weight) are rebuilt."""
        for n in self._tensor_fields:
            value = state_dict.get(prefix + n)
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"load_state_dict: state dict key {prefix}{n} must be a tensor, got "
                                f"{type(value).__name__}")
        incoming = {n: state_dict.get(prefix + n, getattr(self, n)) for n in self._tensor_fields}
        changed = any(incoming[n] is not getattr(self, n) for n in self._tensor_fields)  # sp.load: built from them
        if changed:
            try:
                self._format_cls(**incoming, **self._static).validate()
            except (ValueError, TypeError, RuntimeError) as exc:
                field = str(exc).split(":")[0]
                key = f" (state dict key {prefix}{field})" if field in self._tensor_fields else ""
                raise ValueError(f"load_state_dict: {prefix.rstrip('.') or 'SparseLinear'}: invalid "
                                 f"{self.format_name} arrays: {exc}{key}") from exc
        bias = state_dict.get(prefix + "bias")
        if bias is not None and self.bias is not None:
            assign = local_metadata.get("assign_to_params_buffers", False)
            values_dtype = incoming["values"].dtype if assign else self.values.dtype
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                raise TypeError(f"load_state_dict: state dict key {prefix}bias must be a floating tensor, got "
                                f"{getattr(bias, 'dtype', type(bias).__name__)}")
            if assign and bias.dtype != values_dtype:
                raise ValueError(f"load_state_dict: state dict key {prefix}bias: dtype {bias.dtype} must be the "
                                 f"weight values' dtype {values_dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if changed:
            self._rebind()  # payloads from the loaded arrays

    def _bound_to(self) -> tuple:
        return (self.values.device, self.values.dtype, self.requested_backend)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._bound_to() == self._bound_key and self._bind_error is None:
            return self  # same device and dtype: keep the prepared payloads (no recompression)
        self._rebind()
        return self

    def _rebind(self) -> None:
        try:
            self._bind()
        except ValueError as exc:  # e.g. backend="cuda" moved to the CPU: say so at the next call
            self._bind_error = exc
            self._bound_key = None

    @property
    def weight_format(self) -> F.WeightFormat:
        return self._format_cls(**{n: getattr(self, n) for n in self._tensor_fields}, **self._static)

    @property
    def format_fields(self) -> list[str]:
        """Names of the format's arrays (this module's persistent buffers)."""
        return list(self._tensor_fields)

    @property
    def format_static(self) -> dict:
        """The format's non-tensor fields (shape, block, ...)."""
        return dict(self._static)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (masked) weight, rebuilt on demand — for inspection, not for speed."""
        return self.weight_format.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bind_error is not None:
            raise self._bind_error
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={self.in_features}")
        lead = x.shape[:-1]
        # eager only: torch.compile traces the backward ahead of time, and would hit the raise
        track = (torch.is_grad_enabled() and (self.training or x.requires_grad)
                 and not torch.compiler.is_compiling())
        if track:
            anchor = x if x.requires_grad else torch.zeros((), device=x.device, requires_grad=True)
            x = x.detach()
        y = backends.KERNELS[self._kernel_key](x.reshape(-1, self.in_features), self)
        if self.activation == "gelu" and not self.fused_activation:
            y = torch.nn.functional.gelu(y)
        y = y.reshape(*lead, self.out_features)
        return _InferenceOnly.apply(y, anchor) if track else y

    def set_activation(self, activation: str | None) -> None:
        """Apply ``activation`` (see the class docstring) from now on."""
        self.activation = _checked_activation(activation)
        self.fused_activation = activation is not None and self._kernel_key in backends.FUSED_GELU

    def extra_repr(self) -> str:
        fmt = self.weight_format
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format_name}, density={fmt.density:.3f}, backend={self.backend}"
                + (f", activation={self.activation}" if self.activation else ""))


# The arrays of each format that sparse_mlp takes, in its order.
_MLP_ARRAYS = {"csr": ("values", "crow_indices", "col_indices"), "bsr": ("values", "crow_indices", "col_indices"),
               "2:4": ("values", "meta")}


class SparseMLP(nn.Module):
    """``fc2(GELU(fc1(x)))`` of two :class:`SparseLinear` (``fc1`` with ``activation="gelu"``),
    as one op where our CPU kernels run both layers: ``sparse_prune::sparse_mlp`` keeps the
    hidden layer in the kernels' transposed panel layout, so it is never transposed out of fc1
    nor packed back into fc2. Elsewhere (other formats or backends, a GPU) it runs
    ``fc2(fc1(x))``; the numbers are the same either way.

    ``convert`` puts it in place of a ViT MLP module (:func:`sparse_prune.structure.mlp_sites`)
    whose two Linears it converted; the layers keep their names (``names``), so ``state_dict``
    keys, ``report()`` and ``sp.save`` see the same SparseLinears as without it. Accepts
    ``x [..., fc1.in_features]``, returns ``[..., fc2.out_features]``; ``ValueError`` for
    mismatched layers.
    """

    def __init__(self, fc1: SparseLinear, fc2: SparseLinear, names: tuple[str, str] = ("fc1", "fc2")):
        super().__init__()
        if not isinstance(fc1, SparseLinear) or not isinstance(fc2, SparseLinear):
            raise TypeError(f"fc1 and fc2 must be SparseLinear, got {type(fc1).__name__} and {type(fc2).__name__}")
        if fc1.activation != "gelu" or fc2.activation is not None:
            raise ValueError(f"SparseMLP takes fc1 with activation='gelu' and fc2 with none, got "
                             f"{fc1.activation!r} and {fc2.activation!r}")
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"fc1.out_features ({fc1.out_features}) must equal fc2.in_features ({fc2.in_features})")
        self.names = tuple(names)
        self.add_module(self.names[0], fc1)
        self.add_module(self.names[1], fc2)

    def layers(self) -> tuple[SparseLinear, SparseLinear]:
        """``(fc1, fc2)``, whatever their names."""
        return self._modules[self.names[0]], self._modules[self.names[1]]

    def fused(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` runs the one fused CPU op (else ``fc2(fc1(x))``)."""
        return x.device.type == "cpu" and all(
            m.backend == "torch" and m.format_name in _MLP_ARRAYS and m._bind_error is None
            and backends.cpu_kernel_runs(m.format_name, m.values.device) for m in self.layers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.layers()
        if not self.fused(x) or (torch.is_grad_enabled() and x.requires_grad):
            return fc2(fc1(x))  # (with autograd: whatever SparseLinear does with a gradient)
        if x.shape[-1] != fc1.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected in_features={fc1.in_features}")
        lead = x.shape[:-1]
        y = torch.ops.sparse_prune.sparse_mlp(
            x.reshape(-1, fc1.in_features), fc1.format_name, [getattr(fc1, n) for n in _MLP_ARRAYS[fc1.format_name]],
            fc1.bias, fc1.out_features, fc2.format_name, [getattr(fc2, n) for n in _MLP_ARRAYS[fc2.format_name]],
            fc2.bias, fc2.out_features, True)
        return y.reshape(*lead, fc2.out_features)

    def extra_repr(self) -> str:
        return "fused: fc2(gelu(fc1(x))) in one op on the CPU kernels"


assert set(_MLP_ARRAYS) == set(ops.MLP_FORMATS)
