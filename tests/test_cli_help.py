"""The CLI helps: every option has help and no markup; prune always says where the masks
went; report says which flags a Python-saved checkpoint needs; bench and its plot name what
they measured."""

import argparse
import json

import pytest

import sparse_prune as sp
from sparse_prune import cli
from sparse_prune.bench import latency

TINY = ["--model", "vit_tiny_patch16_224", "--depth", "1"]


class _Parsed(Exception):
    pass


def _parser(monkeypatch) -> argparse.ArgumentParser:
    """The parser main() builds, caught as it parses."""
    def catch(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed) as info:
        cli.main(["prune"])
    return info.value.args[0]


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_plain_help(monkeypatch):
    parser = _parser(monkeypatch)
    commands = _subparsers(parser)
    assert set(commands) == {"demo", "prune", "convert", "report", "bench", "accuracy"}
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{label} has no help"
            assert "`" not in action.help, f"{label}: markup in its help"
        text = sub.format_help()
        assert "`" not in text and "``" not in text, name
    assert "`" not in parser.format_help()


@pytest.mark.parametrize("command", ["", "demo", "prune", "convert", "report", "bench", "accuracy"])
def test_help_prints_without_markup(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sparse-prune") and "`" not in out


def test_prune_without_out_writes_a_default_and_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prune", *TINY, "--method", "ln_structured", "--amount", "0.5", "--coupled"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "results" / "prune" / "vit_tiny_patch16_224-ln_structured.safetensors"
    assert path.is_file()
    assert "wrote results/prune/vit_tiny_patch16_224-ln_structured.safetensors (default; --out PATH" in out
    assert "coupled: 1 MLP group(s), 1 attention-head group(s)" in out  # the coupled summary
    assert "classifier left dense (--include-classifier prunes it): classifier.weight" in out
    masks = sp.MaskSet.load(path)
    assert "classifier.weight" not in masks
    assert cli.main(["prune", *TINY, "--method", "ln_structured", "--amount", "0.5", "--include-classifier",
                     "--out", "with.safetensors"]) == 0
    assert "classifier.weight" in sp.MaskSet.load(tmp_path / "with.safetensors")


def test_report_on_a_python_checkpoint_names_the_flags(hf_vit, tmp_path, capsys):
    fast = sp.convert(hf_vit, sp.prune(hf_vit, "l1_unstructured", amount=0.5), format="csr")
    sp.save(fast, tmp_path)  # from Python: no model.json
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model NAME --source transformers|timm|torchvision" in err and "no model.json" in err
    assert "the default skeleton was tried (vit_base_patch16_224 from transformers)" in err


def test_model_label_names_depth_source_and_weights():
    ns = argparse.Namespace(model="vit_base_patch16_224", source="timm", depth=2, weights=None)
    assert cli.model_label(ns) == "vit_base_patch16_224 (timm, depth 2, random weights)"
    ns = argparse.Namespace(model="vit_tiny_patch16_224", source="transformers", depth=None, weights="/x/ck.safetensors")
    assert cli.model_label(ns) == "vit_tiny_patch16_224 (transformers, weights ck.safetensors)"


def _row(batch, fmt, sparsity, dense, sparse, **kw):
    return latency._blank(kind="e2e", model="m (timm, depth 2, random weights)", device="cpu-x", dtype="float32",
                          batch=batch, format=fmt, backend="torch", sparsity=sparsity, status="ok",
                          dense_ms=dense[1], dense_q1=dense[0], dense_q3=dense[2], sparse_ms=sparse[1],
                          sparse_q1=sparse[0], sparse_q3=sparse[2], speedup=dense[1] / sparse[1], reps=5,
                          bytes=1e6, dense_bytes=2e6, **kw)


def test_speed_plot_and_header(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(1, "csr", 0.5, (9, 10, 11), (11, 12, 13)), _row(1, "csr", 0.9, (9, 10, 11), (4, 5, 6)),
            _row(8, "bsr", 0.9, (90, 100, 110), (40, 50, 60), block=[4, 1])]
    lo, hi = latency.speedup_range(rows[1])
    assert lo == pytest.approx(9 / 6) and hi == pytest.approx(11 / 4) and lo < rows[1]["speedup"] < hi
    paths = latency.plot(rows, tmp_path)
    assert [p.name for p in paths] == ["speedup.png", "memory.png"] and all(p.stat().st_size > 0 for p in paths)
    assert latency.markdown(rows).startswith("End to end: m (timm, depth 2, random weights), float32, cpu-x")
    json.dumps(rows)


def test_convert_auto_measures_saves_and_reports(tmp_path, capsys, monkeypatch):
    """`convert --format auto`: measured on random images of the model's size (--batch), its
    decisions kept in --cache, the result saved and read back by `report`."""
    masks = tmp_path / "m.safetensors"
    assert cli.main(["prune", *TINY, "--method", "l1_unstructured", "--amount", "0.9", "--out", str(masks)]) == 0
    seen = []
    real = sp.convert

    def spy(model, m, **kw):
        seen.append(kw)
        return real(model, m, **kw)

    monkeypatch.setattr(sp, "convert", spy)
    cache, ck = tmp_path / "auto.json", tmp_path / "ck"
    capsys.readouterr()
    assert cli.main(["convert", *TINY, "--masks", str(masks), "--format", "auto", "--batch", "2",
                     "--cache", str(cache), "--out", str(ck)]) == 0
    out = capsys.readouterr().out
    assert seen[0]["format"] == "auto" and tuple(seen[0]["example_inputs"].shape) == (2, 3, 224, 224)
    assert "auto:" in out and cache.is_file()
    assert cli.main(["report", str(ck), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # the sparse layers keep auto's reason through sp.save; where the plan kept layers dense
    # (noise can make the tiny model's plan dense) they load back as plain nn.Linear
    assert rows and all((r["format"].startswith("auto:") and "whole model:" in r["why"]) or r["format"] == "nn.Linear"
                        for r in rows)
