"""``convert(..., format="auto")``: per layer, the fastest of the formats that fit, dense included.

Each masked Linear's input is recorded on ``example_inputs`` (one forward of the masked dense
model); every candidate (format × backend) that can take the layer's mask is built, checked
against the masked dense layer with the shared rule (:mod:`sparse_prune.agreement`: float64
reference, at most 2× the same-dtype dense error), and timed against it on that input
(:mod:`sparse_prune.timing`, rotating interleaved rounds). Candidates are only kernels that do
not rebuild the weight per call (:func:`sparse_prune.backends.candidates`): on a GPU the
reference path is never timed, dense cuBLAS is the baseline to beat. A layer where no sparse
candidate beats dense by :data:`SPARSE_MARGIN` — first in the rounds with every candidate, then
again in fresh rounds of the winner against dense alone — stays a masked ``nn.Linear``, so
noise on shared cores never buys a slower layer. Decisions are cached in an optional JSON
file by (device name, torch/Triton/CUDA versions, our version and the fingerprints of the
kernel libraries loaded, dtype, rows, shape, density, fitting candidates), so a second
conversion skips the timing — and another GPU, library or kernel build re-measures.
A cache entry that is not one this run could have chosen (edited by hand, written by another
version, a format or backend that no longer fits the mask) is measured again, never trusted;
an unreadable cache file counts as empty. The cache is written crash-safely.

Then the whole model (:func:`model_plans`, :func:`choose_model`): the per-layer plan, two plans
per sparse format timed on some layer (that format where it beat dense alone, dense elsewhere;
and that format on every layer it was timed on) and the masked dense model are built (GELU and MLP fusion included) and their forwards on
``example_inputs`` timed in rotating rounds; a sparse plan is kept only when it beats dense by
:data:`MODEL_MARGIN`, twice. Per-layer rounds time a layer alone, its weight hot in cache, and
cannot see the fused MLP op; the forward of the whole model can.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparse_prune import atomic, backends, ops
from sparse_prune import formats as F
from sparse_prune.agreement import Mismatch, check_matches, nonfinite_reach, reference_dtype
from sparse_prune.calibration import call_model, run_batch
from sparse_prune.masks import MaskSet
from sparse_prune.nn import SparseLinear
from sparse_prune.timing import describe_device, time_interleaved

SPARSE_FORMATS = ("2:4", "csr", "bsr", "shrink")
# BSR blocks tried per device type: Triton's tl.dot needs sides >= 16 on a GPU; our CPU kernels
# take any block, and 4x1/8x1 (one loaded Xᵀ row feeds 4-8 rows) are the ones that pay there.
BSR_BLOCKS = {"cuda": ((32, 32), (16, 16)), "cpu": ((4, 1), (8, 1), (1, 4), (16, 16))}
# A sparse layer is chosen only when dense's median time is at least this many times its own,
# in both measurements (on 2 shared cores, run-to-run noise of a layer is ~3-8%).
SPARSE_MARGIN = 1.1
# The whole converted model must beat the masked dense one by this much (model_plans/choose_model):
# per-layer rounds time each layer alone, its weight hot in cache, and cannot see the fused MLP
# op. Measured (90% L1-unstructured ViT-B/16, batch 1, 2 threads, Xeon): per-layer rounds chose
# BSR 4x1 (3.4x CSR's stored values) for 60 of 73 layers, each 1.86x dense alone, and that model
# ran 1.76x dense end to end against 2.32x with CSR on every layer.
MODEL_MARGIN = 1.05
# A BSR candidate storing more than this fraction of the dense weight cannot win: not timed.
BSR_MAX_STORED = 0.6


def _record_inputs(model: nn.Module, masks: MaskSet, example_inputs: Any) -> dict[str, torch.Tensor]:
    masked = masks.apply(copy.deepcopy(model))
    wanted = {name.rpartition(".")[0] for name in masks if name.endswith(".weight")}
    seen: dict[str, torch.Tensor] = {}
    def keep(name: str):
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:  # must return None: not replace out
            seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    hooks = [module.register_forward_hook(keep(name)) for name, module in masked.named_modules()
             if name in wanted and type(module) is nn.Linear]
    try:
        with torch.inference_mode():
            run_batch(masked, example_inputs, 0, "example_inputs")
    finally:
        for h in hooks:
            h.remove()
    return seen


def _candidates(weight: torch.Tensor, mask: torch.Tensor, backends_: list[str] | None
                ) -> list[tuple[str, str, Any, dict]]:
    """(format, backend, built format, kw) for every format that takes ``mask`` and every
    backend that runs it on ``weight``'s device without a per-call rebuild (or, when the user
    limited the backends, those of them that can run it)."""
    out = []
    for fmt_name in SPARSE_FORMATS:
        blocks = BSR_BLOCKS["cuda" if weight.device.type == "cuda" else "cpu"]
        variants = [{"block": b} for b in blocks] if fmt_name == "bsr" else [{}]
        for kw in variants:
            try:
                fmt = F.FORMATS[fmt_name].from_dense(weight, mask, **kw)
            except ValueError:
                continue  # this mask does not fit the format
            if fmt_name == "bsr" and fmt.values.numel() > BSR_MAX_STORED * weight.numel():
                continue
            runnable = backends.candidates(fmt_name, fmt, weight.device)
            for backend in (runnable if backends_ is None else backends_):
                if backends_ is not None and backends.reason(fmt_name, backend, fmt, weight.device) is not None:
                    continue
                out.append((fmt_name, backend, fmt, kw))
    return out


def _versions(device: torch.device) -> str:
    """Device name and the library versions a measurement depends on: part of the cache key."""
    import importlib.util

    import sparse_prune

    triton = "none"
    if importlib.util.find_spec("triton") is not None:
        import triton as _triton

        triton = _triton.__version__
    return (f"{describe_device(device)}|torch {torch.__version__}|triton {triton}|cuda {torch.version.cuda}"
            f"|cpu kernels {ops.cpu_isa()}|sparse_prune {sparse_prune.__version__} {ops.kernel_builds()}")


def _load_cache(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a broken cache only costs a re-measurement
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _cached(entry: Any, cands: list[tuple[str, str, Any, dict]]) -> dict[str, Any] | None:
    """A cache entry, if it is one this run could have measured: a ``format``/``backend``/``kw``
    that is dense or one of today's candidates for this mask, and a finite positive ``ratio``.
    Anything else (edited, truncated, written by another version) is ``None``: re-measure."""
    if not (isinstance(entry, dict) and _number(entry.get("ratio")) and isinstance(entry.get("kw"), dict)):
        return None
    kw = entry["kw"]
    if set(kw) - {"block"} or ("block" in kw and not (
            isinstance(kw["block"], list) and len(kw["block"]) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in kw["block"]))):
        return None
    choice = (entry.get("format"), entry.get("backend"), {k: tuple(v) for k, v in kw.items()})
    if choice == ("dense", "torch", {}) or any(choice == (c[0], c[1], c[3]) for c in cands):
        return entry
    return None


def choose(model: nn.Module, masks: MaskSet, example_inputs: Any, backends_: list[str] | None = None,
           cache: str | os.PathLike | None = None, reps: int = 7) -> dict[str, dict[str, Any]]:
    """Per masked Linear weight name: ``{"format", "backend", "kw", "ratio", "ms", "rejected",
    "margin", "confirm"}`` of the choice (``format`` is ``"dense"`` where no sparse candidate
    beats dense by ``margin`` in ``ms`` and again in ``confirm``, the fresh rounds of the winner
    against dense; ``ratio`` = dense ms / chosen ms in ``ms``; ``rejected`` lists candidates
    whose output failed the agreement check)."""
    if example_inputs is None:
        raise ValueError("format='auto' needs example_inputs (a batch like the ones you will run)")
    if not isinstance(example_inputs, (torch.Tensor, tuple, dict)):
        raise TypeError(f"example_inputs must be a tensor, a tuple of model arguments or a dict of keyword "
                        f"arguments, got {type(example_inputs).__name__}")
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    inputs = _record_inputs(model, masks, example_inputs)
    store = _load_cache(cache)
    versions = _versions(device)
    decisions: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        layer_name = name.rpartition(".")[0]
        if layer_name not in inputs:
            continue
        module = model.get_submodule(layer_name)
        weight, x = params[name].detach(), inputs[layer_name]
        mask = mask.to(weight.device)
        cands = _candidates(weight, mask, backends_)
        labels = {_label(c[0], c[1], c[3]): (c[0], c[1], {k: list(v) for k, v in c[3].items()}) for c in cands}
        # every candidate (BSR blocks included) is in the key: two layers of one shape and density
        # whose masks admit different blocks must not share a decision one of them cannot take
        key = "|".join([versions, str(device), str(weight.dtype), str(x.shape[0]), "x".join(map(str, weight.shape)),
                        f"{float(mask.float().mean()):.2f}", ",".join(sorted(labels))])
        hit = _cached(store.get(key), cands)
        if hit is not None:
            decisions[name] = {**hit, "key": key, "labels": labels}
            continue
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None).to(weight)
        with torch.no_grad():
            dense.weight.copy_(weight * mask)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        fns = {"dense": lambda d=dense, x=x: d(x)}
        meta = {"dense": ("dense", "torch", {})}
        rejected = []
        with torch.inference_mode():
            baseline = dense(x)
            high = reference_dtype(device)
            reference = torch.nn.functional.linear(x.to(high), dense.weight.to(high),
                                                   None if dense.bias is None else dense.bias.to(high))
            reach = nonfinite_reach(x, dense.weight) if not bool(torch.isfinite(x).all()) else None
        for fmt_name, backend, fmt, kw in cands:
            label = _label(fmt_name, backend, kw)
            try:
                layer = SparseLinear(fmt, module.bias, backend, validate=False)
                with torch.inference_mode():
                    check_matches(layer(x), reference, baseline, f"{name} {label}", reach)
            except (Mismatch, ValueError, RuntimeError) as exc:
                rejected.append(f"{label}: {exc}")  # never pick a candidate that disagrees or fails
                continue
            fns[label] = lambda layer=layer, x=x: layer(x)
            meta[label] = (fmt_name, backend, kw)
        ms = time_interleaved(fns, device, warmup=2, reps=reps)
        best = min(ms, key=ms.get)
        if best != "dense" and ms["dense"] < SPARSE_MARGIN * ms[best]:
            best = "dense"
        confirm = None
        if best != "dense":  # confirm in fresh rounds, the winner against dense alone
            confirm = time_interleaved({"dense": fns["dense"], best: fns[best]}, device, warmup=1, reps=reps)
            if confirm["dense"] < SPARSE_MARGIN * confirm[best]:
                best = "dense"
        fmt_name, backend, kw = meta[best]
        store[key] = {"format": fmt_name, "backend": backend, "kw": {k: list(v) for k, v in kw.items()},
                      "ratio": ms["dense"] / ms[best], "ms": ms, "rejected": rejected,
                      "margin": SPARSE_MARGIN, "confirm": confirm}
        decisions[name] = {**store[key], "key": key, "labels": labels}
    _save_cache(cache, store)
    return decisions


def _label(fmt_name: str, backend: str, kw: dict) -> str:
    return f"{fmt_name}/{backend}" + (f"/{kw['block'][0]}x{kw['block'][1]}" if kw else "")


def _save_cache(cache: str | os.PathLike | None, store: dict[str, Any]) -> None:
    if cache is not None:  # crash-safe: a killed run leaves the old cache or the new one
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        atomic.write_atomic(cache, lambda tmp: _dump(store, tmp))


def _restricted(decision: dict[str, Any], family: str, everywhere: bool = False) -> dict[str, Any]:
    """``decision`` limited to ``family`` (a format name) and dense: the family's fastest
    candidate of the layer's rounds where it beat dense there by the margin (``everywhere``:
    wherever it was timed), else dense."""
    ms = decision.get("ms")
    ms = ms if isinstance(ms, dict) else {}
    dense = ms.get("dense")
    timed = [(ms[label], label) for label, (fmt_name, _, _) in decision["labels"].items()
             if fmt_name == family and _number(ms.get(label))]
    if not timed or not _number(dense) or (not everywhere and dense < SPARSE_MARGIN * min(timed)[0]):
        return {**decision, "format": "dense", "backend": "torch", "kw": {}, "ratio": 1.0}
    t, label = min(timed)
    fmt_name, backend, kw = decision["labels"][label]
    return {**decision, "format": fmt_name, "backend": backend, "kw": kw, "ratio": dense / t}


def model_plans(decisions: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The whole-model plans worth timing: ``"dense"``, ``"per-layer"`` (each layer's measured
    choice) and, per sparse format timed on some layer, ``"<format>"`` (that format where it beat
    dense alone by the margin, dense elsewhere) and ``"<format>:all"`` (that format on every
    layer where it was timed and agreed: its fastest backend and block there). Measured why the last: at 70% L1-unstructured
    (ViT-B/16, batch 1) csr on every layer ran 1.23x dense end to end, while the layers where csr
    beat dense alone by 1.1x gave 1.12x (the fused MLP op pays even where fc2 alone does not).
    Plans that choose the same thing for every layer are kept once (the first label, ``"dense"``
    before ``"per-layer"``)."""
    timed = sorted({f for d in decisions.values() for f, _, _ in d["labels"].values()})
    plans = {"dense": {n: {**d, "format": "dense", "backend": "torch", "kw": {}, "ratio": 1.0}
                       for n, d in decisions.items()},
             "per-layer": decisions}
    for f in timed:
        plans[f] = {n: _restricted(d, f) for n, d in decisions.items()}
        plans[f"{f}:all"] = {n: _restricted(d, f, everywhere=True) for n, d in decisions.items()}
    seen, out = set(), {}
    for label, plan in plans.items():
        sig = _plan_sig(plan)
        if sig not in seen:
            seen.add(sig)
            out[label] = plan
    return out


def _plan_sig(plan: dict[str, dict[str, Any]]) -> tuple:
    return tuple(sorted((n, d["format"], d["backend"], json.dumps(d["kw"], sort_keys=True)) for n, d in plan.items()))


def _times_ok(ms: Any, labels: set[str], plan: str) -> bool:
    return (isinstance(ms, dict) and set(ms) <= labels and "dense" in ms and plan in ms
            and all(_number(v) for v in ms.values()))


def _model_entry_ok(entry: Any, labels: set[str]) -> bool:
    """A cached whole-model record this run could have written: a plan among ``labels`` (the
    plans of this run), finite positive times of those plans, the ratio they give and the rule:
    a sparse plan is the fastest of its rounds and beat dense by MODEL_MARGIN there and in its
    confirmation rounds."""
    if not (isinstance(entry, dict) and isinstance(entry.get("plan"), str) and entry["plan"] in labels):
        return False
    plan, ms = entry["plan"], entry.get("ms")
    if not _times_ok(ms, labels, plan) or not _number(entry.get("ratio")):
        return False
    if not math.isclose(entry["ratio"], ms["dense"] / ms[plan], rel_tol=1e-9):
        return False
    if plan == "dense":
        return True
    confirm = entry.get("confirm")
    return (min(ms, key=ms.get) == plan and ms["dense"] >= MODEL_MARGIN * ms[plan]
            and _times_ok(confirm, {"dense", plan}, plan) and confirm["dense"] >= MODEL_MARGIN * confirm[plan])


def choose_model(plans: dict[str, dict[str, dict[str, Any]]], build: Callable[[str], nn.Module],
                 decisions: dict[str, dict[str, Any]], example_inputs: Any, device: torch.device,
                 cache: str | os.PathLike | None = None, reps: int = 7, variant: str = ""
                 ) -> tuple[str, dict[str, Any]]:
    """The plan (a key of ``plans``, from :func:`model_plans`) whose whole forward on
    ``example_inputs`` is fastest, and its record ``{"plan", "ms", "ratio", "margin",
    "confirm"}``. ``build(label)`` returns that plan's converted model; every plan is built
    (all held at once while they are timed: one model copy per plan), run once, and timed in
    rotating rounds; a plan whose forward fails is dropped with a warning. A sparse plan must
    beat dense by :data:`MODEL_MARGIN` in the rounds of every plan and again in fresh rounds
    against dense alone, else ``"dense"``. Cached like the layers' decisions, by every layer's
    key, every plan's content and ``variant`` (what else changes the built models)."""
    store = _load_cache(cache)
    payload = [sorted((n, d["key"]) for n, d in decisions.items()),
               sorted((label, repr(_plan_sig(plan))) for label, plan in plans.items()), variant]
    key = f"{_versions(device)}|model|{hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]}"
    entry = store.get(key)
    if _model_entry_ok(entry, set(plans)):  # else (edited, stale, another version's plans): measure again
        return entry["plan"], entry
    built: dict[str, nn.Module] = {}
    for label in plans:
        model = build(label)  # outside inference mode: the built model's buffers are plain tensors
        try:
            with torch.inference_mode():  # dense comes first: inputs that do not fit fail there, named as such
                run_batch(model, example_inputs, 0, "example_inputs") if label == "dense" else call_model(
                    model, example_inputs)
        except (ValueError, RuntimeError) as exc:
            if label == "dense":
                raise
            warnings.warn(f"format='auto': the {label} plan's forward failed on example_inputs, so it is not "
                          f"timed: {type(exc).__name__}: {exc}", stacklevel=3)
            continue
        built[label] = model
    with torch.inference_mode():
        fns = {f"model:{label}": (lambda m=m: run_batch(m, example_inputs, 0, "example_inputs"))
               for label, m in built.items()}
        ms = {k.removeprefix("model:"): v for k, v in time_interleaved(fns, device, warmup=1, reps=reps).items()}
        best = min(ms, key=ms.get)
        if best != "dense" and ms["dense"] < MODEL_MARGIN * ms[best]:
            best = "dense"
        confirm = None
        if best != "dense":
            confirm = {k.removeprefix("model:"): v for k, v in time_interleaved(
                {"model:dense": fns["model:dense"], f"model:{best}": fns[f"model:{best}"]}, device,
                warmup=1, reps=reps).items()}
            if confirm["dense"] < MODEL_MARGIN * confirm[best]:
                best = "dense"
    store[key] = {"plan": best, "ms": ms, "ratio": ms["dense"] / ms[best], "margin": MODEL_MARGIN, "confirm": confirm}
    _save_cache(cache, store)
    return best, store[key]


def _dump(data: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
