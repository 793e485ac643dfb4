"""Third-party int8 files, end to end: a MobileNetV2-style CIFAR-10 model quantized by ONNX
Runtime's ``quantize_static`` (not by qrobust) and one converted to int8 TFLite by TensorFlow's
converter, imported, attacked on the twin with PGD at 2/255 and 8/255, the adversarial examples
re-checked on the file's own runtime (ONNX Runtime, LiteRT).

Inputs: ``benchmarks/models/mbv2-cifar10/model.safetensors`` (benchmarks/mobilenet_cifar.py;
exported to ONNX here and quantized with 512 training images, QDQ, per-channel int8 weights,
uint8 activations) and ``model_int8.tflite`` (benchmarks/mobilenet_tflite.py, made with
TensorFlow, committed). Everything runs through the command line (``qrobust import`` and
``qrobust attack --json``), the path a user takes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/import_e2e.py --limit 500
    # -> benchmarks/results/import_e2e.json (+ .md table)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "benchmarks" / "models" / "mbv2-cifar10"
EPS = {"2/255": 2 / 255, "8/255": 8 / 255}


def quantize_onnx(work: Path, reduce_range: bool) -> Path:
    """The float model exported to ONNX and quantized by ONNX Runtime itself; ``reduce_range``
    (7-bit weights) is ORT's advice for x86 CPUs without VNNI, whose u8 x s8 kernels saturate
    int16 pair sums of full 8-bit weights (the runtime itself is then inexact)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mobilenet_cifar import MEAN, STD, mobilenet_v2_cifar
    from qrobust.data import load_dataset

    net = mobilenet_v2_cifar()
    net.load_state_dict(load_file(MODELS / "model.safetensors"))
    net.eval()
    float_path = work / "mbv2_float.onnx"
    int8_path = work / ("mbv2_int8_qdq_reduce_range.onnx" if reduce_range else "mbv2_int8_qdq.onnx")
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), float_path, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                      opset_version=17, dynamo=False)
    x, _ = load_dataset("cifar10").train.subset(slice(0, 512)).tensors()
    norm = ((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).numpy()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": norm[i:i + 32].astype(np.float32)}
                                 for i in range(0, len(norm), 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return int8_path


def cli(args: list[str]) -> dict:
    """Run ``qrobust ARGS --json`` and return its JSON."""
    from qrobust.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["-q", *args, "--json"])
    if code != 0:
        raise SystemExit(f"qrobust {' '.join(args)} failed with exit code {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def run_file(path: Path, layout: str, mean: tuple, std: tuple, work: Path, limit: int,
             steps: int) -> dict:
    ckpt = work / f"{path.stem}-imported"
    mean, std = ",".join(map(str, mean)), ",".join(map(str, std))
    start = time.perf_counter()
    agreement = cli(["import", str(path), "--data", "cifar10", "--mean", mean, "--std", std,
                     "--layout", layout, "--out", str(ckpt)])
    row: dict = {"file": path.name, "import": agreement,
                 "import_seconds": round(time.perf_counter() - start, 1), "attacks": {}}
    for name, eps in EPS.items():
        start = time.perf_counter()
        result = cli(["attack", "--ckpt", str(ckpt), "--attack", "pgd", "--steps", str(steps),
                      "--eps", str(eps), "--limit", str(limit), "--checks", "none",
                      "--queries", "0"])
        result["seconds"] = round(time.perf_counter() - start, 1)
        row["attacks"][name] = result
    return row


def table(rows: list[dict]) -> str:
    lines = ["| file | runtime | import: identical predictions | max code diff | clean (runtime) "
             "| clean (program) | eps | robust (twin) | robust (runtime) | fool twin | still fool "
             "runtime | transfer |", "|" + "---|" * 12]
    for r in rows:
        a = r["import"]
        for eps, res in r["attacks"].items():
            n_twin, n_rt = res.get("n_fool_twin"), res.get("n_fool_runtime")
            rate = f"{n_rt / n_twin:.3f}" if n_twin else "n/a"
            lines.append(f"| {r['file']} | {r['runtime']} | {a.get('same_prediction')} | "
                         f"{a.get('max_code_diff')} | {a.get('clean_acc_runtime')} | "
                         f"{a.get('clean_acc_integer')} | {eps} | {res['robust_acc']:.3f} | "
                         f"{res.get('robust_acc_runtime', float('nan')):.3f} | {n_twin} | {n_rt} | "
                         f"{rate} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=500, help="test points attacked")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations")
    parser.add_argument("--formats", nargs="*", default=["onnx", "onnx-reduce-range", "tflite"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "import-e2e")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "import_e2e.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mobilenet_cifar import MEAN, STD

    rows = []
    for fmt in ("onnx", "onnx-reduce-range"):  # the file reads (x - MEAN) / STD
        if fmt in args.formats:
            onnx_file = quantize_onnx(args.work, reduce_range=fmt.endswith("range"))
            rows.append({"runtime": "ONNX Runtime", **run_file(onnx_file, "NCHW", MEAN, STD,
                                                               args.work, args.limit, args.steps)})
    if "tflite" in args.formats:  # the Keras model reads x = p / 255
        rows.append({"runtime": "LiteRT", **run_file(MODELS / "model_int8.tflite", "NHWC",
                                                     (0.0,), (1.0,), args.work, args.limit,
                                                     args.steps)})
    from qrobust.provenance import provenance

    report = {"limit": args.limit, "pgd_steps": args.steps, "rows": rows,
              "provenance": provenance()}
    args.out.write_text(json.dumps(report, indent=1, default=str))
    args.out.with_suffix(".md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
