"""The latency harness behind `sparse-prune bench` (timing itself is not asserted)."""

import json
import platform
import shutil

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
    # real (unpadded) weights per tile: edge tiles in the last row *and* the last column are partial
    full = torch.nn.functional.pad(torch.ones(50, 40), (0, -40 % bk, 0, -50 % bm)).reshape(tiles.shape).sum((1, 3))
    assert ((per_tile == 0) | (per_tile == full)).all()  # every tile all kept or all pruned
    kept_tiles = int((per_tile > 0).sum())
    assert kept_tiles == per_tile.numel() - round(0.75 * per_tile.numel())
    # the kept tiles are the largest by L2 norm per element (RMS: edge tiles hold fewer weights)
    w = torch.nn.functional.pad(model[0].weight.detach(), (0, -40 % bk, 0, -50 % bm))
    rms = w.pow(2).reshape(tiles.shape).sum((1, 3)).sqrt() / full.sqrt()
    assert rms[per_tile > 0].min() >= rms[per_tile == 0].max()
    # one implementation: the bench's helper is the public method
    assert torch.equal(mask, sp.prune(model, "block", amount=0.75, block=block)["0.weight"])
    assert masks.info["method"] == "block" and masks.info["block"] == list(block)


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


FORMATS = ["dense", "shrink", "csr", "2:4", "bsr"]


def test_bench_e2e_rows_pass_the_rule_and_carry_counts_and_spreads(hf_vit):
    rows = latency.bench_e2e(hf_vit, "tiny", 32, formats=FORMATS, backends=["torch"], sparsities=[0.5],
                             batches=[1, 2], reps=3, warmup=0, progress=False)
    assert [(r["batch"], r["format"]) for r in rows] == [(b, f) for b in (1, 2) for f in FORMATS]
    masked = 2 * 6  # 2 blocks x (q, k, v, o, fc1, fc2); the classifier is excluded
    for r in rows:
        assert set(latency.ROW_KEYS) <= set(r) and r["kind"] == "e2e"
        assert r["status"] == "ok", r["reason"]  # fp32 on the CPU: every format within the shared rule
        assert r["error"] <= r["allowed"] == pytest.approx(2 * r["baseline_error"] + torch.finfo(torch.float32).eps)
        assert r["converted_layers"] == masked and r["dense_layers"] == 0 and r["warning"] is None
        assert r["reps"] == 3
        for side in ("dense", "sparse"):
            assert r[f"{side}_q1"] <= r[f"{side}_ms"] <= r[f"{side}_q3"]
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    shrink = next(r for r in rows if r["format"] == "shrink")
    dense = next(r for r in rows if r["format"] == "dense")
    assert shrink["bytes"] < shrink["dense_bytes"] == dense["bytes"]


def test_layers_left_dense_are_counted_and_warned(hf_vit):
    masks = latency.natural_masks(hf_vit, "2:4", 0.5)
    name = "vit.layers.0.mlp.fc1.weight"
    odd = sp.MaskSet({**dict(masks.items()), name: torch.rand(masks[name].shape) < 0.5})  # not 2:4
    with pytest.warns(UserWarning, match="left 1 masked weight"):  # the bench no longer hides it
        fast, text = latency._convert(hf_vit, odd, "2:4", "torch")
    assert "mlp.fc1" in text
    assert latency.layer_counts(fast, odd) == (11, 1)
    assert latency.layer_counts(latency._convert(hf_vit, masks, "2:4", "torch")[0], masks) == (12, 0)


def _scale_sparse_outputs(monkeypatch, factor=1.02):
    real = sp.SparseLinear.forward
    monkeypatch.setattr(sp.SparseLinear, "forward", lambda self, x: real(self, x) * factor)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_a_wrong_conversion_is_a_wrong_row_and_the_grid_goes_on(hf_vit, monkeypatch, fmt):
    _scale_sparse_outputs(monkeypatch)  # every SparseLinear 2% off
    rows = latency.bench_e2e(hf_vit, "tiny", 32, formats=["shrink", fmt], backends=["torch"], sparsities=[0.5],
                             batches=[1], reps=1, warmup=0, progress=False)
    shrink, wrong = rows  # coupled shrink leaves plain (cut) Linears: untouched by the patch, still timed
    assert shrink["status"] == "ok" and shrink["sparse_ms"] is not None
    assert wrong["status"] == "wrong" and wrong["error"] > wrong["allowed"] > wrong["baseline_error"]
    assert "exceeds the allowed" in wrong["reason"] and wrong["sparse_ms"] is None and wrong["speedup"] is None
    assert wrong["converted_layers"] == 12 and latency.bad_rows(rows) == [wrong]
    md = latency.markdown(rows)
    assert md.index("**WRONG**") < md.index("| ok |") and f"WRONG: {fmt}/torch" in md


def test_bench_layers_rows_and_wrong_layers(monkeypatch):
    kw = dict(formats=["bsr", "csr", "dense", "2:4"], backends=["torch"], sparsities=[0.75], batches=[1], reps=2,
              warmup=0, progress=False)
    rows = latency.bench_layers([(40, 32)], "tiny", 5, **kw)
    assert [r["format"] for r in rows] == ["bsr", "csr", "dense", "2:4"]
    for r in rows:
        assert r["kind"] == "layer" and r["shape"] == [40, 32] and r["status"] == "ok", r["reason"]
        assert (r["converted_layers"], r["dense_layers"]) == (1, 0) and r["dense_q1"] <= r["dense_ms"]
    _scale_sparse_outputs(monkeypatch, 1.0 + 1e-5)  # far below any absolute tolerance, 40x eps(fp32)
    rows = latency.bench_layers([(40, 32)], "tiny", 5, **kw)
    assert {r["status"] for r in rows} == {"wrong"}


def test_refused_conversions_are_skipped_rows(hf_vit, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("backend 'triton' cannot run here")

    monkeypatch.setattr(latency, "convert", refuse)
    rows = latency.bench_e2e(hf_vit, "tiny", 32, formats=["csr"], backends=["triton"], sparsities=[0.5],
                             batches=[1], reps=1, warmup=0, progress=False)
    assert [(r["status"], r["reason"]) for r in rows] == [("skipped", "backend 'triton' cannot run here")]
    assert not latency.bad_rows(rows)
    assert "skipped: e2e csr/triton sparsity 0.50 batch 1: backend 'triton' cannot run here" in latency.markdown(rows)


def test_a_crashing_conversion_is_a_failed_row(hf_vit, monkeypatch):
    def boom(self, x):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(sp.SparseLinear, "forward", boom)
    rows = latency.bench_e2e(hf_vit, "tiny", 32, formats=["csr"], backends=["torch"], sparsities=[0.5],
                             batches=[1], reps=1, warmup=0, progress=False)
    assert rows[0]["status"] == "failed" and "kernel exploded" in rows[0]["reason"]
    assert latency.bad_rows(rows) == rows

    def broken_convert(*args, **kwargs):
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(latency, "convert", broken_convert)
    rows = latency.bench_layers([(40, 32)], "tiny", 5, formats=["csr"], backends=["torch"], sparsities=[0.5],
                                batches=[1], reps=1, warmup=0, progress=False)
    assert [(r["status"], r["reason"]) for r in rows] == [("failed", "convert: IndexError: index 7 is out of bounds")]


def test_the_checked_output_is_the_timed_runners(hf_vit, monkeypatch):
    """Under --compile the runner's first output is checked: a model that is right in eager
    mode and wrong compiled is caught (here: compile swapped for a wrapper that scales)."""
    class Scaled(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            out = self.m(x)
            return out.logits * (1.02 if any(isinstance(t, sp.SparseLinear) for t in self.m.modules()) else 1.0)

    monkeypatch.setattr(torch, "compile", Scaled)
    rows = latency.bench_e2e(hf_vit, "tiny", 32, formats=["dense", "csr"], backends=["torch"], sparsities=[0.5],
                             batches=[1], reps=1, warmup=0, compile_=True, progress=False)
    assert [r["status"] for r in rows] == ["wrong", "wrong"] and all(r["compile"] for r in rows)


@pytest.mark.gpu
def test_cuda_graph_runner_returns_the_replayed_output():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48).cuda()
    x = torch.randn(5, 64, device="cuda")
    run = latency._runner(layer, x, compile_=False, graphs=True)
    out = run()
    torch.testing.assert_close(out, layer(x))
    with torch.no_grad():
        layer.weight.mul_(2)  # the replay reads the live weights: the static output follows
    assert run() is out
    torch.testing.assert_close(out, layer(x))


def test_cli_bench(tmp_path, capsys):
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--depth", "1", "--formats", "shrink", "csr",
                   "--sparsity", "0.5", "--batch", "1", "--reps", "1", "--layers", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "latency.json").read_text())
    assert {r["kind"] for r in rows} == {"e2e", "layer"} and {r["status"] for r in rows} == {"ok"}
    assert (tmp_path / "latency.md").exists() and (tmp_path / "speedup.png").exists()
    assert "| 1 | shrink | torch | 0.50 | ok |" in capsys.readouterr().out
    assert cli.main(["bench", "--cuda-graphs", "--out", str(tmp_path)]) == 2


def test_cli_bench_exits_nonzero_on_a_wrong_point(tmp_path, capsys, monkeypatch):
    _scale_sparse_outputs(monkeypatch)
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--depth", "1", "--formats", "dense", "csr",
                   "--sparsity", "0.5", "--batch", "1", "--reps", "1", "--out", str(tmp_path)])
    assert rc == 1
    rows = json.loads((tmp_path / "latency.json").read_text())
    assert [r["status"] for r in rows] == ["wrong", "wrong"]  # format "dense" is a SparseLinear too
    assert all(r["error"] > r["allowed"] for r in rows)
    assert "WRONG or FAILED" in capsys.readouterr().err


def _gpu_kernels():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_kernels_checks_each_variant_before_timing():
    gk = _gpu_kernels()
    torch.manual_seed(0)
    w, x = torch.randn(24, 32), torch.randn(7, 32)
    timed = []

    def timer(fn):
        timed.append(fn)
        return 1.0, 2.0, 3.0

    def raises():
        raise RuntimeError("no kernel image")

    def unavailable():
        raise gk.Unavailable("no CUDA extension")

    cases = {
        "right": gk.Variant("csr", "triton", w, 0.0, lambda: ((lambda: x @ w.t()), 100)),
        "wrong": gk.Variant("csr", "cuda", w, 0.0, lambda: ((lambda: x @ w.t() * (1 + 1e-5)), 100)),
        "crash": gk.Variant("bsr", "triton", w, 0.0, lambda: ((lambda: raises()), 100)),
        "peer_crash": gk.Variant("2:4", "cutlass", w, 0.0, lambda: ((lambda: raises()), None)),
        "peer_missing": gk.Variant("bsr", "torch.sparse._triton_ops.bsr_dense_mm", w, 0.0, unavailable),
        "ours_missing": gk.Variant("2:4", "cuda", w, 0.0, unavailable),
    }
    rows = {name: {"batch": 1, **gk.measure(v, x, (0.5, 1.0, 1.5), timer)} for name, v in cases.items()}
    assert timed == [cases["right"].fn]  # only the checked, right variant was timed
    assert rows["right"]["status"] == "ok" and rows["right"]["speedup"] == 0.5 and rows["right"]["sparse_q3"] == 3.0
    assert rows["wrong"]["status"] == "wrong" and rows["wrong"]["error"] > rows["wrong"]["allowed"]
    assert rows["crash"]["status"] == "failed" and "no kernel image" in rows["crash"]["reason"]
    assert [rows[k]["status"] for k in ("peer_crash", "peer_missing", "ours_missing")] == ["skipped"] * 3
    md = gk.markdown(list(rows.values()), "header")
    assert md.index("**WRONG**") < md.index("**FAILED**") < md.index("| ok |")
    assert "skipped: bsr/torch.sparse._triton_ops.bsr_dense_mm: no CUDA extension" in md


def test_gpu_kernels_variants_name_their_backends():
    gk = _gpu_kernels()
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), torch.randn(4, 64)
    vs = gk.variants(w, x)
    names = [f"{v.format}/{v.backend}" for v in vs]
    assert names == ["csr/triton", "bsr/triton", "2:4/triton", "csr/cuda", "2:4/cuda", "2:4/cusparselt-searched",
                     "2:4/cutlass-sm90", "2:4/cutlass-sm90-128x128x128", "2:4/cutlass-sm90-128x64x128",
                     "csr/torch.sparse",
                     "bsr/torch.sparse", "bsr/torch.sparse._triton_ops.bsr_dense_mm", "2:4/cusparselt", "2:4/cutlass"]
    peer = next(v for v in vs if v.backend == "torch.sparse" and v.format == "csr")
    row = gk.measure(peer, x, (1.0, 1.0, 1.0), lambda fn: (1.0, 1.0, 1.0))  # runs on the CPU too
    assert row["status"] == "ok", row["reason"]


def _load_benchmark(name):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarize_shows_wrong_rows_first_and_fails(tmp_path, capsys):
    summarize = _load_benchmark("summarize")
    ok = latency._blank(kind="e2e", batch=1, format="csr", backend="triton", sparsity=0.9, status="ok",
                        dense_ms=2.0, dense_q1=1.9, dense_q3=2.1, sparse_ms=1.0, sparse_q1=0.9, sparse_q3=1.1,
                        speedup=2.0, converted_layers=72, dense_layers=0)
    wrong = {**ok, "format": "bsr", "status": "wrong", "reason": "bsr/triton: relative error 0.02 exceeds",
             "sparse_ms": None, "speedup": None}
    skipped = {**ok, "format": "2:4", "status": "skipped", "reason": "refused", "speedup": None}
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "latency.json").write_text(json.dumps([ok, wrong, skipped]))
    assert summarize.main(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert out.index("**WRONG**") < out.index("| e2e | 1 | csr | triton | 0.90 | 72 / 0 | 1.000 (0.900-1.100) | 2.00x |")
    assert "relative error 0.02" in out and "1 point(s) skipped" in out
    (tmp_path / "e2e" / "latency.json").write_text(json.dumps([ok]))
    assert summarize.main(str(tmp_path)) == 0


def test_points_leave_out_formats_a_backend_has_no_kernel_for():
    grid = latency.points(["csr", "bsr", "2:4"], ["cuda", "cuda:sm90", "cusparselt", "triton"], [0.9])
    assert ("2:4", "cuda:sm90", 0.5) in grid and ("2:4", "cusparselt", 0.5) in grid and ("csr", "cuda", 0.9) in grid
    assert not [p for p in grid if p[1] in ("cuda:sm90", "cusparselt") and p[0] != "2:4"]
    assert ("bsr", "cuda", 0.9) not in grid and ("bsr", "triton", 0.9) in grid


def test_auto_is_a_bench_point(hf_vit):
    """format="auto" measured on the timed batch: a row like the others, checked and timed."""
    rows = latency.bench_e2e(hf_vit, "tiny", 32, formats=["auto"], backends=["torch"], sparsities=[0.9],
                             batches=[1], reps=1, warmup=0, progress=False)
    assert [(r["format"], r["status"]) for r in rows] == [("auto", "ok")]
    assert rows[0]["error"] <= rows[0]["allowed"] and rows[0]["converted_layers"] + rows[0]["dense_layers"] > 0
    with pytest.raises(ValueError, match="formats"):
        latency.points(["coo"], ["torch"], [0.5])


def test_cli_bench_with_our_attention_records_it(tmp_path, capsys):
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--depth", "1", "--formats", "csr", "--attention",
                   "sparse_prune", "--sparsity", "0.5", "--batch", "1", "--reps", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "latency.json").read_text())
    assert rows and {r["attention"] for r in rows} == {"sparse_prune"} and {r["status"] for r in rows} == {"ok"}
    assert "attention sparse_prune" in rows[0]["model"]
    capsys.readouterr()
    assert cli.main(["bench", "--source", "timm", "--attention", "sparse_prune", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs --source transformers" in err and len(err.splitlines()) == 1


def test_cpu_limits_brackets_the_fixed_cost_of_a_call(tmp_path, monkeypatch):
    """benchmarks/cpu_limits.py: the least-squares line, a tiny shape end to end (checked against
    masked dense, every row present, the fit through exactly the csr rows at FIT), its Markdown,
    a run without a fitted rate, and --rederive of a run written before the probe bracket."""
    cl = _load_benchmark("cpu_limits")
    fixed, slope = cl.line([100, 200, 300, 400], [1.5 + 0.01 * x for x in (100, 200, 300, 400)])
    assert fixed == pytest.approx(1.5) and slope == pytest.approx(0.01)
    assert cl.span_of(0.25, 0.5, "{:.0%}") == "25%-50%" and cl.span_of(0.5, 0.5, "{:.0%}") == "50%"
    assert cl.span_of(None, 0.5, "{:.0%}") == "50%" and cl.span_of(None, None, "{:.0%}") == "-"
    assert cl.fma_peak("portable", 1) is None  # no vector width to measure for the portable kernels
    monkeypatch.setattr(cl, "SHAPES", {"tiny": (24, 40)})
    rows = cl.bench_shape("tiny", 5, 1, torch.Generator().manual_seed(0))
    labels = [r["variant"] for r in rows]
    assert labels == ["dense", *[f"csr {s:.0%}" for s in cl.FIT], "csr 99.9%", "2:4"]
    dense, probe, semi = rows[0], rows[-2], rows[-1]
    assert all(r["ms"] > 0 and r["cold_ms"] > 0 for r in rows)
    fitted = [r for r in rows if r.get("fit")]
    assert [r["variant"] for r in fitted] == labels[1:-2]  # neither the probe nor 2:4 (sparsity 0.5 too)
    intercept, per_weight = cl.line([r["kept"] for r in fitted], [r["ms"] for r in fitted])
    assert dense["fit_fixed_ms"] == pytest.approx(intercept) and dense["probe_ms"] == probe["ms"]
    assert all(r["fixed_share_probe"] == pytest.approx(probe["ms"] / r["ms"]) for r in fitted)
    assert all(r["fixed_share_fit"] == pytest.approx(intercept / r["ms"]) for r in fitted)
    assert probe["fixed_share_fit"] is None and semi["fixed_share_probe"] is None
    assert semi["speedup"] == pytest.approx(dense["ms"] / semi["ms"])
    meta = {"device": "cpu", "threads": 1, "cpu_isa": "portable", "torch": torch.__version__, "commit": "x",
            "rounds": 1, "vector": "portable", "fma_peak_gflops": None}
    text = cl.write(rows, meta, tmp_path, "limits").read_text()
    assert "FMA peak (portable, 1 threads, benchmarks/fma_peak.c): not measured." in text
    assert "| tiny, 5 |" in text and "### tiny [24x40], M = 5" in text and "| 2:4 |" in text
    assert json.loads((tmp_path / "limits.json").read_text())["rows"] == json.loads(json.dumps(rows))
    flat = [dict(r) for r in rows]
    flat[0]["fit_marginal_gflops"] = None  # a fit whose slope came out <= 0
    assert "| tiny, 5 |" in cl.write(flat, {**meta, "fma_peak_gflops": 100.0}, tmp_path, "flat").read_text()
    old = [{k: v for k, v in r.items() if k not in ("fit", "probe", "fixed_share_probe", "fixed_share_fit")}
           for r in rows]
    old[1]["fixed_share"] = 0.5  # bf51fca's one-sided column: dropped
    assert cl.derive(cl.upgrade(old)) == rows


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not (shutil.which("cc") or shutil.which("gcc")),
                    reason="fma_peak.c is x86-64 C, built with cc")
def test_fma_peak_builds_and_measures():
    cl = _load_benchmark("cpu_limits")
    if sp.ops.cpu_isa() not in ("avx2", "avx512"):
        pytest.skip("the CPU has no AVX2+FMA")
    peak = cl.fma_peak("avx2", 1)
    assert peak is not None, "benchmarks/fma_peak.c did not build or run with cc -fopenmp"
    assert peak > 1.0
