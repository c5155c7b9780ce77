"""convert(format="auto"): per-layer choice by measurement, dense included, cached."""

import copy
import json

import pytest
import torch

import sparse_prune as sp
from sparse_prune import auto


def _fake_timer(winner):
    """Candidates (and whole-model plans) named after ``winner`` take half the time; the
    per-layer plan is the winner's plan too unless dense wins."""
    calls = []

    def fast(name):
        if name.startswith("model:"):
            plan = name.removeprefix("model:")
            return plan.startswith(winner) or (plan == "per-layer" and winner != "dense")
        return name.startswith(winner)

    def timer(fns, device="cpu", warmup=2, reps=5):
        calls.append(sorted(fns))
        return {name: (0.5 if fast(name) else 1.0) for name in fns}

    return timer, calls


@pytest.mark.parametrize("winner,expect", [("csr", "auto:csr"), ("dense", "auto:dense"), ("2:4", "auto:2:4")])
def test_auto_keeps_the_fastest(hf_vit, images, monkeypatch, winner, expect):
    timer, calls = _fake_timer(winner)
    monkeypatch.setattr(auto, "time_interleaved", timer)
    masks = sp.prune(hf_vit, "nm")  # 2:4 masks fit 2:4, csr, bsr
    fast = sp.convert(hf_vit, masks, format="auto", example_inputs=images)
    rows = {r["name"]: r for r in sp.report(fast)}
    assert rows["vit.layers.0.mlp.fc1"]["format"] == expect
    assert rows["vit.layers.0.mlp.fc1"]["auto_speedup"] == pytest.approx(1.0 if winner == "dense" else 2.0)
    layer_calls = [c for c in calls if not c[0].startswith("model:")]
    full = [c for c in layer_calls if len(c) > 2]  # every candidate; then the winner alone against dense
    assert full and all("dense" in c and any(n.startswith("2:4") for n in c) for c in full)
    confirms = [c for c in layer_calls if len(c) == 2]
    assert all("dense" in c and any(n.startswith(winner) for n in c) for c in confirms)
    assert len(confirms) == (0 if winner == "dense" else len(full))
    # then the whole model: the per-layer plan against dense (and again alone when it won)
    model_calls = [c for c in calls if c[0].startswith("model:")]
    if winner == "dense":  # no layer chose a sparse format; each format on every layer is timed, loses
        assert model_calls == [["model:2:4:all", "model:csr:all", "model:dense"]]
    else:
        # every plan (the other format on every layer among them), then the winner alone against dense
        other = "2:4" if winner == "csr" else "csr"
        assert model_calls == [sorted([f"model:{other}:all", "model:dense", "model:per-layer"]),
                               ["model:dense", "model:per-layer"]]
        assert "whole model: per-layer plan" in rows["vit.layers.0.mlp.fc1"]["why"]
    expected = masks.apply(copy.deepcopy(hf_vit))(images).logits
    torch.testing.assert_close(fast(images).logits, expected, rtol=1e-5, atol=1e-5)
    assert "auto_speedup" in sp.format_report(sp.report(fast))


def test_auto_measures_for_real_and_caches(hf_vit, images, tmp_path, monkeypatch):
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.8)
    cache = tmp_path / "auto.json"
    fast = sp.convert(hf_vit, masks, format="auto", example_inputs=images, cache=str(cache))
    assert cache.exists()
    expected = masks.apply(copy.deepcopy(hf_vit))(images).logits
    torch.testing.assert_close(fast(images).logits, expected, rtol=1e-5, atol=1e-5)
    stored = json.loads(cache.read_text())
    assert stored and all(k.startswith(auto._versions(torch.device("cpu"))) for k in stored)  # device + versions
    models = {k: v for k, v in stored.items() if "|model|" in k}
    assert len(models) == 1  # the whole-model choice, with the plans it timed
    (record,) = models.values()
    assert record["plan"] in record["ms"] and "dense" in record["ms"]  # "per-layer" too unless it was dense
    if record["plan"] != "dense":
        assert record["ms"]["dense"] >= auto.MODEL_MARGIN * record["ms"][record["plan"]]
        assert record["confirm"]["dense"] >= auto.MODEL_MARGIN * record["confirm"][record["plan"]]
    for decision in (v for k, v in stored.items() if "|model|" not in k):  # sparse only when it beat dense by the margin, twice
        best = min(decision["ms"], key=decision["ms"].get)
        if decision["format"] != "dense":
            assert best.startswith(decision["format"])
            assert decision["ratio"] == pytest.approx(decision["ms"]["dense"] / decision["ms"][best])
            assert decision["ratio"] >= auto.SPARSE_MARGIN
            confirm = decision["confirm"]
            assert confirm["dense"] >= auto.SPARSE_MARGIN * confirm[best]
        else:
            assert best == "dense" or decision["ms"]["dense"] < auto.SPARSE_MARGIN * decision["ms"][best] or (
                decision["confirm"] is not None)
    plan = record["plan"]
    for r in sp.report(fast):
        assert r["format"].startswith("auto:")
        assert f"whole model: {plan} plan" in r["why"]
        if plan == "dense":
            assert r["format"] == "auto:dense"
        # 80% unstructured: 2:4 cannot take it
        assert r["format"] != "auto:2:4"
    timer, calls = _fake_timer("dense")
    monkeypatch.setattr(auto, "time_interleaved", timer)
    again = sp.convert(hf_vit, masks, format="auto", example_inputs=images, cache=str(cache))
    assert calls == []  # every decision came from the cache, the whole-model one too
    assert [r["format"] for r in sp.report(again)] == [r["format"] for r in sp.report(fast)]
    # another build of our kernels: nothing measured with the old one is reused
    monkeypatch.setattr(auto.ops, "kernel_builds", lambda: "_C_cpu:000000000000")
    sp.convert(hf_vit, masks, format="auto", example_inputs=images, cache=str(cache))
    assert calls and any(c[0].startswith("model:") for c in calls)


def test_kernel_builds_fingerprint_the_loaded_libraries():
    builds = auto.ops.kernel_builds()
    if auto.ops.has_cpu_extension():
        (cpu,) = [b for b in builds.split(",") if b.startswith("_C_cpu:")]
        assert len(cpu) == len("_C_cpu:") + 12 and int(cpu.split(":")[1], 16) >= 0
    assert builds in auto._versions(torch.device("cpu"))


def test_auto_needs_example_inputs(hf_vit):
    masks = sp.prune(hf_vit, "nm")
    with pytest.raises(ValueError, match="example_inputs"):
        sp.convert(hf_vit, masks, format="auto")
    with pytest.raises(ValueError, match="unknown format 'coo'; allowed: auto"):
        sp.convert(hf_vit, masks, format="coo")


def _layer_and_model_timer(layer_ms, model_ms):
    """Per-layer rounds: the first prefix of ``layer_ms`` a candidate starts with (else 1.0);
    whole-model rounds: ``model_ms`` by plan label (else 1.0)."""
    calls = []

    def timer(fns, device="cpu", warmup=2, reps=5):
        calls.append(sorted(fns))
        out = {}
        for name in fns:
            if name.startswith("model:"):
                out[name] = model_ms.get(name.removeprefix("model:"), 1.0)
            else:
                out[name] = next((v for k, v in layer_ms.items() if name.startswith(k)), 1.0)
        return out

    return timer, calls


def test_auto_whole_model_overrules_the_layers(hf_vit, images, monkeypatch):
    """Each layer alone prefers BSR, the model runs faster on CSR: the csr plan is built."""
    timer, calls = _layer_and_model_timer({"bsr": 0.4, "csr": 0.5}, {"csr": 0.3})
    monkeypatch.setattr(auto, "time_interleaved", timer)
    masks = sp.prune(hf_vit, "l1_unstructured", amount=0.9)  # fits csr and (1-0.9^4 stored) bsr 4x1
    fast = sp.convert(hf_vit, masks, format="auto", example_inputs=images)
    rows = sp.report(fast)
    assert {r["format"] for r in rows} == {"auto:csr"}, [(r["name"], r["why"]) for r in rows][:3]
    assert all("whole model: csr plan, 3.33x dense" in r["why"] for r in rows)
    timed_plans = [c for c in calls if c[0].startswith("model:")][0]
    # per-layer: BSR where a block fits within BSR_MAX_STORED, CSR elsewhere
    assert {"model:bsr", "model:csr", "model:dense", "model:per-layer"} <= set(timed_plans)
    expected = masks.apply(copy.deepcopy(hf_vit))(images).logits
    torch.testing.assert_close(fast(images).logits, expected, rtol=1e-5, atol=1e-5)


def test_auto_model_not_faster_than_dense_stays_dense(hf_vit, images, monkeypatch):
    """Every layer beat dense alone, the whole model does not by MODEL_MARGIN: all dense."""
    timer, _ = _layer_and_model_timer({"csr": 0.5}, {"per-layer": 1.0 / (auto.MODEL_MARGIN * 0.99)})
    monkeypatch.setattr(auto, "time_interleaved", timer)
    masks = sp.prune(hf_vit, "nm")
    fast = sp.convert(hf_vit, masks, format="auto", example_inputs=images)
    rows = sp.report(fast)
    assert {r["format"] for r in rows} == {"auto:dense"}
    assert all("whole model: dense plan" in r["why"] for r in rows)
    assert not any(isinstance(m, sp.SparseLinear) for m in fast.modules())


def test_auto_inplace_converts_the_users_model(hf_vit, images, monkeypatch):
    """The whole-model plans are timed on copies; the winner is built into the model itself."""
    timer, _ = _fake_timer("csr")
    monkeypatch.setattr(auto, "time_interleaved", timer)
    model = copy.deepcopy(hf_vit)
    masks = sp.prune(model, "nm")
    out = sp.convert(model, masks, format="auto", example_inputs=images, inplace=True)
    assert out is model
    assert any(isinstance(m, sp.SparseLinear) for m in model.modules())
    assert {r["format"] for r in sp.report(model)} == {"auto:csr"}


@pytest.mark.parametrize("edit", [
    lambda e: e.update(plan=[]),                      # unhashable: must not crash
    lambda e: e.update(plan="per-layer", ratio=1.0, ms={"dense": 1.0, "per-layer": 1.0}),  # breaks the rule
    lambda e: e.update(ms=None),
    lambda e: e.update(confirm={"dense": "x"}),
])
def test_edited_model_record_is_remeasured(hf_vit, images, tmp_path, monkeypatch, edit):
    timer, calls = _fake_timer("csr")
    monkeypatch.setattr(auto, "time_interleaved", timer)
    masks = sp.prune(hf_vit, "nm")
    cache = tmp_path / "auto.json"
    sp.convert(hf_vit, masks, format="auto", example_inputs=images, cache=str(cache))
    store = json.loads(cache.read_text())
    for key, entry in store.items():
        if "|model|" in key:
            edit(entry)
        else:
            entry["ms"] = None  # a layer record without its rounds: plans fall back to dense there
    cache.write_text(json.dumps(store))
    calls.clear()
    again = sp.convert(hf_vit, masks, format="auto", example_inputs=images, cache=str(cache))
    assert [c for c in calls if c[0].startswith("model:")]  # the whole model was measured again
    torch.testing.assert_close(again(images).logits, masks.apply(copy.deepcopy(hf_vit))(images).logits,
                               rtol=1e-5, atol=1e-5)


def test_model_record_depends_on_fusion(hf_vit, images, tmp_path, monkeypatch):
    timer, calls = _fake_timer("csr")
    monkeypatch.setattr(auto, "time_interleaved", timer)
    masks = sp.prune(hf_vit, "nm")
    cache = tmp_path / "auto.json"
    sp.convert(hf_vit, masks, format="auto", example_inputs=images, cache=str(cache))
    calls.clear()
    sp.convert(hf_vit, masks, format="auto", example_inputs=images, cache=str(cache), fuse_activations=False)
    assert [c for c in calls if c[0].startswith("model:")]  # other models: measured, not the fused record
    assert sum("|model|" in k for k in json.loads(cache.read_text())) == 2


def test_auto_drops_a_plan_whose_forward_fails(hf_vit, images, monkeypatch):
    timer, calls = _fake_timer("csr")
    monkeypatch.setattr(auto, "time_interleaved", timer)

    def broken(self, x):
        raise RuntimeError("boom")

    monkeypatch.setattr(sp.SparseMLP, "forward", broken)  # every sparse plan here fuses the MLPs
    masks = sp.prune(hf_vit, "nm")
    with pytest.warns(UserWarning, match="the per-layer plan's forward failed on example_inputs, so it is not timed: RuntimeError: boom"):
        fast = sp.convert(hf_vit, masks, format="auto", example_inputs=images)
    assert [c for c in calls if c[0].startswith("model:")] == [["model:dense"]]
    assert {r["format"] for r in sp.report(fast)} == {"auto:dense"}
