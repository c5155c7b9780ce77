"""``sparse-prune`` command line: ``demo`` (the main job), ``prune``, ``convert``, ``report``,
``bench``, ``accuracy``."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import sparse_prune as sp
from sparse_prune import atomic
from sparse_prune.constants import BACKENDS
from sparse_prune.convert import CONVERT_FORMATS
from sparse_prune.pruning import BLOCK_SCORES, CALIBRATED

DESCRIPTION = ("Prune vision transformers and turn the masks into real speed: demo (the main job), prune, convert, "
               "report, bench, accuracy. 'sparse-prune COMMAND --help' describes each.")

# (label, method, keyword arguments) — the seed's four methods, then what we add.
DEMO_RECIPES: list[tuple[str, str, dict[str, Any]]] = [
    ("random_unstructured", "random_unstructured", {}),
    ("l1_unstructured", "l1_unstructured", {}),
    ("l1_unstructured global", "l1_unstructured", {"scope": "global"}),
    ("random_structured", "random_structured", {"dim": 0}),
    ("ln_structured (L2, dim 0)", "ln_structured", {"n": 2, "dim": 0}),
    ("ln_structured coupled", "ln_structured", {"n": 2, "dim": 0, "coupled": True}),
    ("nm 2:4", "nm", {"pattern": "2:4"}),
    ("wanda", "wanda", {}),
]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, ``sparse-prune: error: ...`` (exit 2), like every other error."""

    def error(self, message: str):
        where = self.prog.removeprefix("sparse-prune").strip()  # the subcommand, if any
        self.exit(2, f"sparse-prune: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n")


def _positive_int(value: str) -> int:
    """An argparse type: an int >= 1 (``--depth``, ``--batch``, ``--reps`` ...)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value!r}")
    return number


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_base_patch16_224", choices=list(sp.models.ARCHS),
                   help="ViT architecture, built offline from its config (default: %(default)s)")
    p.add_argument("--source", default="transformers", choices=sp.models.SOURCES,
                   help="library that builds it (default: %(default)s)")
    p.add_argument("--weights", default=None, help="local state dict (safetensors/bin/pt); default: random weights")
    p.add_argument("--depth", type=_positive_int, default=None, help="override the number of blocks (quick runs)")
    p.add_argument("--attention", default="sdpa", choices=sp.attention.IMPLEMENTATIONS,
                   help="attention of a transformers model, dense and sparse alike: sparse_prune (our CPU kernel), "
                        "sdpa or eager (default: %(default)s)")


def _depth_override(args: argparse.Namespace) -> dict[str, int]:
    """``--depth`` as the source's own constructor keyword."""
    if args.depth is None:
        return {}
    key = {"transformers": "num_hidden_layers", "timm": "depth", "torchvision": "num_layers"}[args.source]
    return {key: args.depth}


def model_label(args: argparse.Namespace) -> str:
    """The model as the bench rows, tables and plots name it: architecture, source, and the
    ``--depth`` / ``--weights`` that change what was built."""
    extra = [args.source]
    if getattr(args, "depth", None) is not None:
        extra.append(f"depth {args.depth}")
    extra.append(f"weights {Path(args.weights).name}" if getattr(args, "weights", None) else "random weights")
    if getattr(args, "attention", "sdpa") != "sdpa":
        extra.append(f"attention {args.attention}")
    return f"{args.model} ({', '.join(extra)})"


def _build(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = sp.models.vit(args.model, source=args.source, weights=args.weights, **_depth_override(args))
    attention = getattr(args, "attention", "sdpa")
    if args.source == "transformers":
        sp.set_attention(model, attention)
    elif attention != "sdpa":
        raise ValueError(f"--attention {attention} needs --source transformers (got {args.source})")
    return model


def _image_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        return int(cfg.image_size)
    if hasattr(model, "patch_embed"):
        return int(model.patch_embed.img_size[0])
    return int(model.image_size)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _build(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({args.source}, {n_params / 1e6:.1f} M parameters, random weights, "
          f"built offline from its config); amount {args.amount}; torch {torch.__version__}; "
          f"CUDA extension: {sp.has_cuda_extension()}")
    size = _image_size(model)
    gen = torch.Generator().manual_seed(0)
    # Random images stand in for real calibration data here: no data set is downloaded.
    calibration = [torch.randn(2, 3, size, size, generator=gen) for _ in range(2)]
    include = (nn.Linear, nn.Conv2d)  # as the seed: every layer but LayerNorm
    results = {}
    timings = {}
    for label, method, kw in tqdm(DEMO_RECIPES, desc="demo"):
        kw = dict(kw)
        if method == "wanda":
            kw["calibration"] = calibration
        if method != "nm":
            kw["amount"] = args.amount
        t0 = time.perf_counter()
        masks = sp.prune(model, method, include=include, **kw)
        timings[label] = time.perf_counter() - t0
        results[label] = masks
        masks.save(out / f"masks_{label.split(' (')[0].replace(' ', '_').replace(':', 'of')}.safetensors")

    names = list(dict.fromkeys(n for m in results.values() for n in m))
    header = ["parameter", *results]
    rows = [[name, *(f"{m.layer_sparsity()[name]:.3f}" if name in m else "-" for m in results.values())]
            for name in names]
    rows.append(["**overall**", *(f"**{m.sparsity():.3f}**" for m in results.values())])
    rows.append(["time (s)", *(f"{timings[k]:.2f}" for k in results)])
    table = _markdown_table(header, rows)
    report = (
        f"# sparse_prune demo\n\n{args.model} ({args.source}), {n_params / 1e6:.1f} M parameters, "
        f"random weights; amount {args.amount} (2:4 for nm); torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}.\n\n"
        "Per-parameter sparsity (fraction of weights pruned) for each method. Coupled "
        "structured pruning prunes fc2 columns and attention output-projection columns "
        "together with fc1 rows and q/k/v heads.\n\n" + table + "\n"
    )
    atomic.write_text(out / "sparsity.json", json.dumps(
        {k: {"info": m.info, "overall": m.sparsity(), "layers": m.layer_sparsity(), "seconds": timings[k]}
         for k, m in results.items()}, indent=1, default=str))
    print(table)
    latency_rows: list[dict[str, Any]] = []
    accuracy_rows: list[dict[str, Any]] = []
    if not args.skip_latency:
        text, latency_rows = _demo_latency(model, args, out / "latency")
        report += text
    if not args.skip_accuracy:
        text, accuracy_rows = _demo_accuracy(out / "accuracy")
        report += text
    if latency_rows and accuracy_rows:
        picks = _pick_a_point(latency_rows, accuracy_rows)
        print("\n" + picks)
        report += picks
    atomic.write_text(out / "report.md", report)
    print(f"\nwrote {out / 'report.md'}, {out / 'sparsity.json'} and the masks (*.safetensors)")
    return 0


def _gpu_backends() -> list[str]:
    """Every backend that can run on this GPU machine."""
    from sparse_prune import backends
    from sparse_prune.kernels import triton_common

    # torch's reference rebuilds dense weights per call on a GPU: timed only where nothing else
    # runs; "auto" is a row of its own (what a user gets without choosing)
    fast = (["triton"] if triton_common.available() else []) + (["cuda"] if sp.has_cuda_extension() else [])
    fast += [b for b in ("cuda:sm90", "cusparselt") if backends.runs_on(b, "cuda")]
    return ["auto", *fast] if fast else ["torch"]


# The block a CPU demo prunes for bsr: 4x1 runs our CPU kernel 5.3x faster than dense on fc1 at
# 90% (benchmarks/results/cpu-*/gemm.md) and keeps accuracy far better than 16x16 or 32x32
# (the accuracy study); Triton on a GPU needs sides >= 16.
CPU_DEMO_BLOCK = (4, 1)


def _demo_latency(model: nn.Module, args: argparse.Namespace, out: Path) -> tuple[str, list[dict[str, Any]]]:
    """Every format (and ``auto``) against dense on this machine at 50/70/90%: CPU batch 1, or
    the full grid on a GPU. Returns the report section and the rows."""
    from sparse_prune.bench import latency

    gpu = torch.cuda.is_available()
    kw = dict(formats=[*CONVERT_FORMATS, "auto"], sparsities=[0.5, 0.7, 0.9],
              batches=[1] if not gpu else [1, 8, 64, 256], device="cuda" if gpu else "cpu",
              dtype=torch.bfloat16 if gpu else torch.float32,
              backends=_gpu_backends() if gpu else ["torch"],
              bsr_block=latency.BSR_BLOCK if gpu else CPU_DEMO_BLOCK)
    print(f"\nlatency vs dense on {kw['device']} ({kw['dtype']}, batch {kw['batches']}):")
    rows = latency.bench_e2e(model, model_label(args), _image_size(model), reps=5 if not gpu else 20, **kw)
    latency.write_latency(rows, out)
    table = latency.markdown(rows)
    print(table)
    bad = latency.bad_rows(rows)
    if bad:  # as loud as `sparse-prune bench`: the demo fails (the files above keep the rows)
        raise RuntimeError(f"{len(bad)} converted model(s) WRONG or FAILED: " + "; ".join(r["reason"] for r in bad))
    block = "x".join(map(str, kw["bsr_block"]))
    return ("\n## Latency against the dense model\n\nEach format converted from the pruning natural to it "
            f"(coupled L2 structured for shrink, 2:4 magnitude, {block} blocks by L2 norm (method block) for bsr, "
            "L1 unstructured for csr, auto and the masked dense baseline); every converted model checked against "
            "its masked dense model before timing; dense and sparse timed interleaved (median).\n\n" + table +
            "\n![speedup](latency/speedup.png) ![memory](latency/memory.png)\n"), rows


def _demo_accuracy(out: Path) -> tuple[str, list[dict[str, Any]]]:
    """The quick accuracy study on the digits ViT (trained here, cached)."""
    from sparse_prune.bench import accuracy as study
    from sparse_prune.bench.data import load_data
    from sparse_prune.bench.train import DIGITS_VIT, digits_vit

    print("\naccuracy study (digits ViT, --quick):")
    train_data, test_data, _, _ = load_data("digits", DIGITS_VIT["image_size"])
    model = digits_vit(train_data, out / "cache")
    rows = study.run_study(model, train_data, test_data, model_name="digits-vit", data_name="digits",
                           amounts=[0.3, 0.5, 0.7, 0.9], finetune_epochs=3)
    study.write_study(rows, out)
    table = study.markdown(rows)
    print(table)
    return ("\n## Accuracy against pruning ratio (digits ViT, `sparse-prune accuracy --quick`)\n\n" + table +
            "\n![accuracy](accuracy/accuracy.png)\n"), rows


# The format each pruning method's masks are run in (csr takes any unstructured mask).
METHOD_FORMAT = {"l1_unstructured": "csr", "wanda": "csr", "sparsegpt": "csr", "nm": "2:4", "block": "bsr",
                 "ln_structured": "shrink"}


def _pick_a_point(latency_rows: Sequence[dict[str, Any]], accuracy_rows: Sequence[dict[str, Any]]) -> str:
    """Speed (ViT-B/16, batch 1, this machine) beside accuracy (digits ViT) per (method, format,
    sparsity): each accuracy point joined with the latency row of its format (same bsr block)
    within 0.05 of its sparsity."""
    speed = [r for r in latency_rows if r.get("status") == "ok" and r.get("kind") == "e2e" and r["batch"] == 1]
    lines = ["\n## Pick a point: speed and accuracy side by side\n",
             "Speedup: ViT-B/16 batch 1 on this machine (table above); accuracy: the digits ViT (one-shot, and "
             "after the study's finetuning). Blank: that format/sparsity was not timed.\n",
             "| method | format | sparsity | speedup | accuracy one-shot | accuracy finetuned |", "|---|---|---|---|---|---|"]
    def key(r: dict[str, Any]) -> tuple:
        return r["method"], str(r.get("block")), r.get("pattern"), r["amount"]

    tuned = {key(r): r for r in accuracy_rows if r.get("finetuned")}
    for r in accuracy_rows:
        fmt = "2:4" if r.get("pattern") == "2:4" else METHOD_FORMAT.get(r["method"])
        if r.get("finetuned") or fmt is None or (r.get("pattern") and fmt != "2:4"):
            continue
        near = [s for s in speed if s["format"] == fmt and abs(s["sparsity"] - r["sparsity"]) <= 0.05
                and (fmt != "bsr" or s.get("block") == r.get("block"))]
        label = fmt + (f" {r['block'][0]}x{r['block'][1]}" if r.get("block") else "")
        t = tuned.get(key(r))
        lines.append(f"| {r['method']} | {label} | {r['sparsity']:.2f} | "
                     f"{format(near[0]['speedup'], '.2f') + 'x' if near else ''} | {100 * r['accuracy']:.1f}% | "
                     f"{'' if t is None else format(100 * t['accuracy'], '.1f') + '%'} |")
    return "\n".join(lines) + "\n"


def _check_out(path: str | None, directory: bool) -> None:
    """Refuse an output path before any work: a checkpoint ``directory`` onto an existing file,
    or a file into a missing directory or onto a directory."""
    if path is None:
        return
    target = Path(path)
    if directory:
        if target.exists() and not target.is_dir():
            raise ValueError(f"--out {path}: is an existing file; a checkpoint is a directory")
    elif target.is_dir():
        raise ValueError(f"--out {path}: is a directory; give a file name (e.g. masks.safetensors)")
    elif not target.absolute().parent.is_dir():
        raise ValueError(f"--out {path}: directory {target.absolute().parent} does not exist")


def cmd_prune(args: argparse.Namespace) -> int:
    _check_out(args.out, directory=False)
    model = _build(args)
    kw: dict[str, Any] = {"scope": args.scope, "seed": args.seed, "coupled": args.coupled,
                          "exclude": tuple(args.exclude)}
    if args.include_classifier:
        kw["include_classifier"] = True
    if args.method == "nm" or (args.method in CALIBRATED and args.pattern):
        kw["pattern"] = args.pattern or "2:4"
    else:
        kw["amount"] = args.amount
    if args.method == "sparsegpt":
        kw["blocksize"], kw["percdamp"] = args.blocksize, args.percdamp
    if args.method in ("ln_structured", "random_structured"):
        kw["dim"] = args.dim
    if args.method in ("ln_structured", "block"):
        kw["n"] = args.n
    if args.block is not None:  # prune() refuses them for methods other than block
        kw["block"] = tuple(args.block)
    if args.score is not None:
        kw["score"] = args.score
    if args.method in CALIBRATED or (args.method == "block" and args.score == "wanda"):
        size = _image_size(model)
        gen = torch.Generator().manual_seed(args.seed)
        kw["calibration"] = [torch.randn(2, 3, size, size, generator=gen) for _ in range(args.calibration_batches)]
    masks = sp.prune(model, args.method, progress=True, **kw)
    print(masks.summary())
    for key, what in (("coupled_summary", ""), ("classifier_excluded", "classifier left dense (--include-classifier "
                                                                          "prunes it): ")):
        if masks.info.get(key):
            print(what + str(masks.info[key]))
    out = Path(args.out) if args.out else Path("results") / "prune" / f"{args.model}-{args.method}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    masks.save(out)
    print(f"wrote {out}" + ("" if args.out else " (default; --out PATH to choose)"))
    return 0


MODEL_SPEC = "model.json"  # written next to a CLI-converted checkpoint: how to build its skeleton


def cmd_convert(args: argparse.Namespace) -> int:
    _check_out(args.out, directory=True)
    model = _build(args)
    masks = sp.MaskSet.load(args.masks)
    kw: dict[str, Any] = {}
    if args.block:
        kw["block"] = tuple(args.block)
    if args.round_to != 1:
        kw["round_to"] = args.round_to
    if args.format == "auto":  # measured on this machine, on random images of the batch it will run
        size = _image_size(model)
        gen = torch.Generator().manual_seed(0)
        kw["example_inputs"] = torch.randn(args.batch, 3, size, size, generator=gen)
        kw["cache"] = args.cache
    elif args.batch != 1 or args.cache is not None:
        raise ValueError("--batch and --cache are for --format auto (what it measures on, where it keeps its "
                         f"decisions), not --format {args.format}")
    converted = sp.convert(model, masks, format=args.format, backend=args.backend, inplace=True, **kw)
    sp.save(converted, args.out)
    spec = {"model": args.model, "source": args.source, "depth": args.depth}
    atomic.write_text(Path(args.out) / MODEL_SPEC, json.dumps(spec, indent=1))
    print(sp.format_report(sp.report(converted)))
    print(f"\nwrote {args.out} (model.safetensors, manifest.json, {MODEL_SPEC})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    spec_path = Path(args.checkpoint) / MODEL_SPEC
    guessed = not spec_path.is_file() and args.model is None and args.source is None
    if spec_path.is_file():  # the CLI wrote how to build the skeleton; flags still override
        from sparse_prune.files import bad_file, read_json

        spec = read_json(spec_path, "model spec")
        if not isinstance(spec, dict):
            raise bad_file(spec_path, "must be a JSON object {model, source, depth}")
        for key, ok in (("model", lambda v: v in sp.models.ARCHS), ("source", lambda v: v in sp.models.SOURCES),
                        ("depth", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1))):
            if key in spec and not ok(spec[key]):
                raise bad_file(spec_path, f"{key!r} is {spec[key]!r}: not a known {key}"
                               + (" (an int >= 1 or null)" if key == "depth" else ""))
        for key in ("model", "source", "depth"):
            if getattr(args, key) is None:
                setattr(args, key, spec.get(key))
    args.model = args.model or "vit_base_patch16_224"
    args.source = args.source or "transformers"
    try:
        model = sp.load(_build(args), args.checkpoint)
    except (ValueError, TypeError) as exc:
        if not spec_path.is_file() and Path(args.checkpoint, "manifest.json").is_file():
            # saved from Python (sp.save): no model.json says which architecture to rebuild
            tried = f"{args.model} from {args.source}" + (f", depth {args.depth}" if args.depth else "")
            hint = (f"{args.checkpoint} has no {MODEL_SPEC} (saved from Python with sp.save?), so "
                    f"{'the default skeleton was tried' if guessed else 'the flags given were tried'} ({tried}) and "
                    "it does not fit: pass --model NAME --source transformers|timm|torchvision (and --depth N if "
                    "it was built with fewer blocks) naming the architecture it was saved from")
            raise ValueError(f"{hint}. Load error: {exc}") from exc
        raise
    rows = sp.report(model)
    print(json.dumps(rows, indent=1) if args.json else sp.format_report(rows))
    return 0


def cmd_accuracy(args: argparse.Namespace) -> int:
    from sparse_prune.bench import accuracy as study
    from sparse_prune.bench.data import load_data
    from sparse_prune.bench.train import DIGITS_VIT, digits_vit

    out = Path(args.out)
    quick = args.quick
    amounts = args.amounts or ([0.3, 0.5, 0.7, 0.9] if quick else list(study.DEFAULT_AMOUNTS))
    epochs = args.finetune_epochs if args.finetune_epochs is not None else (3 if quick else 5)
    torch.manual_seed(args.seed)
    if args.model == "digits-vit":
        if args.data != "digits":
            raise ValueError("--model digits-vit is trained on --data digits; give --model NAME for an imagefolder")
        train_data, test_data, _, _ = load_data("digits", DIGITS_VIT["image_size"])
        model = digits_vit(train_data, out / "cache", epochs=args.train_epochs, seed=args.seed)
    else:
        if args.data == "digits":
            raise ValueError("--data digits goes with --model digits-vit (8x8 one-channel images)")
        image = sp.models.ARCHS[args.model][-1]
        train_data, test_data, classes, _ = load_data(args.data, image)
        model = sp.models.vit(args.model, source=args.source, weights=args.weights, num_classes=classes,
                              **_depth_override(args))
    t0 = time.perf_counter()
    rows = study.run_study(model, train_data, test_data, model_name=args.model, data_name=args.data,
                           methods=args.methods, amounts=amounts, scope=args.scope, finetune_epochs=epochs,
                           finetune_amounts=args.finetune_amounts, iterative=args.iterative,
                           keep_classifier=args.keep_classifier, seed=args.seed, blocks=args.blocks)
    paths = study.write_study(rows, out)
    print(study.markdown(rows))
    print(f"study took {time.perf_counter() - t0:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0


def latency_formats() -> tuple[str, ...]:
    from sparse_prune.bench.latency import BENCH_FORMATS

    return BENCH_FORMATS


def cmd_bench(args: argparse.Namespace) -> int:
    from sparse_prune.bench import latency

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if args.cuda_graphs and args.device != "cuda":
        raise ValueError("--cuda-graphs needs --device cuda")
    on_gpu = args.device == "cuda"
    batches = args.batch or ([1, 8, 64, 256] if on_gpu else [1] if args.quick else [1, 8])
    sparsities = args.sparsity or ([0.5, 0.9] if args.quick else [0.5, 0.7, 0.9])
    backends = args.backends or _gpu_backends() if on_gpu else (args.backends or ["torch"])
    dtype = latency.DTYPES[args.dtype]
    model = _build(args)
    size = _image_size(model)
    notes: list[str] = []
    common = dict(formats=args.formats, backends=backends, sparsities=sparsities, batches=batches, dtype=dtype,
                  device=args.device, notes=notes)
    label = model_label(args)
    rows = latency.bench_e2e(model, label, size, compile_=args.compile, cuda_graphs=args.cuda_graphs,
                             reps=args.reps, **common)
    if args.layers and not notes:
        tokens = (size // 16) ** 2 + 1
        rows += latency.bench_layers(latency.linear_shapes(model), label, tokens, reps=max(args.reps, 10), **common)
    for r in rows:  # what was built, beside the label
        r.update(arch=args.model, source=args.source, depth=args.depth, weights=args.weights)
    paths = latency.write_latency(rows, args.out)
    print(latency.markdown(rows))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    for line in notes:
        print(line, file=sys.stderr)
    bad = latency.bad_rows(rows)
    if bad:  # a wrong or crashed conversion fails the command, after every other point was timed
        print(f"sparse-prune bench: {len(bad)} point(s) WRONG or FAILED (status in latency.json):", file=sys.stderr)
        for r in bad:
            print(f"  {r['status'].upper()}: {r['reason']}", file=sys.stderr)
        return 1
    return 130 if notes else 0


def _block_shape(value: str) -> tuple[int, int]:
    """``"4x1"`` -> ``(4, 1)`` (``--blocks`` of the accuracy study)."""
    try:
        bm, bk = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a block is BMxBK with two positive ints, e.g. 4x1; got {value!r}") from None
    if bm < 1 or bk < 1:
        raise argparse.ArgumentTypeError(f"a block is BMxBK with two positive ints, e.g. 4x1; got {value!r}")
    return bm, bk


def _norm(value: str) -> float | str:
    return value if value == "fro" else float(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Every error is one line on stderr,
    ``sparse-prune: error: ...`` naming the file or argument, with a non-zero code (2; 1 for a
    bench point that was wrong); ``--debug`` (anywhere on the line) shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = _Parser(prog="sparse-prune", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="prune ViT-B/16 with every method; per-layer sparsity table")
    _model_args(demo)
    demo.add_argument("--amount", type=float, default=0.5,
                      help="fraction of weights each method prunes (default: %(default)s; nm is 2:4)")
    demo.add_argument("--out", default="results/demo", help="folder for report.md and the rest (default: %(default)s)")
    demo.add_argument("--skip-latency", action="store_true", help="no latency measurement")
    demo.add_argument("--skip-accuracy", action="store_true", help="no accuracy study")
    demo.set_defaults(func=cmd_demo)

    pr = sub.add_parser("prune", help="prune a ViT and save the masks (safetensors)")
    _model_args(pr)
    pr.add_argument("--method", required=True, choices=sp.METHODS, help="pruning method")
    pr.add_argument("--amount", type=float, default=0.5,
                    help="fraction pruned: of each weight (local) or of all of them (global); of the rows or "
                         "blocks for the structured and block methods (default: %(default)s; not used by nm)")
    pr.add_argument("--scope", default="local", choices=("local", "global"),
                    help="rank each weight on its own (local, default) or all of them together (global)")
    pr.add_argument("--n", type=_norm, default=2.0,
                    help='norm for ln_structured (number, inf, -inf or "fro") and block (> 0, inf or "fro")')
    pr.add_argument("--dim", type=int, default=0,
                    help="structured methods: the axis of the units pruned whole (0 = output rows, default)")
    pr.add_argument("--pattern", default=None, help='"N:M" for nm / wanda / sparsegpt')
    pr.add_argument("--block", type=int, nargs=2, default=None, metavar=("BM", "BK"),
                    help="block method: rows x columns of the blocks kept or pruned whole (default 32 32; "
                         "e.g. 4 1 or 16 16); --amount is the fraction of blocks pruned")
    pr.add_argument("--score", default=None, choices=BLOCK_SCORES,
                    help="block method: rank blocks by |W| (magnitude, default) or |W|·‖X‖ (wanda; "
                         "calibrated on --calibration-batches random images)")
    pr.add_argument("--coupled", action="store_true",
                    help="structured methods: prune MLP neurons and whole attention heads together (what is "
                         "coupled and what is left is printed)")
    pr.add_argument("--include-classifier", action="store_true",
                    help="structured methods: also prune the classifier's rows (left out by default: a pruned "
                         "row is a class never predicted)")
    pr.add_argument("--exclude", nargs="*", default=[], help="module name regexes to keep dense")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random methods and calibration images")
    pr.add_argument("--calibration-batches", type=_positive_int, default=2,
                    help="wanda/sparsegpt/block --score wanda: batches of 2 random images (no data set is downloaded)")
    pr.add_argument("--blocksize", type=int, default=128, help="sparsegpt: columns per lazy-update block")
    pr.add_argument("--percdamp", type=float, default=0.01, help="sparsegpt: Hessian dampening (of its mean diagonal)")
    pr.add_argument("--out", default=None,
                    help="masks file (.safetensors); default: results/prune/MODEL-METHOD.safetensors")
    pr.set_defaults(func=cmd_prune)

    cv = sub.add_parser("convert", help="convert a ViT with saved masks to a format; save it (sp.save)")
    _model_args(cv)
    cv.add_argument("--masks", required=True, help="masks file written by 'sparse-prune prune'")
    cv.add_argument("--format", required=True, choices=("auto", *CONVERT_FORMATS),
                    help="format of the converted layers; auto: the fastest measured here, per layer and for the "
                         "whole model, dense where nothing sparse pays")
    cv.add_argument("--batch", type=_positive_int, default=1,
                    help="auto: images per batch it measures on (the batch you will run; default 1)")
    cv.add_argument("--cache", default=None, help="auto: JSON file of its decisions, reused by the next run")
    cv.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="kernels to run them with (default: auto, our best for the device)")
    cv.add_argument("--block", type=_positive_int, nargs=2, default=None, metavar=("BM", "BK"), help="bsr block")
    cv.add_argument("--round-to", type=_positive_int, default=1, help="shrink: keep widths a multiple of this")
    cv.add_argument("--out", required=True, help="checkpoint directory")
    cv.set_defaults(func=cmd_convert)

    rp = sub.add_parser("report", help="per-layer format, density, bytes and flops of a saved model")
    rp.add_argument("checkpoint", help="directory written by 'sparse-prune convert' or sp.save")
    rp.add_argument("--model", default=None, choices=list(sp.models.ARCHS),
                    help="architecture it was saved from (read from its model.json when 'convert' wrote it)")
    rp.add_argument("--source", default=None, choices=sp.models.SOURCES,
                    help="library of that architecture (read from model.json likewise)")
    rp.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    rp.add_argument("--depth", type=_positive_int, default=None, help="its number of blocks, when it was built with --depth")
    rp.add_argument("--json", action="store_true", help="print the rows as JSON")
    rp.set_defaults(func=cmd_report)

    from sparse_prune.bench.accuracy import DEFAULT_BLOCKS, DEFAULT_METHODS
    from sparse_prune.bench.latency import DTYPES

    be = sub.add_parser("bench", help="latency of converted ViTs vs the dense model (JSON, Markdown, PNG)")
    _model_args(be)
    be.add_argument("--formats", nargs="+", default=list(CONVERT_FORMATS), choices=latency_formats(),
                    help="formats to time (default: every fixed format; add 'auto' for the measured per-layer choice)")
    be.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                    help="default: torch (+ triton on a GPU)")
    be.add_argument("--sparsity", type=float, nargs="+", default=None, help="default 0.5 0.7 0.9 (2:4 is 0.5)")
    be.add_argument("--batch", type=_positive_int, nargs="+", default=None, help="default 1 8 (CPU), 1 8 64 256 (GPU)")
    be.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="dtype of both models (default: %(default)s)")
    be.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to time (default: %(default)s)")
    be.add_argument("--compile", action="store_true", help="torch.compile dense and sparse alike")
    be.add_argument("--cuda-graphs", action="store_true", help="replay dense and sparse from CUDA graphs")
    be.add_argument("--layers", action="store_true", help="also time each Linear shape of the model alone")
    be.add_argument("--reps", type=_positive_int, default=5, help="timed rounds (median and quartiles reported)")
    be.add_argument("--quick", action="store_true", help="batch 1, sparsity 0.5 and 0.9: minutes on 2 CPU cores")
    be.add_argument("--out", default="results/bench",
                    help="folder for latency.json, latency.md and the plots (default: %(default)s)")
    be.set_defaults(func=cmd_bench)

    ac = sub.add_parser("accuracy", help="accuracy vs pruning ratio per method (+ finetuning), as the seed")
    ac.add_argument("--model", default="digits-vit", choices=["digits-vit", *sp.models.ARCHS],
                    help="digits-vit: a small ViT trained here on the bundled digits (cached under --out)")
    ac.add_argument("--source", default="transformers", choices=sp.models.SOURCES,
                    help="library that builds --model NAME (default: %(default)s)")
    ac.add_argument("--weights", default=None, help="local checkpoint for --model NAME (safetensors/bin/pt)")
    ac.add_argument("--depth", type=_positive_int, default=None, help=argparse.SUPPRESS)
    ac.add_argument("--data", default="digits", help="digits | imagefolder:PATH (PATH/train + PATH/val, or one folder)")
    ac.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sp.METHODS,
                    help="methods to sweep (default: %(default)s)")
    ac.add_argument("--amounts", type=float, nargs="+", default=None, help="default 0.1 .. 0.9")
    ac.add_argument("--blocks", type=_block_shape, nargs="+", default=list(DEFAULT_BLOCKS), metavar="BMxBK",
                    help="block shapes of method block, each swept over the amounts (default 4x1 16x16)")
    ac.add_argument("--scope", default="local", choices=("local", "global"),
                    help="local (each weight on its own, default) or global ranking")
    ac.add_argument("--finetune-epochs", type=int, default=None, help="default 5 (3 with --quick); 0 = none")
    ac.add_argument("--finetune-amounts", type=float, nargs="+", default=[0.5],
                    help="amounts whose masked model is also finetuned (default: 0.5)")
    ac.add_argument("--iterative", type=int, default=1, help="reach finetuned points in K prune+finetune rounds")
    ac.add_argument("--keep-classifier", action="store_true", help="leave the classifier dense")
    ac.add_argument("--train-epochs", type=int, default=40, help="digits-vit training epochs")
    ac.add_argument("--seed", type=int, default=0, help="seed of training, pruning and finetuning")
    ac.add_argument("--quick", action="store_true", help="amounts 0.3/0.5/0.7/0.9, 3 finetune epochs")
    ac.add_argument("--out", default="results/accuracy",
                    help="folder for the study's JSON, Markdown and plot (default: %(default)s)")
    ac.set_defaults(func=cmd_accuracy)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sparse-prune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback: the message names the file or argument
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
            message += f": {exc.filename}"
        if isinstance(exc, re.error):
            message = f"bad regular expression {exc.pattern!r}: {exc}"
        print(f"sparse-prune: error: {args.command}: {message} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
