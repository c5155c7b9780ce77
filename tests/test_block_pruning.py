"""Method "block": whole (bm, bk) blocks kept or pruned, against a slow per-block reference;
counts, odd shapes, scopes, per_layer, exclusions, the Wanda score, errors, CLI, import order."""

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import sparse_prune as sp
from sparse_prune import cli
from sparse_prune import formats as fm
from sparse_prune.pruning import count_to_prune


def _linear(shape, ties=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        w = torch.randint(-3, 4, shape, generator=g).float() if ties else torch.randn(shape, generator=g)
        lin.weight.copy_(w * scale)
    return lin


def _blocks(shape, block):
    """(row slice, column slice) of every block, row-major; edge blocks partial."""
    (rows, cols), (bm, bk) = shape, block
    return [(slice(i, min(i + bm, rows)), slice(j, min(j + bk, cols)))
            for i in range(0, rows, bm) for j in range(0, cols, bk)]


def _reference_scores(score, block, n=2.0):
    """Per block, in plain Python: ‖b‖ₙ / numel(b)^(1/n) of its real entries (max for inf)."""
    out = []
    for rs, cs in _blocks(score.shape, block):
        b = score[rs, cs].double().reshape(-1)
        if math.isinf(n):
            out.append(float(b.max()))
        else:
            out.append(float(b.pow(n).sum() ** (1 / n)) / b.numel() ** (1 / n))
    return out


def _reference_mask(score, block, k, n=2.0):
    """Prune the k lowest-scoring blocks (ties: the earlier block), keep the rest, whole."""
    scores = _reference_scores(score, block, n)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    mask = torch.ones(score.shape, dtype=torch.bool)
    for i in order[:k]:
        rs, cs = _blocks(score.shape, block)[i]
        mask[rs, cs] = False
    return mask


def _whole_blocks(mask, block):
    """Every block is all kept or all pruned; returns per-block keep flags (row-major)."""
    flags = []
    for rs, cs in _blocks(mask.shape, block):
        part = mask[rs, cs]
        assert bool(part.all()) or not bool(part.any()), f"block {rs}, {cs} is partly pruned"
        flags.append(bool(part.all()))
    return flags


SHAPES_BLOCKS = [((5, 123), (4, 4)), ((197, 5), (4, 1)), ((197, 64), (16, 16)), ((64, 48), (32, 32)),
                 ((1, 7), (4, 4)), ((8, 8), (1, 4)), ((12, 9), (3, 3)), ((6, 10), (8, 16))]


@pytest.mark.parametrize("shape,block", SHAPES_BLOCKS)
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.77, 1.0, 0, 1, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_block_matches_reference(shape, block, amount, ties):
    lin = _linear(shape, ties)
    nblocks = len(_blocks(shape, block))
    if isinstance(amount, int) and amount > nblocks:
        pytest.skip("count larger than the blocks of this shape (tested in test_block_int_amount)")
    masks = sp.prune(lin, "block", amount=amount, block=block)
    mask = masks["weight"]
    assert mask.dtype == torch.bool and mask.shape == lin.weight.shape
    flags = _whole_blocks(mask, block)
    k = count_to_prune(amount, nblocks, "x")
    assert flags.count(False) == k  # exact count of pruned blocks
    assert torch.equal(mask, _reference_mask(lin.weight.detach().abs(), block, k))


@pytest.mark.parametrize("n", [1, 2, 3, 0.5, math.inf, "fro"])
def test_block_norm_orders(n):
    lin = _linear((13, 21), seed=4)
    mask = sp.prune(lin, "block", amount=0.4, block=(4, 4), n=n)["weight"]
    k = round(0.4 * len(_blocks((13, 21), (4, 4))))
    p = 2.0 if n == "fro" else float(n)
    assert torch.equal(mask, _reference_mask(lin.weight.detach().abs(), (4, 4), k, p))


def test_block_l1_and_l2_differ():
    # block 0 = [2.6, 0], block 1 = [1.4, 1.4]: mean |w| 1.3 < 1.4, RMS 1.84 > 1.4
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.6, 0.0, 1.4, 1.4]]))
    assert sp.prune(lin, "block", amount=1, block=(1, 2), n=2)["weight"].tolist() == [[True, True, False, False]]
    assert sp.prune(lin, "block", amount=1, block=(1, 2), n=1)["weight"].tolist() == [[False, False, True, True]]


def test_partial_edge_blocks_compare_per_element():
    # 5x8 with 4x4 blocks: two full blocks of 0.9 and two one-row edge blocks of 1.0. By the
    # per-element score the edge blocks rank higher; by a plain sum (14.4 vs 4) they would not.
    lin = nn.Linear(8, 5, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.9)
        lin.weight[4].fill_(1.0)
    mask = sp.prune(lin, "block", amount=2, block=(4, 4))["weight"]
    assert not mask[:4].any() and mask[4].all()
    glob = sp.prune(nn.Sequential(lin), "block", amount=2, block=(4, 4), scope="global")["0.weight"]
    assert torch.equal(glob, mask)


def test_default_block_is_bsr_default():
    lin = _linear((64, 96), seed=2)
    masks = sp.prune(lin, "block", amount=0.5)
    assert masks.info["block"] == list(sp.constants.DEFAULT_BSR_BLOCK) == [32, 32]
    flags = _whole_blocks(masks["weight"], (32, 32))
    assert len(flags) == 6 and flags.count(False) == 3
    assert masks.info["score"] == "magnitude" and masks.info["n"] == 2.0 and masks.info["method"] == "block"


def test_block_int_amount():
    lin = _linear((10, 10))
    flags = _whole_blocks(sp.prune(lin, "block", amount=3, block=(4, 4))["weight"], (4, 4))
    assert flags.count(False) == 3 and len(flags) == 9
    assert not sp.prune(lin, "block", amount=9, block=(4, 4))["weight"].any()
    with pytest.raises(ValueError, match="larger than the 9 units"):
        sp.prune(lin, "block", amount=10, block=(4, 4))


def _two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16), nn.LayerNorm(16), nn.Linear(16, 10))
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # the first layer is far smaller: global pruning takes it first
    return model


def test_local_vs_global():
    model = _two_layers()
    local = sp.prune(model, "block", amount=0.25, block=(4, 4))
    glob = sp.prune(model, "block", amount=0.25, block=(4, 4), scope="global")
    counts = {"0.weight": 24, "2.weight": 24, "4.weight": 12}  # blocks per layer (10x16: 3 x 4)
    for name, blocks in counts.items():
        assert _whole_blocks(local[name], (4, 4)).count(False) == round(0.25 * blocks)
    pruned = {name: _whole_blocks(glob[name], (4, 4)).count(False) for name in counts}
    assert sum(pruned.values()) == round(0.25 * 60) == 15
    assert pruned == {"0.weight": 15, "2.weight": 0, "4.weight": 0}  # raw scores, no per-layer scaling
    # the global choice is the reference ranking over all blocks of all layers
    scores = [(s, name, i) for name in counts
              for i, s in enumerate(_reference_scores(dict(model.named_parameters())[name].detach().abs(), (4, 4)))]
    lowest = sorted(scores, key=lambda t: t[0])[:15]
    assert all(name == "0.weight" for _, name, _ in lowest)
    assert glob.info["scope"] == "global"


def test_global_int_amount_counts_all_blocks():
    model = _two_layers()
    glob = sp.prune(model, "block", amount=20, block=(4, 4), scope="global")
    assert sum(_whole_blocks(m, (4, 4)).count(False) for m in glob.values()) == 20
    with pytest.raises(ValueError, match="larger than the 60 units"):
        sp.prune(model, "block", amount=61, block=(4, 4), scope="global")


def test_per_layer_and_exclude():
    model = _two_layers()
    masks = sp.prune(model, "block", amount=0.5, block=(4, 4), per_layer={r"^2\.": 0.75}, exclude=("4",))
    assert list(masks) == ["0.weight", "2.weight"]  # LayerNorm never, "4" excluded
    assert _whole_blocks(masks["2.weight"], (4, 4)).count(False) == 18
    assert _whole_blocks(masks["0.weight"], (4, 4)).count(False) == 12
    # under global scope a per_layer layer is pruned locally with its own amount
    glob = sp.prune(model, "block", amount=0.5, block=(4, 4), scope="global", per_layer={r"^4\.": 0.25})
    assert _whole_blocks(glob["4.weight"], (4, 4)).count(False) == 3
    assert sum(_whole_blocks(glob[n], (4, 4)).count(False) for n in ("0.weight", "2.weight")) == 24
    assert len(sp.prune(model, "block", amount=0.5, exclude=(nn.Linear,))) == 0


def test_vit_classifier_excluded_layernorm_never(hf_vit, images):
    masks = sp.prune(hf_vit, "block", amount=0.5, block=(16, 16), exclude=("classifier",))
    assert masks and not any("classifier" in k or "norm" in k.lower() for k in masks)
    for mask in masks.values():
        _whole_blocks(mask, (16, 16))
    wanda = sp.prune(hf_vit, "block", amount=0.5, block=(16, 16), score="wanda", calibration=[images],
                     exclude=("classifier",))
    assert list(wanda) == list(masks) and wanda.info["score"] == "wanda"


def test_conv_blocks_on_gemm_rows():
    conv = nn.Conv2d(3, 8, 2)  # weight [8, 3, 2, 2] -> GEMM rows [8, 12]
    mask = sp.prune(conv, "block", amount=0.5, block=(4, 4), include=(nn.Conv2d,))["weight"]
    assert mask.shape == conv.weight.shape
    rows = mask.reshape(8, 12)
    assert _whole_blocks(rows, (4, 4)).count(False) == 3
    assert torch.equal(rows, _reference_mask(conv.weight.detach().reshape(8, 12).abs(), (4, 4), 3))


def _wanda_case():
    """Linear(8 -> 4) with two 4x4 blocks: magnitude prefers block 0, the inputs block 1."""
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight[:, :4] = 1.0
        lin.weight[:, 4:] = 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    x[:, :4] *= 0.01
    x[:, 4:] *= 10.0
    return nn.Sequential(lin), [x[:16], x[16:]]


def test_wanda_score_changes_the_choice():
    model, calibration = _wanda_case()
    mag = sp.prune(model, "block", amount=1, block=(4, 4))["0.weight"]
    wanda = sp.prune(model, "block", amount=1, block=(4, 4), score="wanda", calibration=calibration)["0.weight"]
    assert mag[:, :4].all() and not mag[:, 4:].any()
    assert wanda[:, 4:].all() and not wanda[:, :4].any()
    # the score is |W_ij|·‖X_j‖₂ over all calibration tokens, blocks ranked as for magnitude
    x = torch.cat(calibration)
    score = model[0].weight.detach().abs() * x.pow(2).sum(0).sqrt()[None, :]
    assert torch.equal(wanda, _reference_mask(score, (4, 4), 1))


def test_wanda_score_random_matches_reference():
    lin = _linear((11, 20), seed=5)
    x = torch.randn(50, 20) * torch.logspace(-1, 1, 20)
    mask = sp.prune(nn.Sequential(lin), "block", amount=0.6, block=(4, 3), score="wanda",
                    calibration=[x])["0.weight"]
    score = lin.weight.detach().abs() * x.pow(2).sum(0).sqrt()[None, :]
    k = round(0.6 * len(_blocks((11, 20), (4, 3))))
    assert torch.equal(mask, _reference_mask(score, (4, 3), k))


def test_masks_save_load_and_bsr(tmp_path):
    lin = _linear((64, 48), seed=1)
    masks = sp.prune(lin, "block", amount=0.75, block=(16, 16))
    masks.save(tmp_path / "m.safetensors")
    back = sp.MaskSet.load(tmp_path / "m.safetensors")
    assert torch.equal(back["weight"], masks["weight"]) and back.info["block"] == [16, 16]
    bsr = fm.BSR.from_dense(lin.weight.detach(), masks["weight"], block=(16, 16))
    kept = _whole_blocks(masks["weight"], (16, 16)).count(True)
    assert bsr.values.shape[0] == kept == 12 - round(0.75 * 12)


def test_bench_block_masks_is_the_public_method():
    from sparse_prune.bench import latency

    model = _two_layers()
    ours = latency.block_masks(model, 0.5, (4, 4))
    ref = sp.prune(model, "block", amount=0.5, block=(4, 4))
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("block", [0, -1, 4, (4,), "4x4", (4.0, 4.0), (True, 4), (4, False), (0, 4), (4, -1),
                                   (4, 4, 4), [4], (4, None), {4: 4}])
def test_bad_block(block):
    with pytest.raises(ValueError, match="block must be a tuple or list of two positive ints"):
        sp.prune(_two_layers(), "block", amount=0.5, block=block)


def test_block_as_list_is_accepted():
    m = _two_layers()
    assert torch.equal(sp.prune(m, "block", amount=0.5, block=[4, 1])["0.weight"],
                       sp.prune(m, "block", amount=0.5, block=(4, 1))["0.weight"])


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"amount": 1.5}, ValueError, r"amount must be a float in \[0, 1\]"),
        ({"amount": -0.1}, ValueError, r"\[0, 1\]"),
        ({"amount": float("nan")}, ValueError, "amount"),
        ({"amount": float("inf")}, ValueError, "amount"),
        ({"amount": -3}, ValueError, ">= 0"),
        ({"amount": "half"}, TypeError, "amount"),
        ({"amount": True}, TypeError, "amount"),
        ({}, TypeError, "needs amount"),
        ({"amount": 0.5, "score": "l1"}, ValueError, "score must be one of"),
        ({"amount": 0.5, "score": "wanda"}, ValueError, "calibration"),
        ({"amount": 0.5, "calibration": [torch.randn(2, 16)]}, ValueError, "score='wanda'"),
        ({"amount": 0.5, "n": 0}, ValueError, "n must be > 0"),
        ({"amount": 0.5, "n": -math.inf}, ValueError, "n must be > 0"),
        ({"amount": 0.5, "n": "nuc"}, ValueError, "n must be"),
        ({"amount": 0.5, "pattern": "2:4"}, ValueError, "pattern"),
        ({"amount": 0.5, "coupled": True}, ValueError, "coupled"),
        ({"amount": 0.5, "per_layer": {"0": 1.5}}, ValueError, "per_layer"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        sp.prune(_two_layers(), "block", **kwargs)


@pytest.mark.parametrize("kw", [{"block": (4, 4)}, {"score": "wanda"}])
def test_block_options_refused_by_other_methods(kw):
    with pytest.raises(ValueError, match="apply to method 'block'"):
        sp.prune(_two_layers(), "l1_unstructured", amount=0.5, **kw)


def test_one_d_weight_refused():
    class OneD(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5))

    with pytest.raises(ValueError, match="1-D"):
        sp.prune(nn.Sequential(OneD()), "block", amount=0.5, include=(OneD,))


# ----------------------------------------------------------------------------------------
# CLI and imports


def test_cli_prune_block(tmp_path, capsys):
    model_args = ["--model", "vit_tiny_patch16_224", "--depth", "1"]
    out = tmp_path / "m.safetensors"
    assert cli.main(["prune", *model_args, "--method", "block", "--block", "4", "1", "--amount", "0.9",
                     "--exclude", "classifier", "--out", str(out)]) == 0
    masks = sp.MaskSet.load(out)
    assert masks.info["block"] == [4, 1] and masks.info["score"] == "magnitude"
    for mask in masks.values():
        assert _whole_blocks(mask, (4, 1)).count(False) == round(0.9 * len(_blocks(mask.shape, (4, 1))))
    assert "total" in capsys.readouterr().out
    wanda = tmp_path / "w.safetensors"
    assert cli.main(["prune", *model_args, "--method", "block", "--block", "16", "16", "--score", "wanda",
                     "--calibration-batches", "1", "--out", str(wanda)]) == 0
    assert sp.MaskSet.load(wanda).info["score"] == "wanda"
    assert cli.main(["prune", *model_args, "--method", "block", "--block", "0", "1"]) == 2
    assert "block must be a tuple or list of two positive ints" in capsys.readouterr().err
    assert cli.main(["prune", *model_args, "--method", "l1_unstructured", "--block", "4", "1"]) == 2
    assert "apply to method 'block'" in capsys.readouterr().err


def _imports(path: Path) -> set[str]:
    """Every sparse_prune module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparse_prune"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sparse_prune"))
    return found


def test_no_import_circle_between_pruning_and_sparsegpt():
    pkg = Path(sp.__file__).parent
    modules = {f"sparse_prune.{p.stem}": p for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph[start])

    for a in ("sparse_prune.pruning", "sparse_prune.sparsegpt", "sparse_prune.calibration"):
        assert not reaches(a, a), f"{a} imports itself through a circle: {graph[a]}"
    assert "sparse_prune.sparsegpt" in graph["sparse_prune.pruning"]  # the direction kept
