"""The reference integer executor against an earlier version of itself, side by side.

The earlier ``src/qrobust/integer/reference.py`` is read from git (``--baseline``, default the
commit before the float-exact rewrite) and imported as a module; both run the same lowered
program on the same pixel codes (one thread, round-robin rounds, medians). Outputs must be
identical (checked). Writes benchmarks/results/reference_speed.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_speed.py --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qrobust.checkpoint import load_checkpoint
from qrobust.hardware import cpu_info
from qrobust.integer import reference
from qrobust.integer.base import pixel_codes
from qrobust.provenance import provenance
from qrobust.quant import quantize

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"small-cnn": ("benchmarks/models/small-cnn-mnist", (1, 28, 28)),
          "resnet20": ("benchmarks/models/resnet20-cifar10", (3, 32, 32))}


def baseline_module(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:src/qrobust/integer/reference.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "reference_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reference_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="e9a6bf5")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recipes", default="w8a8,w4a4")
    ap.add_argument("--out", default="benchmarks/results/reference_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    old = baseline_module(args.baseline)
    rows = []
    for arch, (ckpt, shape) in MODELS.items():
        model, _ = load_checkpoint(ROOT / ckpt)
        x = torch.rand(args.batch, *shape, generator=torch.Generator().manual_seed(0))
        codes = pixel_codes(x)
        for recipe in args.recipes.split(","):
            twin = quantize(model, recipe, x)
            runs = {"baseline": old.ReferenceIntegerModel(twin, shape),
                    "current": reference.ReferenceIntegerModel(twin, shape)}
            same = torch.equal(runs["baseline"].forward_pixels(codes),
                               runs["current"].forward_pixels(codes))
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for name, m in runs.items():
                    start = time.perf_counter()
                    m.forward_pixels(codes)
                    times[name].append(time.perf_counter() - start)
            ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
            rows.append({"model": arch, "recipe": recipe, "images_per_s": ips,
                         "speedup": ips["current"] / ips["baseline"], "identical_logits": same})
            print(f"{arch} {recipe}: baseline {ips['baseline']:.0f} img/s, current "
                  f"{ips['current']:.0f} img/s, x{rows[-1]['speedup']:.1f}, identical {same}",
                  flush=True)
    out = {"benchmark": "reference_speed", "command": " ".join(
        [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "baseline": args.baseline, "batch": args.batch, "rounds": args.rounds, "threads": 1,
        "cpu": cpu_info().to_dict(), **provenance(), "rows": rows}
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
