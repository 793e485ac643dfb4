"""The reference integer executor against an earlier version of itself, and beside the int8
runtimes, side by side.

The earlier ``src/qrobust/integer/reference.py`` is read from git (``--baseline``, default the
version issue 18 measured) and imported as a module. It is timed twice: in one chunk of the
whole batch (``baseline_one_chunk``: how ``int8_inference.py`` called it when the issue read
144 images/s) and in its own default chunks (``baseline``). All run the same lowered program on
the same pixel codes (test images where the data is present; one thread, round-robin rounds,
medians); the reference logits must be identical (checked), the int8 runtimes' predictions are
compared with them. Writes benchmarks/results/reference_speed.json.

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
from qrobust.data import load_dataset, take
from qrobust.hardware import cpu_info
from qrobust.integer import reference
from qrobust.integer.base import pixel_codes
from qrobust.integer.onnx import export_int8, int8_kernels, session
from qrobust.integer.program import lower
from qrobust.provenance import provenance
from qrobust.quant import quantize

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"small-cnn": ("benchmarks/models/small-cnn-mnist", (1, 28, 28), "mnist"),
          "resnet20": ("benchmarks/models/resnet20-cifar10", (3, 32, 32), "cifar10")}


def images(dataset: str, shape: tuple[int, ...], n: int) -> tuple[torch.Tensor, str]:
    try:
        return take(load_dataset(dataset).test, n).tensors()[0], f"{dataset} test images"
    except Exception:  # noqa: BLE001 - the data may be absent; speed hardly depends on it
        return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)), "random images"


def int8_runtimes(twin, shape, threads: int = 1) -> dict:
    """ORT int8 and (when installed) OpenVINO int8 runs of the same program on uint8 codes."""
    program = lower(twin, shape)
    exact = int8_kernels().exact_u8s8
    ort = session(export_int8(program, "qdq", exact), threads)
    runs = {"ort_int8": lambda u8: ort.run(["logits"], {"pixels": u8})[0]}
    if importlib.util.find_spec("openvino") is not None:
        from qrobust.integer.openvino import compile_onnx

        ov = compile_onnx(export_int8(program, "qdq-rounded-add", exact), threads)
        runs["openvino_int8"] = lambda u8: ov({"pixels": u8})[ov.output(0)]
    return runs


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
    for arch, (ckpt, shape, dataset) in MODELS.items():
        model, _ = load_checkpoint(ROOT / ckpt)
        x, source = images(dataset, shape, args.batch)
        codes = pixel_codes(x)
        u8 = codes.to(torch.uint8).numpy()
        for recipe in args.recipes.split(","):
            twin = quantize(model, recipe, x)
            refs = {"baseline_one_chunk": old.ReferenceIntegerModel(twin, shape, chunk=args.batch),
                    "baseline": old.ReferenceIntegerModel(twin, shape),
                    "current": reference.ReferenceIntegerModel(twin, shape)}
            logits = {k: m.forward_pixels(codes) for k, m in refs.items()}
            same = all(torch.equal(v, logits["current"]) for v in logits.values())
            runs = {k: (lambda m=m, c=codes: m.forward_pixels(c)) for k, m in refs.items()}
            agreement = {}
            if recipe.startswith("w8a8"):  # the 8-bit runtimes, beside
                for name, fn in int8_runtimes(twin, shape).items():
                    runs[name] = lambda fn=fn, u8=u8: fn(u8)
                    got = torch.from_numpy(runs[name]()).argmax(1)
                    agreement[name] = float((got == logits["current"].argmax(1)).float().mean())
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
            rows.append({"model": arch, "recipe": recipe, "images": source, "images_per_s": ips,
                         "speedup": ips["current"] / ips["baseline"],
                         "speedup_over_one_chunk": ips["current"] / ips["baseline_one_chunk"],
                         "identical_logits": same,
                         "int8_runtime_prediction_agreement": agreement})
            print(f"{arch} {recipe}: " + ", ".join(f"{k} {v:.0f}" for k, v in ips.items())
                  + f" img/s; current x{rows[-1]['speedup']:.1f} baseline, "
                  f"x{rows[-1]['speedup_over_one_chunk']:.1f} baseline in one chunk; "
                  f"identical {same}", flush=True)
    out = {"benchmark": "reference_speed", "command": " ".join(
        [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "baseline": args.baseline, "chunk": reference.CHUNK, "batch": args.batch, "rounds": args.rounds, "threads": 1,
        "cpu": cpu_info().to_dict(), **provenance(), "rows": rows}
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
