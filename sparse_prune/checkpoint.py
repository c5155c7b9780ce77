"""``sp.save`` / ``sp.load``: converted models as safetensors + a JSON manifest.

A checkpoint directory holds ``model.safetensors`` (the converted model's full state dict:
plain parameters and every SparseLinear's format arrays) and ``manifest.json``:

* ``format_version`` — :data:`FORMAT_VERSION`; a newer one is refused with a clear error;
* ``groups`` — every MLP/head group with its current unit count, so ``load`` can cut a
  freshly built dense skeleton to the same shapes (dependency-aware shrink);
* ``sparse_linear`` — per SparseLinear: format name, shape, static fields, the backend that
  was asked for (``requested_backend``, re-resolved for the loading machine's device) and the
  one that ran when saved (``backend``, for the record);
* ``dense_shapes`` — shapes before the cut of Linears cut by shrinking (for ``report``);
* ``weights_token`` — a random token also stored in ``model.safetensors``' metadata: the pair
  is written crash-safely (temporary files, fsync, renames) and a mismatched pair is refused.

``load`` needs no original weights: the skeleton only supplies the architecture.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import uuid
import warnings
from dataclasses import fields
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparse_prune import atomic, backends, files, hf
from sparse_prune import formats as F
from sparse_prune.constants import BACKENDS
from sparse_prune.convert import PLAN_ATTR, fuse_mlp, parent_of
from sparse_prune.nn import ACTIVATIONS, SparseLinear
from sparse_prune.shrink import DENSE_SHAPE_ATTR, apply_keep, open_mha_out_proj
from sparse_prune.structure import find_groups, gelu_sites

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TOKEN_KEY = "sparse_prune_weights_token"


def _manifest(model: nn.Module) -> dict[str, Any]:
    from sparse_prune import __version__

    sparse = {}
    dense_shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            static = {k: list(v) if isinstance(v, tuple) else v for k, v in module.format_static.items()}
            sparse[name] = {"format": module.format_name, "requested_backend": module.requested_backend,
                            "backend": module.backend, "static": static,
                            "fields": module.format_fields, "bias": module.bias is not None,
                            "plan": module.__dict__.get(PLAN_ATTR), "activation": module.activation}
        elif isinstance(module, nn.Linear) and hasattr(module, DENSE_SHAPE_ATTR):
            dense_shapes[name] = list(getattr(module, DENSE_SHAPE_ATTR))
    groups = [{"name": g.name, "kind": g.kind, "units": g.units} for g in find_groups(model)]
    return {"format_version": FORMAT_VERSION, "library": "sparse_prune", "version": __version__,
            "groups": groups, "sparse_linear": sparse, "dense_shapes": dense_shapes}


def save(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` (converted or not) to ``directory`` (created if missing)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{os.fspath(directory)} is an existing file; sp.save writes a directory there")
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        value = value.detach()
        # safetensors refuses tensors that share storage; tied weights are stored twice
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        tensors[key] = value.clone().contiguous() if ptr in seen else value.contiguous()
        if ptr != -1:
            seen.add(ptr)
    # Crash-safe (sparse_prune.atomic): both files are written and fsynced under temporary
    # names first, then renamed weights-then-manifest; a save killed while writing leaves the
    # old checkpoint whole. The two files share a random token (safetensors metadata and the
    # manifest), so the one torn state left — killed between the two renames — is refused at
    # load instead of pairing new weights with the old manifest.
    token = uuid.uuid4().hex
    manifest = {**_manifest(model), "weights_token": token}
    weights = os.path.join(directory, WEIGHTS)
    tmp_weights = atomic.write_temp(weights, lambda p: save_file(tensors, p, metadata={TOKEN_KEY: token}))
    try:
        tmp_manifest = atomic.write_temp(os.path.join(directory, MANIFEST),
                                         lambda p: _write_json(p, manifest))
    except BaseException:
        os.unlink(tmp_weights)
        raise
    atomic.commit(tmp_weights, weights)
    atomic.commit(tmp_manifest, os.path.join(directory, MANIFEST))
    for name in os.listdir(directory):  # leftovers of saves killed before (never needed again)
        if name.startswith((f".{WEIGHTS}.", f".{MANIFEST}.")) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def _paired_manifest(manifest: dict[str, Any], directory: str | os.PathLike, weights: str) -> dict[str, Any]:
    """The manifest that belongs to the weights file (see :func:`save`): the one in place, or —
    after a save killed between its two renames (new weights, old manifest) — the new manifest
    that save left complete and fsynced under its temporary name, so the load rolls forward to
    the new checkpoint, whole. Any other mismatch is refused. Checkpoints from before the token
    carry none and are not checked."""
    token = manifest.get("weights_token")
    if token is None:
        return manifest
    found = files.safetensors_metadata(weights, "checkpoint weights file").get(TOKEN_KEY)
    if found == token:
        return manifest
    for name in sorted(os.listdir(directory)) if found is not None else []:
        if name.startswith(f".{MANIFEST}.") and name.endswith(".tmp"):
            try:
                pending = _read_manifest(directory, name)
            except (ValueError, OSError):
                continue  # a temporary file killed half-way: not the one
            if pending.get("weights_token") == found:
                warnings.warn(f"{directory}: completing an interrupted save (its new manifest {name} matches the "
                              "weights); save the model again to tidy the directory", stacklevel=3)
                return pending
    raise ValueError(f"{weights} does not belong to the manifest beside it (an interrupted or mixed "
                     "save); save the model again")


def _read_manifest(directory: str | os.PathLike, name: str = MANIFEST) -> dict[str, Any]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a sparse_prune.save directory")
    manifest = files.read_json(path, "checkpoint manifest")
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int)
            or isinstance(manifest.get("format_version"), bool)):
        raise ValueError(f"{path}: manifest has no integer 'format_version'; the checkpoint is broken")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} was written by a newer "
                         f"sparse_prune (this one reads <= {FORMAT_VERSION}); upgrade sparse_prune")
    for key, kind in (("groups", list), ("sparse_linear", dict), ("dense_shapes", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{path}: manifest field {key!r} missing or not a {kind.__name__}")
    for i, entry in enumerate(manifest["groups"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("kind"), str)
                and _is_int(entry.get("units"))):
            raise ValueError(f"{path}: manifest groups[{i}] must be an object with a str 'name' and 'kind' and "
                             f"an int 'units', got {entry!r}")
    for name, shape in manifest["dense_shapes"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v >= 0 for v in shape)):
            raise ValueError(f"{path}: manifest dense_shapes[{name!r}] must be a list of two ints >= 0, got {shape!r}")
    if not isinstance(manifest.get("weights_token", ""), str):
        raise ValueError(f"{path}: manifest field 'weights_token' must be a str")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cut_groups(skeleton: nn.Module, saved: list[dict[str, Any]]) -> None:
    have = {(g.name, g.kind): g for g in find_groups(skeleton)}
    for entry in saved:
        group = have.get((entry.get("name"), entry.get("kind")))
        if group is None:
            raise ValueError(f"skeleton has no {entry.get('kind')} group {entry.get('name')!r}: "
                             "it is not the architecture the checkpoint was saved from")
        units = entry.get("units")
        if not isinstance(units, int) or not 1 <= units <= group.units:
            raise ValueError(f"checkpoint group {group.name!r} has units={units!r}; the skeleton "
                             f"has {group.units}: not the same architecture")
        if units < group.units:
            apply_keep(skeleton, group, torch.arange(units))


def _layer_backend(entry: dict[str, Any], name: str) -> str:
    """The backend to ask for: the saved request (older manifests: the backend that ran)."""
    backend = entry.get("requested_backend", entry["backend"])
    if backend not in BACKENDS:
        raise ValueError(f"{name!r} was saved with backend {backend!r}; this build allows {BACKENDS}")
    return backend


def _check_entries(entries: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Every SparseLinear entry complete, with a known format and backend and its arrays in the
    file — checked before anything is built or the skeleton touched."""
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ValueError(f"checkpoint entry for {name!r} is not an object")
        try:
            if not isinstance(entry["format"], str) or entry["format"] not in F.FORMATS:
                raise ValueError(f"{name!r} has unknown format {entry['format']!r}; allowed: {', '.join(F.FORMATS)}")
            if not isinstance(entry.get("requested_backend", entry["backend"]), str):
                raise ValueError(f"{name!r}: 'requested_backend' must be a str")
            _layer_backend(entry, name)
            cls = F.FORMATS[entry["format"]]
            want = [f.name for f in fields(cls) if f.type in ("torch.Tensor", torch.Tensor)]
            if not isinstance(entry["fields"], list) or sorted(map(str, entry["fields"])) != sorted(want) \
                    or not all(isinstance(f, str) for f in entry["fields"]):
                raise ValueError(f"{name!r}: 'fields' must list the {entry['format']!r} arrays {want}, "
                                 f"got {entry['fields']!r}")
            if not isinstance(entry["bias"], bool):
                raise ValueError(f"{name!r}: 'bias' must be true or false, got {entry['bias']!r}")
            static = [f.name for f in fields(cls) if f.name not in want]
            if not isinstance(entry["static"], dict) or sorted(entry["static"]) != sorted(static):
                raise ValueError(f"{name!r}: 'static' must be an object with the keys {static}, "
                                 f"got {entry['static']!r}")
            for key, value in entry["static"].items():
                if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
                    raise ValueError(f"{name!r}: static {key!r} must be a list of two ints, got {value!r}")
            if entry.get("activation") not in ACTIVATIONS:
                raise ValueError(f"{name!r}: 'activation' must be one of {ACTIVATIONS}, got {entry.get('activation')!r}")
            if not isinstance(entry.get("plan") or {}, dict):
                raise ValueError(f"{name!r}: 'plan' must be an object or null, got {entry.get('plan')!r}")
            missing = [f"{name}.{f}" for f in entry["fields"] if f"{name}.{f}" not in tensors]
            if entry["bias"] and f"{name}.bias" not in tensors:
                missing.append(f"{name}.bias")
        except KeyError as exc:
            raise ValueError(f"checkpoint entry for {name!r} is incomplete: missing {exc}") from exc
        if missing:
            raise ValueError(f"checkpoint arrays missing for {name!r}: {', '.join(missing)}")


def _swap_sparse(skeleton: nn.Module, entries: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Rebuild every SparseLinear; return the layers whose saved backend cannot run here (they
    run on this device's ``auto`` backend instead)."""
    open_mha_out_proj(skeleton, [f"{name}.weight" for name in entries])  # as convert() did
    moved = []
    for name, entry in entries.items():
        cls = F.FORMATS[entry["format"]]
        static = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["static"].items()}
        arrays = {f: tensors[f"{name}.{f}"] for f in entry["fields"]}
        bias = tensors[f"{name}.bias"] if entry["bias"] else None
        backend = _layer_backend(entry, name)
        try:
            fmt = cls(**arrays, **static)
        except TypeError as exc:
            raise ValueError(f"checkpoint entry for {name!r} does not fit format {entry['format']!r}: {exc}") from exc
        try:
            fmt.validate()
        except ValueError as exc:
            raise ValueError(f"checkpoint arrays of {name!r} ({entry['format']}): {name}.{exc}") from None
        try:
            target = skeleton.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"skeleton has no module {name!r}: not the saved architecture") from exc
        if not isinstance(target, nn.Linear | SparseLinear) or (target.out_features, target.in_features) != fmt.shape:
            raise ValueError(f"skeleton module {name!r} is not a Linear of shape {fmt.shape}")
        want = target.weight.dtype if isinstance(target, nn.Linear) else target.values.dtype
        for key, value in ((f"{name}.values", fmt.values), (f"{name}.bias", bias)):
            if value is not None and value.dtype != want:
                raise ValueError(_dtype_message(key, value.dtype, want))
        try:
            if not backends.runs_on(backend, fmt.device):
                raise ValueError(f"it cannot run on {fmt.device}")
            layer = SparseLinear(fmt, bias, backend, activation=entry.get("activation"), validate=False)
        except ValueError as exc:  # e.g. saved with backend="cuda", loaded on a CPU machine
            moved.append(f"{name} ({backend}: {exc})")
            layer = SparseLinear(fmt, bias, "auto", activation=entry.get("activation"), validate=False)
        layer.train(target.training)
        if isinstance(entry.get("plan"), dict):
            layer.__dict__[PLAN_ATTR] = entry["plan"]
        parent, child = parent_of(skeleton, name)
        setattr(parent, child, layer)
    return moved


def _dtype_message(key: str, got: torch.dtype, want: torch.dtype) -> str:
    return (f"array {key!r} is {got} in the file, the skeleton's is {want}: dtypes must match the skeleton "
            f"(to load a checkpoint saved in {got}, cast the skeleton first: skeleton.to({got}))")


def _check_dtypes(work: nn.Module, tensors: dict[str, torch.Tensor], sparse: dict[str, Any]) -> None:
    """Every plain tensor of the file has the dtype of the skeleton's tensor of that name (the
    SparseLinear arrays were checked when rebuilt); ``assign=True`` would otherwise take the
    file's dtype silently (an int64 bias in a float32 model)."""
    skip = {f"{name}.{f}" for name, entry in sparse.items() for f in [*entry["fields"], "bias"]}
    for key, have in work.state_dict(keep_vars=True).items():
        got = tensors.get(key)
        if key in skip or got is None:
            continue
        if got.dtype != have.dtype:
            raise ValueError(_dtype_message(key, got.dtype, have.dtype))


def _fuse_saved_activations(model: nn.Module) -> None:
    """The GELUs that convert() moved into their SparseLinear are Identity in the saved model:
    do the same on the skeleton; a fused layer without its GELU site is another architecture."""
    sites = {site.linear: site for site in gelu_sites(model)}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear) and module.activation == "gelu":
            site = sites.get(name)
            if site is None:
                raise ValueError(f"{name!r} was saved with a fused GELU, but the skeleton has no GELU after it: "
                                 "not the saved architecture")
            setattr(model.get_submodule(site.parent), site.attr, nn.Identity())


def load(skeleton: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save` on ``skeleton`` (a freshly built dense model of
    the same architecture, any weights), in place, and return it.

    Groups are cut to the saved unit counts, SparseLinears rebuilt from the stored arrays
    (validated), and every tensor assigned from the file, on the skeleton's device.
    Every tensor's dtype must be the skeleton's (cast the skeleton to load a checkpoint saved in
    another dtype), and every format array is validated before a layer is built.
    Each layer asks for the backend it was saved with, re-resolved for this device; one saved
    with ``backend="cuda"``/``"triton"`` that cannot run here (a CPU machine) gets ``"auto"``,
    and one warning lists them. All-or-nothing: the whole manifest and file are checked and the
    model is rebuilt on a copy, so the skeleton is only modified when everything fits.
    Errors: ``FileNotFoundError`` (no manifest or weights file), ``ValueError`` naming the
    checkpoint (newer or broken manifest, wrong manifest field types, an empty, truncated or
    corrupted weights file, a skeleton of another architecture or dtype, malformed arrays).

    A transformers skeleton gets the ``save_pretrained`` of :mod:`sparse_prune.hf`, as
    ``convert`` gives it.
    """
    if not isinstance(skeleton, nn.Module):
        raise TypeError(f"skeleton must be an nn.Module, got {type(skeleton).__name__}")
    manifest = _read_manifest(directory)
    params = next(iter(skeleton.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    if device.type == "meta":
        raise ValueError("skeleton is on the meta device (no storage to load into): build it on a real device, "
                         "e.g. skeleton.to_empty(device='cpu')")
    weights = os.path.join(directory, WEIGHTS)
    manifest = _paired_manifest(manifest, directory, weights)
    tensors, _ = files.read_safetensors(weights, device, "checkpoint weights file")
    try:
        _check_entries(manifest["sparse_linear"], tensors)
        work = copy.deepcopy(skeleton)
        _cut_groups(work, manifest["groups"])
        moved = _swap_sparse(work, manifest["sparse_linear"], tensors)
        _check_dtypes(work, tensors, manifest["sparse_linear"])
        _fuse_saved_activations(work)
        fuse_mlp(work)  # as convert() left it: a ViT MLP of two SparseLinears runs as one op
        try:
            work.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint does not fit the skeleton: {exc}") from exc
        for name, shape in manifest["dense_shapes"].items():
            try:
                work.get_submodule(name).__dict__[DENSE_SHAPE_ATTR] = tuple(shape)
            except AttributeError as exc:
                raise ValueError(f"skeleton has no module {name!r}: not the saved architecture") from exc
    except ValueError as exc:  # name the checkpoint in every refusal
        raise ValueError(f"checkpoint {os.fspath(directory)}: {exc}") from exc
    if moved:
        warnings.warn(f"{len(moved)} layer(s) were saved with a backend that cannot run here and use "
                      "backend='auto' instead: " + "; ".join(moved), stacklevel=2)
    skeleton.__dict__.update(work.__dict__)  # everything fitted: take the rebuilt state
    return hf.guard(skeleton)  # transformers: save_pretrained writes this format (sparse_prune.hf)
