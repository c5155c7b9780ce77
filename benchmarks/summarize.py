"""Print the short summary table of a results folder (best speedup per format, batch and run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    root = Path(folder)
    lines = ["| run | batch | format | backend | sparsity | speedup |", "|---|---|---|---|---|---|"]
    for path in sorted(root.glob("*/latency.json")):
        best: dict[tuple, dict] = {}
        for r in json.loads(path.read_text()):
            key = (r["batch"], r["format"])
            if key not in best or r["speedup"] > best[key]["speedup"]:
                best[key] = r
        lines += [f"| {path.parent.name} | {b} | {f} | {r['backend']} | {r['sparsity']:.2f} | {r['speedup']:.2f}x |"
                  for (b, f), r in sorted(best.items())]
    kernels = root / "kernels.json"
    if kernels.exists():
        data = json.loads(kernels.read_text())
        lines += ["", "| kernel | N x K | batch | speedup vs cuBLAS |", "|---|---|---|---|"]
        lines += [f"| {r['format']}/{r['backend']} | {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | "
                  f"{r['speedup']:.2f}x |" for r in data["rows"]]
        lines += [f"failed: {f}" for f in data["failures"]]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
