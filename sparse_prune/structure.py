"""Dependency groups of Vision Transformers: weights that must be pruned together.

Two kinds of group per encoder block:

* ``mlp``:   hidden neuron u = row u of fc1 and column u of fc2;
* ``heads``: head h = rows ``h*d:(h+1)*d`` of the query, key and value projections and
  columns ``h*d:(h+1)*d`` of the output projection (d = head size).

Removing a unit from every member of its group leaves the block's output unchanged for the
kept units, which is what lets structured masks become physically smaller matrices.
Recognised layouts, by class (a module is only grouped when its forward is known to keep
the function when units are removed; anything else is left whole and named by
:func:`scan`): transformers ViT (4.x ``attention.attention.query`` and 5.x
``attention.q_proj`` naming) and BERT-style self-attention (``attention.self.query``,
``intermediate.dense`` → ``output.dense``), timm ``VisionTransformer`` (fused ``attn.qkv``,
``Mlp``) and Swin ``WindowAttention`` (whose relative-position bias table is cut with its
heads), torchvision ``VisionTransformer`` (``nn.MultiheadAttention.in_proj_weight``,
``MLPBlock``), any ``nn.Sequential`` of ``Linear``, element-wise modules (activations,
dropout), ``Linear`` (plain MLPs, torchvision's ``MLP``), and any other module with ``fc1``/``fc2``
Linears whose forward, traced with ``torch.fx``, is fc1 → element-wise ops → fc2
(:func:`traced_chain`).
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
    name: str  # the module that owns the group (block MLP or attention module; a Sequential's first Linear)
    units: int  # hidden neurons or heads
    members: tuple[Member, ...] = field(default_factory=tuple)
    # cut with the units but neither scored nor masked (Swin's per-head relative-position bias)
    followers: tuple[Member, ...] = field(default_factory=tuple)

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


def _head_group(name: str, heads: int, head_dim: int, q: list[Member], proj: str,
                followers: tuple[Member, ...] = ()) -> Group:
    return Group("heads", name, heads, (*q, Member(proj, 1, 0, head_dim)), followers)


def _from(module: nn.Module, library: str, names: tuple[str, ...] | set[str]) -> bool:
    cls = type(module)
    return cls.__module__.startswith(library) and cls.__name__ in names


# Attention classes whose forward reshapes by head size and reads the head count from the
# attribute shrink updates (checked numerically in tests/test_structure_honesty.py).
_HF_QPROJ = {"ViTAttention", "DeiTAttention"}
_HF_SELF = {"ViTSelfAttention", "ViTSdpaSelfAttention", "DeiTSelfAttention", "DeiTSdpaSelfAttention",
            "BertSelfAttention", "BertSdpaSelfAttention", "RobertaSelfAttention", "RobertaSdpaSelfAttention"}
_TIMM_ATTENTION = {"Attention"}
_TIMM_WINDOW = {"WindowAttention"}


def _attention_group(name: str, module: nn.Module) -> Group | None:
    # transformers >= 5: ViTAttention with q_proj/k_proj/v_proj/o_proj
    if _from(module, "transformers.", _HF_QPROJ) and all(
            _linear(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(
        module, "num_attention_heads"
    ):
        heads = module.num_attention_heads
        d = module.q_proj.out_features // heads
        qkv = [Member(_join(name, p, "weight"), 0, 0, d) for p in ("q_proj", "k_proj", "v_proj")]
        return _head_group(name, heads, d, qkv, _join(name, "o_proj", "weight"))
    # transformers 4.x ViT: ViTAttention.attention.{query,key,value} + ViTAttention.output.dense;
    # BERT-style: BertAttention.self.{query,key,value} + BertAttention.output.dense
    for attr in ("attention", "self"):
        inner = getattr(module, attr, None)
        if (
            isinstance(inner, nn.Module)
            and _from(inner, "transformers.", _HF_SELF)
            and all(_linear(inner, p) for p in ("query", "key", "value"))
            and _linear(module, "output.dense")
            and hasattr(inner, "num_attention_heads")
        ):
            heads = inner.num_attention_heads
            d = inner.query.out_features // heads
            qkv = [Member(_join(name, attr, p, "weight"), 0, 0, d) for p in ("query", "key", "value")]
            return _head_group(name, heads, d, qkv, _join(name, "output.dense.weight"))
    # timm Attention: fused qkv [3*H*d, C] + proj; Swin's WindowAttention also holds a
    # relative-position bias table [(2Wh-1)(2Ww-1), H], cut along its head column
    timm_attention = _from(module, "timm.", _TIMM_ATTENTION)
    window = _from(module, "timm.", _TIMM_WINDOW) and isinstance(
        getattr(module, "relative_position_bias_table", None), nn.Parameter)
    if (timm_attention or window) and _linear(module, "qkv") and _linear(module, "proj") and hasattr(
            module, "num_heads"):
        heads = module.num_heads
        d = module.qkv.out_features // (3 * heads)
        qkv = [Member(_join(name, "qkv.weight"), 0, i * heads * d, d) for i in range(3)]
        table = (Member(_join(name, "relative_position_bias_table"), 1),) if window else ()
        return _head_group(name, heads, d, qkv, _join(name, "proj.weight"), table)
    # torchvision: nn.MultiheadAttention with a packed in_proj_weight (or, once heads were
    # removed, sparse_prune.shrink.HeadPrunedAttention, which keeps the same names)
    packed = (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
              and module.bias_k is None and not module.add_zero_attn)  # HeadPrunedAttention has neither
    if packed or type(module).__name__ == "HeadPrunedAttention":
        heads, d = module.num_heads, module.head_dim
        qkv = [Member(_join(name, "in_proj_weight"), 0, i * heads * d, d) for i in range(3)]
        return _head_group(name, heads, d, qkv, _join(name, "out_proj.weight"))
    return None


# MLP classes whose forward is fc1 -> element-wise ops -> fc2 (a timm Mlp's norm is a blocker).
_MLP_CLASSES = {"timm.": {"Mlp"}, "transformers.": {"ViTMLP", "DeiTMLP"}}
_HF_LAYERS = {"ViTLayer", "DeiTLayer", "BertLayer", "RobertaLayer"}
# modules that act on each element alone: whole units can be removed through them
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
               nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout)


def _elementwise(module: nn.Module) -> bool:
    if isinstance(module, ELEMENTWISE):
        return True
    if type(module).__module__.startswith("transformers.") and type(module).__name__ in {
            "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "SiLUActivation",
            "GELUTanh", "PytorchGELUTanh"}:
        return True
    return _plain_sequential(module) and all(_elementwise(m) for m in module)


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` (or subclass, like torchvision's ``MLP``) whose forward is the chain."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


_ELEMENTWISE_FUNCTIONS = {"relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "leaky_relu", "elu", "hardswish",
                          "mish", "softplus", "relu6", "hardsigmoid"}


def _elementwise_node(node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return _elementwise(modules[node.target])
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name.removesuffix("_") in _ELEMENTWISE_FUNCTIONS
    return False


def traced_chain(module: nn.Module, fc1: str, fc2: str) -> bool:
    """Whether ``module``'s forward, traced with ``torch.fx``, feeds ``fc1``'s output to ``fc2``
    through element-wise ops only and uses it nowhere else (what removing a hidden unit needs).
    ``False`` when it cannot be traced (data-dependent control flow) or anything else happens."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - an untraceable forward is simply not understood
        return False
    modules = dict(module.named_modules())
    first = [n for n in graph.nodes if n.op == "call_module" and n.target == fc1]
    second = [n for n in graph.nodes if n.op == "call_module" and n.target == fc2]
    if len(first) != 1 or len(second) != 1:
        return False
    node = first[0]
    while True:
        users = list(node.users)
        if len(users) != 1:
            return False
        nxt = users[0]
        if nxt is second[0]:
            return nxt.args[0] is node and len(nxt.args) == 1 and not nxt.kwargs
        if not _elementwise_node(nxt, modules) or nxt.args[0] is not node or any(
                isinstance(a, torch.fx.Node) for a in (*nxt.args[1:], *nxt.kwargs.values())):
            return False
        node = nxt


def _sequential_groups(name: str, module: nn.Module) -> list[Group]:
    """Every ``Linear, element-wise..., Linear`` run of an ``nn.Sequential`` (whose forward is
    the chain, by definition): hidden unit u = row u of the first, column u of the second."""
    groups = []
    items = list(module.named_children())
    for i, (a, first) in enumerate(items):
        if not isinstance(first, nn.Linear):
            continue
        for b, second in items[i + 1:]:
            if isinstance(second, nn.Linear):
                if second.in_features == first.out_features:
                    members = (Member(_join(name, a, "weight"), 0), Member(_join(name, b, "weight"), 1))
                    groups.append(Group("mlp", _join(name, a), first.out_features, members))
                break
            if not _elementwise(second):
                break
    return groups


def _mlp_group(name: str, module: nn.Module) -> Group | None:
    pairs = (("fc1", "fc2"), ("intermediate.dense", "output.dense"))
    for a, b in pairs:
        fc1, fc2 = _linear(module, a), _linear(module, b)
        if fc1 is not None and fc2 is not None and fc1.out_features == fc2.in_features:
            if a == "fc1" and not any(_from(module, lib, names) for lib, names in _MLP_CLASSES.items()) \
                    and not traced_chain(module, a, b):
                continue  # another module's forward may do anything between fc1 and fc2
            if a == "intermediate.dense" and not (
                    _from(module, "transformers.", _HF_LAYERS) and hasattr(module, "attention")):
                continue  # transformers 4.x ViTLayer / BertLayer hold both; other modules may not be MLPs
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


_PROJECTIONS = ("qkv", "q_proj", "query", "in_proj_weight", "to_qkv", "q", "Wqkv")


def _unrecognised_attention(module: nn.Module) -> bool:
    """Looks like multi-head attention (a head count and a projection) but is none of ours."""
    heads = any(isinstance(getattr(module, a, None), int) for a in ("num_heads", "num_attention_heads", "n_heads"))
    return heads and any(getattr(module, p, None) is not None for p in _PROJECTIONS)


def scan(model: nn.Module) -> tuple[list[Group], list[str]]:
    """``(groups, left)``: every MLP-neuron and attention-head group of ``model`` in module
    order (:func:`find_groups`), and ``"name (Class)"`` of each attention-like module whose
    layout is not recognised, whose heads are therefore never coupled nor removed."""
    groups: list[Group] = []
    left: list[str] = []
    seen: set[tuple[str, int]] = set()
    grouped_modules: set[str] = set()
    for name, module in model.named_modules():
        found = [_attention_group(name, module), _mlp_group(name, module)]
        if _plain_sequential(module):
            found += _sequential_groups(name, module)
        for group in found:
            cuts = {(m.param, m.dim) for m in group.members} if group is not None else set()
            if group is not None and not seen.intersection(cuts):
                seen.update(cuts)
                groups.append(group)
                if group.kind == "heads":
                    grouped_modules.add(name)
    for name, module in model.named_modules():
        if name not in grouped_modules and _unrecognised_attention(module) and not any(
                name.startswith(g + ".") or g.startswith(name + ".") for g in grouped_modules):
            left.append(f"{name} ({type(module).__name__})")
    return groups, left


def find_groups(model: nn.Module) -> list[Group]:
    """All MLP-neuron and attention-head groups of ``model``, in module order.

    Only layouts known to keep the function when units are removed are grouped (see the module
    docstring); :func:`scan` also names the attention-like modules left out. Returns an empty
    list for models with no recognised block. A weight may be in two groups along different
    dims (the middle Linear of ``Sequential(Linear, ReLU, Linear, ReLU, Linear)``).
    """
    return scan(model)[0]


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
