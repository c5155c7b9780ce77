"""Print the short summary of a results folder: wrong and failed points first, then the best
speedup per run, batch and format (median with the quartiles of the sparse time), then the
kernel table. Exit status 1 when any run holds a wrong or failed point of ours."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BAD = ("wrong", "failed")


def _status(r: dict[str, Any]) -> str:
    return r.get("status", "ok")  # rows written before statuses existed were all timed


def _where(r: dict[str, Any]) -> str:
    shape = f"{r['shape'][0]}x{r['shape'][1]} " if r.get("shape") else ""
    return f"{r.get('kind', 'e2e')} {shape}{r['format']}/{r['backend']} sparsity {r['sparsity']:.2f} batch {r['batch']}"


def _ms(r: dict[str, Any], side: str) -> str:
    if r.get(f"{side}_q1") is None:
        return f"{r[f'{side}_ms']:.3f}"
    return f"{r[f'{side}_ms']:.3f} ({r[f'{side}_q1']:.3f}-{r[f'{side}_q3']:.3f})"


def summary(root: Path) -> tuple[str, int]:
    """The Markdown summary of ``root`` and the number of bad points of ours."""
    runs = {path.parent.name: json.loads(path.read_text()) for path in sorted(root.glob("*/latency.json"))}
    data = json.loads((root / "kernels.json").read_text()) if (root / "kernels.json").exists() else None
    kernels = data["rows"] if data else []
    bad = [(run, r) for run, rows in runs.items() for r in rows if _status(r) in BAD]
    bad += [("kernels", r) for r in kernels if _status(r) in BAD]
    lines = []
    if bad:
        lines += [f"**{len(bad)} WRONG or FAILED point(s)** (never timed):", "", "| run | point | status | reason |",
                  "|---|---|---|---|"]
        lines += [f"| {run} | {_where(r)} | **{_status(r).upper()}** | {r.get('reason', '')} |" for run, r in bad]
        lines.append("")
    lines += ["| run | batch | format | backend | sparsity | layers (converted / dense) | sparse ms (q1-q3) | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for run, rows in runs.items():
        best: dict[tuple, dict] = {}
        for r in rows:
            if _status(r) != "ok":
                continue
            key = (r.get("kind", "e2e"), r["batch"], r["format"])
            if key not in best or r["speedup"] > best[key]["speedup"]:
                best[key] = r
        for (kind, b, f), r in sorted(best.items()):
            layers = "-" if r.get("converted_layers") is None else f"{r['converted_layers']} / {r['dense_layers']}"
            name = run if kind == "e2e" else f"{run} ({kind} {r['shape'][0]}x{r['shape'][1]})"
            lines.append(f"| {name} | {b} | {f} | {r['backend']} | {r['sparsity']:.2f} | {layers} | {_ms(r, 'sparse')} | "
                         f"{r['speedup']:.2f}x |")
        skipped = [r for r in rows if _status(r) == "skipped"]
        if skipped:
            lines.append(f"| {run} | | {len(skipped)} point(s) skipped (reasons in latency.md) | | | | | |")
    if data is not None:
        lines += ["", "| kernel | N x K | batch | sparse ms (q1-q3) | speedup vs cuBLAS |", "|---|---|---|---|---|"]
        lines += [f"| {r['format']}/{r['backend']} | {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | {_ms(r, 'sparse')} | "
                  f"{r['speedup']:.2f}x |" for r in kernels if _status(r) == "ok"]
        skipped = dict.fromkeys(f"{r['format']}/{r['backend']}: {r.get('reason')}" for r in kernels
                                if _status(r) == "skipped")
        lines += [f"skipped: {s}" for s in skipped]
        lines += [f"failed: {f}" for f in data.get("failures", [])]  # kernels.json written before statuses
    ours = [r for run, r in bad if run != "kernels" or r.get("ours", True)]
    return "\n".join(lines) + "\n", len(ours)


def main(folder: str) -> int:
    text, n_bad = summary(Path(folder))
    print(text, end="")
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
