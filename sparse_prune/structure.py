"""Dependency groups of Vision Transformers: weights that must be pruned together.

Two kinds of group per encoder block:

* ``mlp``:   hidden neuron u = row u of fc1 and column u of fc2;
* ``heads``: head h = rows ``h*d:(h+1)*d`` of the query, key and value projections and
  columns ``h*d:(h+1)*d`` of the output projection (d = head size).

Removing a unit from every member of its group leaves the block's output unchanged for the
kept units, which is what lets structured masks become physically smaller matrices.
Recognised layouts: transformers ViT (4.x ``attention.attention.query`` and 5.x
``attention.q_proj`` naming), timm ``VisionTransformer`` (fused ``attn.qkv``) and
torchvision ``VisionTransformer`` (``nn.MultiheadAttention.in_proj_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Member:
    """Unit u of this member is ``param.narrow(dim, offset + u * width, width)``."""

    param: str
    dim: int
    offset: int = 0
    width: int = 1


@dataclass(frozen=True)
class Group:
    kind: str  # "mlp" or "heads"
    name: str  # the module that owns the group (block MLP or attention module)
    units: int  # hidden neurons or heads
    members: tuple[Member, ...] = field(default_factory=tuple)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.param for m in self.members))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _linear(module: nn.Module, path: str) -> nn.Module | None:
    """The ``nn.Linear`` (or Linear-like ``SparseLinear``) at ``path`` under ``module``."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    linear_like = isinstance(obj, nn.Linear) or hasattr(obj, "weight_format")
    return obj if linear_like else None


def _head_group(name: str, heads: int, head_dim: int, q: list[Member], proj: str) -> Group:
    return Group("heads", name, heads, (*q, Member(proj, 1, 0, head_dim)))


def _attention_group(name: str, module: nn.Module) -> Group | None:
    # transformers >= 5: ViTAttention with q_proj/k_proj/v_proj/o_proj
    if all(_linear(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(
        module, "num_attention_heads"
    ):
        heads = module.num_attention_heads
        d = module.q_proj.out_features // heads
        qkv = [Member(_join(name, p, "weight"), 0, 0, d) for p in ("q_proj", "k_proj", "v_proj")]
        return _head_group(name, heads, d, qkv, _join(name, "o_proj", "weight"))
    # transformers 4.x: ViTAttention.attention.{query,key,value} + ViTAttention.output.dense
    inner = getattr(module, "attention", None)
    if (
        inner is not None
        and all(_linear(inner, p) for p in ("query", "key", "value"))
        and _linear(module, "output.dense")
        and hasattr(inner, "num_attention_heads")
    ):
        heads = inner.num_attention_heads
        d = inner.query.out_features // heads
        qkv = [Member(_join(name, "attention", p, "weight"), 0, 0, d) for p in ("query", "key", "value")]
        return _head_group(name, heads, d, qkv, _join(name, "output.dense.weight"))
    # timm Attention: fused qkv [3*H*d, C] + proj
    if _linear(module, "qkv") and _linear(module, "proj") and hasattr(module, "num_heads"):
        heads = module.num_heads
        d = module.qkv.out_features // (3 * heads)
        qkv = [Member(_join(name, "qkv.weight"), 0, i * heads * d, d) for i in range(3)]
        return _head_group(name, heads, d, qkv, _join(name, "proj.weight"))
    # torchvision: nn.MultiheadAttention with a packed in_proj_weight (or, once heads were
    # removed, sparse_prune.shrink.HeadPrunedAttention, which keeps the same names)
    packed = isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
    if packed or type(module).__name__ == "HeadPrunedAttention":
        heads, d = module.num_heads, module.head_dim
        qkv = [Member(_join(name, "in_proj_weight"), 0, i * heads * d, d) for i in range(3)]
        return _head_group(name, heads, d, qkv, _join(name, "out_proj.weight"))
    return None


def _mlp_group(name: str, module: nn.Module) -> Group | None:
    pairs = (("fc1", "fc2"), ("intermediate.dense", "output.dense"))
    for a, b in pairs:
        fc1, fc2 = _linear(module, a), _linear(module, b)
        if fc1 is not None and fc2 is not None and fc1.out_features == fc2.in_features:
            if a == "intermediate.dense" and not hasattr(module, "attention"):
                continue  # transformers 4.x ViTLayer holds both; other modules may not be MLPs
            members = (Member(_join(name, a, "weight"), 0), Member(_join(name, b, "weight"), 1))
            return Group("mlp", name, fc1.out_features, members)
    # torchvision MLPBlock: Sequential(Linear, GELU, Dropout, Linear, Dropout)
    if isinstance(module, nn.Sequential) and type(module).__name__ == "MLPBlock":
        linears = [(i, m) for i, m in enumerate(module) if isinstance(m, nn.Linear)]
        if len(linears) == 2 and linears[0][1].out_features == linears[1][1].in_features:
            (i, fc1), (j, _) = linears
            members = (Member(_join(name, str(i), "weight"), 0), Member(_join(name, str(j), "weight"), 1))
            return Group("mlp", name, fc1.out_features, members)
    return None


def resolve_param(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    """``"a.b.weight"`` -> (``"a.b"``, the module ``a.b``, ``"weight"``)."""
    module_name, _, attr = name.rpartition(".")
    return module_name, (model.get_submodule(module_name) if module_name else model), attr


def find_groups(model: nn.Module) -> list[Group]:
    """All MLP-neuron and attention-head groups of ``model``, in module order.

    Returns an empty list for models with no recognised ViT block.
    """
    groups: list[Group] = []
    seen: set[str] = set()
    for name, module in model.named_modules():
        for group in (_attention_group(name, module), _mlp_group(name, module)):
            if group is not None and not seen.intersection(group.params):
                seen.update(group.params)
                groups.append(group)
    return groups


@dataclass(frozen=True)
class GeluSite:
    """A Linear whose output goes straight into an exact (erf) GELU: ``linear`` and the module
    holding the activation (``parent``) with the attribute naming it (``attr``)."""

    linear: str
    parent: str
    attr: str


def _exact_gelu(module: nn.Module | None) -> bool:
    """``nn.GELU(approximate="none")`` or transformers' ``GELUActivation`` (erf form); not the
    tanh approximations (``gelu_new``, ``gelu_pytorch_tanh``), which compute something else."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    if type(module).__name__ == "GELUActivation":
        fn = getattr(module, "act", None)
        return fn is nn.functional.gelu or getattr(fn, "__name__", "") == "_gelu_python"
    return False


_VIT_LIBRARIES = ("transformers.", "timm.", "torchvision.")


def gelu_sites(model: nn.Module) -> list[GeluSite]:
    """Every ViT MLP whose first Linear feeds an exact GELU directly, by source:
    transformers 5.x ``ViTMLP`` (``fc1`` → ``activation_fn``), 4.x ``ViTIntermediate``
    (``dense`` → ``intermediate_act_fn``), timm ``Mlp`` (``fc1`` → ``act``), torchvision
    ``MLPBlock`` (``[0]`` → ``[1]``). Other modules are never matched: fusing needs the forward
    to be exactly Linear then GELU, which these classes' forwards are."""
    sites = []
    layouts = {"ViTMLP": ("fc1", "activation_fn"), "ViTIntermediate": ("dense", "intermediate_act_fn"),
               "Mlp": ("fc1", "act"), "MLPBlock": ("0", "1")}
    for name, module in model.named_modules():
        layout = layouts.get(type(module).__name__)
        if layout is None or not type(module).__module__.startswith(_VIT_LIBRARIES):
            continue  # a user's own "Mlp" may do something else between fc1 and act
        lin_attr, act_attr = layout
        if isinstance(module, nn.Sequential):
            linear, act = module[int(lin_attr)], module[int(act_attr)]
        else:
            linear, act = getattr(module, lin_attr, None), getattr(module, act_attr, None)
        if isinstance(linear, nn.Module) and hasattr(linear, "in_features") and _exact_gelu(act):
            sites.append(GeluSite(_join(name, lin_attr), name, act_attr))
    return sites


@dataclass(frozen=True)
class MlpSite:
    """A ViT MLP module (``parent``) whose inference forward is exactly ``fc2(act(fc1(x)))``,
    with the attribute names of its two Linears and of its activation."""

    parent: str
    fc1: str
    act: str
    fc2: str


def _no_dropout(*modules: nn.Module | None) -> bool:
    return all(isinstance(m, nn.Dropout) and m.p == 0 or isinstance(m, nn.Identity) for m in modules)


def mlp_sites(model: nn.Module) -> list[MlpSite]:
    """Every ViT MLP whose forward is exactly fc1 → activation → fc2, by source: transformers
    5.x ``ViTMLP``; timm ``Mlp`` with both dropouts 0 and no norm; torchvision ``MLPBlock``
    with its dropouts 0. Any other module (a user's own ``Mlp``, a dropout that is on) is not
    matched: replacing the module by one fused op must compute what its forward computes."""
    sites = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not type(module).__module__.startswith(_VIT_LIBRARIES):
            continue
        if kind == "ViTMLP":
            sites.append(MlpSite(name, "fc1", "activation_fn", "fc2"))
        elif kind == "Mlp" and _no_dropout(getattr(module, "drop1", None), getattr(module, "drop2", None)) \
                and isinstance(getattr(module, "norm", None), nn.Identity):
            sites.append(MlpSite(name, "fc1", "act", "fc2"))
        elif kind == "MLPBlock" and isinstance(module, nn.Sequential) and len(module) == 5 \
                and _no_dropout(module[2], module[4]):
            sites.append(MlpSite(name, "0", "1", "3"))
    return sites
