"""``convert()``: masks → a model whose masked Linears hold compact formats, in two steps.

1. :func:`plan` decides, per masked weight, the format, the backend and why (a fixed format,
   or ``format="auto"``'s measured choice), building each format from the weight. It does not
   touch the model.
2. :func:`apply_plan` swaps the planned layers for :class:`~sparse_prune.nn.SparseLinear` and
   zeroes the pruned weights of the layers kept dense, recording each decision on its module
   (:data:`PLAN_ATTR`), which :func:`sparse_prune.report.report` and the bench rows show.

``format="shrink"`` first cuts whole MLP neurons and attention heads out of the model
(:mod:`sparse_prune.shrink`); that is structure, done before planning what is left.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparse_prune import backends, hf
from sparse_prune import formats as F
from sparse_prune.constants import BACKENDS
from sparse_prune.masks import MaskSet
from sparse_prune.nn import SparseLinear, SparseMLP
from sparse_prune.shrink import open_mha_out_proj, shrink_groups
from sparse_prune.structure import gelu_sites, mlp_sites, resolve_param

CONVERT_FORMATS = tuple(F.FORMATS)
PLAN_ATTR = "sparse_prune_plan"  # the LayerPlan's summary, kept on the module for report()


@dataclass
class LayerPlan:
    """One masked weight's fate: ``fmt`` is the built format, or ``None`` when the layer stays
    a masked dense module (``reason`` says why). ``backend`` is what runs on the weight's device
    now; ``requested`` what the layer is built with (the user's ``backend``, or auto's measured
    choice), so it resolves again when the model is moved."""

    param: str
    module: str
    format: str
    backend: str
    reason: str
    fmt: F.WeightFormat | None = None
    kw: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None  # format="auto": measured dense ms / chosen ms
    requested: str = "auto"

    def summary(self) -> dict[str, Any]:
        out = {"format": self.format, "backend": self.backend, "reason": self.reason}
        if self.ratio is not None:
            out["ratio"] = self.ratio
        return out


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def check_convert_args(masks: Any, format: str, backend: str) -> None:
    """``ValueError``/``TypeError`` for an unknown format or backend, or masks not a MaskSet."""
    if format != "auto" and format not in CONVERT_FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: auto, {', '.join(CONVERT_FORMATS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a sparse_prune.MaskSet, got {type(masks).__name__}")


def _check_format_kw(format: str, format_kw: dict[str, Any]) -> None:
    """A bad format argument (``block=(0, 4)``, ``round_to=0``, ``index_dtype=torch.int8``, an
    unknown keyword) is the caller's error, raised here — not a per-layer "the mask does not fit"
    that would leave every layer dense with only a warning."""
    if format not in F.FORMATS:
        return
    # `coupled` (shrink) is convert's own keyword, not the format's
    kw = {k: v for k, v in format_kw.items() if not (format == "shrink" and k == "coupled")}
    try:
        F.FORMATS[format].from_dense(torch.zeros(4, 16), torch.zeros(4, 16, dtype=torch.bool), **kw)
    except TypeError as exc:
        raise TypeError(f"format {format!r} does not take {sorted(format_kw)}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"format {format!r}: {exc}") from None


def _precheck(format: str, backend: str, format_kw: dict[str, Any], device: torch.device) -> None:
    """Fail before any work, not layer by layer: the per-layer checks without a weight."""
    _check_format_kw(format, format_kw)
    if backend in ("triton", "cuda") and format != "dense":
        why = backends.reason(format, backend, None, device)
        if why is None and backend == "triton":
            why = backends.triton_reason(format, block=tuple(format_kw.get("block", ())) or None)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot run format {format!r} here: {why}")


def plan(model: nn.Module, masks: dict[str, torch.Tensor], format: str, backend: str = "auto",
         **format_kw: Any) -> list[LayerPlan]:
    """Per masked weight of ``model``: the fixed ``format`` built from its weight, or the
    reason it stays dense (not an ``nn.Linear`` weight, a mask the format cannot take, a
    backend that cannot run it). The model is not modified."""
    layers = []
    cls = F.FORMATS[format]
    for name, mask in masks.items():
        module_name, module, param = resolve_param(model, name)
        if type(module) is not nn.Linear or param != "weight":
            layers.append(LayerPlan(name, module_name, "dense", "torch", "not an nn.Linear weight"))
            continue
        weight = module.weight.detach()
        try:
            fmt = cls.from_dense(weight, mask.to(weight.device), **format_kw)
        except ValueError as exc:  # the mask does not fit the format: documented, warned
            layers.append(LayerPlan(name, module_name, "dense", "torch", str(exc)))
            continue
        # a backend the user asked for that cannot take this weight is an error, never a fallback
        resolved = backends.resolve_backend(backend, format, fmt)
        why = "requested" if backend != "auto" else "auto: our best kernel for the device"
        layers.append(LayerPlan(name, module_name, format, resolved, why, fmt, dict(format_kw), requested=backend))
    return layers


def convert_auto(model: nn.Module, masks: MaskSet, backend: str, example_inputs: Any, cache: str | None,
                 fuse_activations: bool) -> nn.Module:
    """``format="auto"`` on ``model`` (converted in place: the caller's copy, or the user's model
    with ``inplace=True``): every layer's candidates timed (:func:`sparse_prune.auto.choose`),
    then the whole-model plans built from those rounds (:func:`sparse_prune.auto.model_plans`)
    timed end to end on ``example_inputs`` (:func:`sparse_prune.auto.choose_model`, on copies);
    the fastest plan is then built into ``model``."""
    from sparse_prune import auto

    decisions = auto.choose(model, masks, example_inputs, None if backend == "auto" else [backend], cache)
    plans = auto.model_plans(decisions)
    if len(plans) == 1:  # every layer stays dense: nothing to time
        return _build_auto(model, masks, plans["dense"], fuse_activations, "")  # dense first in plans
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    best, record = auto.choose_model(
        plans, lambda label: _build_auto(copy.deepcopy(model), masks, plans[label], fuse_activations, label),
        decisions, example_inputs, device, cache, variant=f"fuse_activations={fuse_activations}")
    _build_auto(model, masks, plans[best], fuse_activations, best)
    note = (f"; whole model: {best} plan, {record['ratio']:.2f}x dense measured end to end (per-layer plan "
            f"{record['ms']['dense'] / record['ms'].get('per-layer', record['ms']['dense']):.2f}x)")
    for module in model.modules():
        summary = module.__dict__.get(PLAN_ATTR)
        if summary is not None:
            summary["reason"] += note
    return model


def _build_auto(model: nn.Module, masks: MaskSet, decisions: dict[str, dict[str, Any]], fuse_activations: bool,
                label: str) -> nn.Module:
    apply_plan(model, dict(masks.items()), plan_auto(model, masks, decisions, label))
    if fuse_activations:
        fuse_gelu(model)
        fuse_mlp(model)
    return model


def plan_auto(model: nn.Module, masks: MaskSet, decisions: dict[str, dict[str, Any]], label: str = ""
              ) -> list[LayerPlan]:
    """The plan of ``format="auto"``'s ``decisions`` (per layer: a measured candidate or dense)."""
    layers = []
    for name, mask in masks.items():
        module_name, module, param = resolve_param(model, name)
        choice = decisions.get(name)
        if choice is None:
            why = "not an nn.Linear weight" if type(module) is not nn.Linear else "no input recorded"
            layers.append(LayerPlan(name, module_name, "dense", "torch", why))
            continue
        kw = {k: tuple(v) for k, v in choice["kw"].items()}
        reason = (f"auto: fastest measured ({choice['ratio']:.2f}x dense)" if label in ("", "per-layer") else
                  f"auto: {label} plan ({choice['ratio']:.2f}x dense alone)")
        if choice["format"] == "dense":
            layers.append(LayerPlan(name, module_name, "dense", "torch", reason, ratio=choice["ratio"]))
            continue
        weight = module.weight.detach()
        fmt = F.FORMATS[choice["format"]].from_dense(weight, mask.to(weight.device), **kw)
        layers.append(LayerPlan(name, module_name, choice["format"], choice["backend"], reason, fmt, kw,
                                choice["ratio"], requested=choice["backend"]))
    return layers


def apply_plan(model: nn.Module, masks: dict[str, torch.Tensor], layers: list[LayerPlan]) -> list[str]:
    """Carry out ``layers`` on ``model`` in place; return the "param (reason)" of every masked
    weight left dense. Each module gets its plan summary as ``PLAN_ATTR``."""
    left_dense = []
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for layer in layers:
            module = model.get_submodule(layer.module)
            if layer.fmt is None:
                weight = module.get_parameter(layer.param.rpartition(".")[2])
                weight.mul_(masks[layer.param].to(device=weight.device, dtype=weight.dtype))
                if not layer.reason.startswith("auto:"):
                    left_dense.append(f"{layer.param} ({layer.reason})")
                target = module
            else:
                target = SparseLinear(layer.fmt, module.bias, layer.requested, validate=False)
                target.train(module.training)  # an eval model stays in eval mode
                parent, child = parent_of(model, layer.module)
                setattr(parent, child, target)
            target.__dict__[PLAN_ATTR] = layer.summary()
    for message in dict.fromkeys(str(w.message) for w in seen):  # once per model, not per layer
        warnings.warn(message, stacklevel=3)
    return left_dense


def fuse_gelu(model: nn.Module) -> list[str]:
    """Move every exact GELU that directly follows a :class:`SparseLinear` into it
    (``activation="gelu"``) and put ``nn.Identity`` in its place
    (:func:`sparse_prune.structure.gelu_sites`: transformers, timm and torchvision ViT MLPs).
    Returns the names of the replaced activation modules. The function is unchanged."""
    fused = []
    for site in gelu_sites(model):
        linear = model.get_submodule(site.linear)
        if isinstance(linear, SparseLinear) and linear.activation is None:
            linear.set_activation("gelu")
            setattr(model.get_submodule(site.parent), site.attr, nn.Identity())
            fused.append(f"{site.parent}.{site.attr}" if site.parent else site.attr)
    return fused


def fuse_mlp(model: nn.Module) -> list[str]:
    """Put a :class:`~sparse_prune.nn.SparseMLP` in place of every ViT MLP module
    (:func:`sparse_prune.structure.mlp_sites`) whose fc1 is a SparseLinear with the fused GELU
    (:func:`fuse_gelu` ran: its activation is Identity) and whose fc2 is a SparseLinear without
    one. Returns the names of the replaced modules. The function is unchanged."""
    fused = []
    for site in mlp_sites(model):
        parent = model.get_submodule(site.parent) if site.parent else model
        fc1, act, fc2 = (parent._modules.get(a) for a in (site.fc1, site.act, site.fc2))
        if (isinstance(fc1, SparseLinear) and isinstance(fc2, SparseLinear) and isinstance(act, nn.Identity)
                and fc1.activation == "gelu" and fc2.activation is None and fc1.out_features == fc2.in_features):
            fused_module = SparseMLP(fc1, fc2, names=(site.fc1, site.fc2)).train(parent.training)
            if site.parent:
                grand, child = parent_of(model, site.parent)
                setattr(grand, child, fused_module)
                fused.append(site.parent)
    return fused


DEFAULT_FORMAT_WARNING = (
    "convert() without format= or example_inputs= keeps every masked layer dense (the masked dense "
    "model: never slower than dense, never faster); pass example_inputs= (a batch like the ones you "
    "will run) to let format='auto' measure per layer which format pays, or name one "
    "('csr', 'bsr', '2:4', 'shrink')")


def convert(model: nn.Module, masks: MaskSet, format: str | None = None, backend: str = "auto",
            inplace: bool = False, example_inputs: Any = None, cache: str | None = None,
            fuse_activations: bool = True, **format_kw: Any) -> nn.Module:
    """Swap every masked ``nn.Linear`` for a :class:`SparseLinear` holding ``format``.

    Formats: ``CONVERT_FORMATS`` ("dense" = masked dense baseline, "shrink", "2:4", "csr",
    "bsr" with ``block=(bm, bk)``) or "auto". ``format_kw`` go to the format's ``from_dense``.
    No ``format`` (the default) runs what never loses against dense: ``"auto"`` when
    ``example_inputs`` is given (each layer measured, dense included), else ``"dense"`` with one
    warning (:data:`DEFAULT_FORMAT_WARNING`) saying how to get speed. A fixed format can be slower
    than dense where it does not pay (csr at 50% on a CPU, for one), so none is the default.
    Weights a format cannot take (not 2:4, not structured, not a Linear) keep their module
    with the mask applied, and one warning lists them. The result computes the same function
    as ``masks.apply(copy.deepcopy(model))``; weights reconstructed by the pruner
    (``masks.weights``, e.g. SparseGPT) are used instead of the model's.

    ``backend``: "auto" (our best kernel for the weight's device; never a per-call dense
    rebuild on a GPU: where no kernel fits, the masked weight is materialized once for cuBLAS),
    "torch" (the reference; on CUDA it rebuilds the weight per call, and warns once), "triton",
    "cuda" (``ValueError`` up front where they cannot run). Layers re-resolve their backend
    when moved with ``.to()``.

    ``format="shrink"`` is dependency-aware unless ``coupled=False``: MLP neurons whose fc2
    column and attention heads whose output-projection columns are fully pruned are removed
    from every layer of their group (see :mod:`sparse_prune.shrink`; the attention modules'
    head counts follow); whatever mask is left on a cut layer goes through the generic
    gather/scatter ``Shrunk`` format. ``round_to`` applies to both.

    ``format="auto"`` times, per layer on ``example_inputs`` (required), every format and
    backend that fits its mask against the masked dense layer; then it builds whole-model plans
    from those rounds (the per-layer fastest; per format, where it won and everywhere it fits;
    all dense), times their forwards on ``example_inputs`` and keeps the fastest, a sparse plan
    only when it beats dense by 1.05x twice (:mod:`sparse_prune.auto`; ``cache=`` a JSON path to
    reuse decisions; while timing, one model copy per plan is held); ``report()`` shows each
    layer's choice, its measured ratio and the plan. ``backend`` limits the candidates when not "auto".

    ``fuse_activations`` (default on): where a ViT MLP's first Linear became a SparseLinear and
    feeds an exact GELU, the GELU moves into the layer (:func:`fuse_gelu`): one kernel where the
    backend's epilogue fuses it, the same numbers either way; where both of its Linears became
    SparseLinears, the MLP module becomes a :class:`~sparse_prune.nn.SparseMLP` (:func:`fuse_mlp`:
    one op on our CPU kernels, the hidden layer never transposed).

    A model pruned with ``torch.nn.utils.prune`` (or :meth:`MaskSet.attach`) converts as it is,
    no ``prune.remove`` needed: ``sp.convert(model, sp.MaskSet.from_model(model))``. The copy
    (or ``model`` itself with ``inplace=True``) has its torch-prune masks made permanent first
    (:func:`remove_torch_prune`), so the result computes what the pruned model computed.

    The result is for inference: a :class:`SparseLinear` has no gradient (see there for how to
    finetune). A transformers model's ``save_pretrained`` then writes config.json plus an
    ``sp.save`` checkpoint that ``sp.from_pretrained`` reads back (:mod:`sparse_prune.hf`;
    transformers' own ``from_pretrained`` refuses that folder instead of loading it wrong).
    """
    if format is None:
        format = "auto" if example_inputs is not None else "dense"
        if format == "dense":
            warnings.warn(DEFAULT_FORMAT_WARNING, stacklevel=2)
    check_convert_args(masks, format, backend)
    for flag, value in (("inplace", inplace), ("fuse_activations", fuse_activations)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    masks.validate(model)
    _check_weights(model, masks)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if format != "auto":
        _precheck(format, backend, format_kw, device)
    model = model if inplace else copy_model(model)
    remove_torch_prune(model)
    _use_reconstructed(model, masks)
    if format == "auto":
        return hf.guard(convert_auto(model, masks, backend, example_inputs, cache, fuse_activations))
    todo: dict[str, torch.Tensor] = dict(masks.items())
    open_mha_out_proj(model, todo)  # torchvision: lets MHA out_proj become a SparseLinear
    left_dense: list[str] = []
    coupled = format_kw.pop("coupled", True) if format == "shrink" else False
    if coupled:
        # Whole neurons/heads first: smaller plain GEMMs, no gather/scatter (sparse_prune.shrink).
        todo, _, skipped = shrink_groups(model, todo, format_kw.get("round_to", 1))
        left_dense += [f"{s}: heads/neurons not removed" for s in skipped]
        todo = {name: m for name, m in todo.items() if not bool(m.all())}
    left_dense += apply_plan(model, todo, plan(model, todo, format, backend, **format_kw))
    if fuse_activations:
        fuse_gelu(model)
        fuse_mlp(model)
    if left_dense:
        warnings.warn(f"format {format!r} left {len(left_dense)} masked weight(s) dense: " + "; ".join(left_dense),
                      stacklevel=2)
    return hf.guard(model)


def _torch_pruned(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, tensor name)`` of every mask attached by ``torch.nn.utils.prune`` (or
    :meth:`MaskSet.attach`), in module order."""
    return [(module, hook._tensor_name) for module in model.modules()
            for hook in list(module._forward_pre_hooks.values())
            if isinstance(hook, torch_prune.BasePruningMethod)]


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for a model pruned with ``torch.nn.utils.prune``.

    Such a module's ``weight`` is a plain attribute computed as ``weight_orig * weight_mask``,
    a non-leaf tensor that ``deepcopy`` refuses; it is detached for the copy (the copy's hook
    recomputes it at the next forward) and put back on ``model`` afterwards."""
    saved = [(module, name, module.__dict__[name]) for module, name in _torch_pruned(model)
             if isinstance(module.__dict__.get(name), torch.Tensor)]
    try:
        for module, name, value in saved:
            module.__dict__[name] = value.detach()
        return copy.deepcopy(model)
    finally:
        for module, name, value in saved:
            module.__dict__[name] = value


def remove_torch_prune(model: nn.Module) -> list[str]:
    """Make every ``torch.nn.utils.prune`` mask of ``model`` permanent (``prune.remove``: the
    parameter becomes ``weight_orig * weight_mask``, hooks and buffers go), in place; returns
    the parameter names. ``convert`` does this on its copy: the converted model computes what
    the pruned model computed, and its masks are read by ``MaskSet.from_model``."""
    names = {id(m): n for n, m in model.named_modules()}
    done = []
    for module, name in _torch_pruned(model):
        torch_prune.remove(module, name)
        done.append(f"{names[id(module)]}.{name}".lstrip("."))
    return done


def _check_weights(model: nn.Module, masks: MaskSet) -> None:
    """Refuse, before any work, what no format can hold: masked weights on the meta device (no
    data) or of zero size (``Linear(0, n)``); warn when there is nothing to convert."""
    if not len(masks):
        warnings.warn("convert: masks is an empty MaskSet: nothing to convert (the model is returned as it is)",
                      stacklevel=3)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in masks:
        param = params.get(name, params.get(name + "_orig"))
        if param is not None and param.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (no data to convert): materialize the model first "
                             "(e.g. model.to_empty(device='cpu') and load its weights)")
        if param is not None and param.numel() == 0:
            raise ValueError(f"{name} has a zero-size weight {tuple(param.shape)}: no format holds it; leave it "
                             "out of the masks")


def _use_reconstructed(model: nn.Module, masks: MaskSet) -> None:
    """Write the pruner's reconstructed weights (``masks.weights``, when it has any) into
    ``model`` (already a copy unless ``inplace``), so every format compiles them. A tied
    weight (one Parameter in several modules) is zeroed in place too, so its other modules
    compute with the masked weight, as after ``masks.apply``."""
    tied = len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters()))
    if masks.weights or tied:
        masks.apply(model)  # writes the reconstructed values, pruned entries zero
