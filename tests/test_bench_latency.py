"""The latency harness behind `sparse-prune bench` (timing itself is not asserted)."""

import json

import pytest
import torch
from torch import nn

import sparse_prune as sp
from sparse_prune import cli
from sparse_prune.bench import latency, time_interleaved


def test_time_interleaved_runs_each_in_turn():
    calls = []
    ms = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, reps=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and set(ms) == {"a", "b"}
    with pytest.raises(ValueError, match="reps"):
        time_interleaved({"a": lambda: None}, reps=0)


@pytest.mark.parametrize("block", [(16, 16), (8, 32)])
def test_block_masks_keep_whole_blocks(block):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50))
    masks = latency.block_masks(model, 0.75, block)
    mask = masks["0.weight"]
    bm, bk = block
    padded = torch.nn.functional.pad(mask, (0, -40 % bk, 0, -50 % bm))
    tiles = padded.reshape(padded.shape[0] // bm, bm, -1, bk)
    per_tile = tiles.sum((1, 3))
    full = torch.ones_like(padded).reshape(tiles.shape).sum((1, 3))
    full[-1] = (torch.nn.functional.pad(torch.ones(50, 40), (0, -40 % bk, 0, -50 % bm))
                .reshape(tiles.shape).sum((1, 3)))[-1]
    assert ((per_tile == 0) | (per_tile == full)).all()  # every tile all kept or all pruned
    kept_tiles = int((per_tile > 0).sum())
    assert kept_tiles == per_tile.numel() - round(0.75 * per_tile.numel())
    # the kept tiles are the largest by L1 norm
    w = torch.nn.functional.pad(model[0].weight.detach().abs(), (0, -40 % bk, 0, -50 % bm))
    norms = w.reshape(tiles.shape).sum((1, 3))
    assert norms[per_tile > 0].min() >= norms[per_tile == 0].max()


def test_points_grid_and_errors():
    grid = latency.points(["dense", "2:4", "csr"], ["torch", "triton"], [0.5, 0.9])
    assert ("dense", "torch", 0.5) in grid and ("dense", "triton", 0.5) not in grid
    assert [p for p in grid if p[0] == "2:4"] == [("2:4", "torch", 0.5), ("2:4", "triton", 0.5)]
    with pytest.raises(ValueError, match="formats"):
        latency.points(["coo"], ["torch"], [0.5])
    with pytest.raises(ValueError, match="backends"):
        latency.points(["csr"], ["opencl"], [0.5])
    with pytest.raises(ValueError, match="sparsity"):
        latency.points(["csr"], ["torch"], [1.0])


def test_bench_e2e_rows(hf_vit):
    rows = latency.bench_e2e(hf_vit, "tiny", 32, formats=["shrink", "csr", "2:4"], backends=["torch"],
                             sparsities=[0.5], batches=[1, 2], reps=1, warmup=0, progress=False)
    assert len(rows) == 6
    for r in rows:
        assert set(latency.ROW_KEYS) <= set(r) and r["kind"] == "e2e"
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        assert r["dense_bytes"] > 0 and r["bytes"] > 0
    shrink = next(r for r in rows if r["format"] == "shrink")
    assert shrink["bytes"] < shrink["dense_bytes"]


def test_bench_refuses_a_wrong_conversion(hf_vit, monkeypatch):
    real = latency.convert

    def broken(*args, **kwargs):
        model = real(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, sp.SparseLinear):
                m.values.mul_(2)
        return model

    monkeypatch.setattr(latency, "convert", broken)
    kw = dict(formats=["csr"], backends=["torch"], sparsities=[0.5], batches=[1], reps=1, warmup=0, progress=False)
    with pytest.raises(RuntimeError, match="differs from the masked dense"):
        latency.bench_e2e(hf_vit, "tiny", 32, **kw)
    skipped = []  # with a list, the wrong point is reported and the grid goes on, untimed
    assert latency.bench_e2e(hf_vit, "tiny", 32, skipped=skipped, **kw) == []
    assert skipped and skipped[0].startswith("WRONG RESULT")


def test_bench_layers_rows():
    rows = latency.bench_layers([(40, 32)], "tiny", 5, formats=["bsr", "csr"], backends=["torch"],
                                sparsities=[0.75], batches=[1], reps=1, warmup=0, progress=False)
    assert [r["format"] for r in rows] == ["bsr", "csr"] and all(r["kind"] == "layer" for r in rows)
    assert rows[0]["shape"] == [40, 32]


def test_cli_bench(tmp_path, capsys):
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--depth", "1", "--formats", "shrink", "csr",
                   "--sparsity", "0.5", "--batch", "1", "--reps", "1", "--layers", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "latency.json").read_text())
    assert {r["kind"] for r in rows} == {"e2e", "layer"}
    assert (tmp_path / "latency.md").exists() and (tmp_path / "speedup.png").exists()
    assert "| 1 | shrink |" in capsys.readouterr().out
    assert cli.main(["bench", "--cuda-graphs", "--out", str(tmp_path)]) == 2
