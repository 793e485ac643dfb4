"""Images/s at batch 256 for small-cnn (MNIST) and resnet20 (CIFAR-10): torch fp32, ORT fp32,
ORT int8 (w8a8 twin exported with its own scales, QDQ and QOperator formats), OpenVINO fp32 and
int8 (the qdq-rounded-add export; when openvino is installed) and the reference integer
executor, plus this CPU's int8 GEMM throughput (ORT MatMulInteger, torch._int_mm).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/int8_inference.py [--threads 1]

On a CPU whose u8 x s8 kernels saturate (x86 without VNNI) the recipe gets ``reduce-range``
(``--reduce-range auto``, as the CLI does) and, for comparison, ``ort_int8_w8a8_uint8_weights``
times the full 8-bit weights on ORT's exact u8 x u8 kernels.

Backends are timed round-robin (one batch each per round) so that they share the machine's
load; medians over rounds. Speed does not depend on weight values: when a trained checkpoint
is missing, a randomly initialised model (calibrated on random images) is used and the JSON
says so. Writes benchmarks/results/int8_inference.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qrobust.checkpoint import load_checkpoint
from qrobust.hardware import cpu_info
from qrobust.integer.base import pixel_codes
from qrobust.integer.onnx import export_int8, float_model_proto, int8_kernels, session, weight_types
from qrobust.integer.openvino import compile_onnx
from qrobust.integer.program import ConvOp, LinearOp, lower
from qrobust.integer.reference import ReferenceIntegerModel
from qrobust.models import ModelSpec, build_model
from qrobust.provenance import provenance
from qrobust.quant import quantize, resolve_reduce_range

RESULTS = Path(__file__).parent / "results" / "int8_inference.json"
MODELS = {"small-cnn": ("benchmarks/models/small-cnn-mnist", (1, 28, 28), "mnist"),
          "resnet20": ("benchmarks/models/resnet20-cifar10", (3, 32, 32), "cifar10")}


def load_or_random(arch: str) -> tuple[torch.nn.Module, tuple[int, int, int], str, torch.Tensor]:
    path, shape, dataset = MODELS[arch]
    gen = torch.Generator().manual_seed(0)
    if (Path(path) / "model.safetensors").is_file():
        model, _ = load_checkpoint(path)
        source = f"trained checkpoint {path}"
        try:
            from qrobust.data import load_dataset, take

            calib = take(load_dataset(dataset).test, 512).tensors()[0]
        except Exception:  # noqa: BLE001 - the data may be absent; speed does not need it
            calib = torch.rand(512, *shape, generator=gen)
    else:
        torch.manual_seed(0)
        model = build_model(ModelSpec(arch, shape, 10, mean=(0.5,) * shape[0],
                                      std=(0.25,) * shape[0])).eval()
        source = "randomly initialised (trained checkpoint absent; speed does not depend on weights)"
        calib = torch.rand(512, *shape, generator=gen)
    return model.eval(), shape, source, calib


def macs_per_image(program, spatial: dict[str, int]) -> int:
    """Multiply-accumulates of the conv/linear layers for one image."""
    total = 0
    for op in program.ops:
        if isinstance(op, LinearOp):
            total += op.weight.numel()
        elif isinstance(op, ConvOp):
            total += op.weight.numel() * spatial[op.out]
    return total


def conv_spatial(twin, shape) -> dict[str, int]:
    """Output H*W of every conv node (from one traced run)."""
    sizes: dict[str, int] = {}
    hooks = []
    for node in twin.graph.nodes:
        if node.op == "call_module" and isinstance(twin.get_submodule(node.target),
                                                     torch.nn.Conv2d):
            m = twin.get_submodule(node.target)
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, key=node.name: sizes.__setitem__(key, o.shape[-1] * o.shape[-2])))
    with torch.no_grad():
        twin(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return sizes


def gemm_peak(threads: int, rounds: int) -> dict:
    """int8 and fp32 GEMM throughput (GMAC/s) of this CPU: M=4096, K=N=1024."""
    m, k, n = 4096, 1024, 1024
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-127, 128, (k, n), dtype=np.int8)

    def graph(op: str, ta: int, tb: int) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("a", ta, [m, k])]
        inits = [helper.make_tensor("b", tb, [k, n], b.astype(
            np.float32 if tb == TensorProto.FLOAT else np.int8).tobytes(), raw=True)]
        out_t = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
        g = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm", inputs,
                              [helper.make_tensor_value_info("y", out_t, [m, n])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    s_int = session(graph("MatMulInteger", TensorProto.UINT8, TensorProto.INT8), threads)
    s_f32 = session(graph("MatMul", TensorProto.FLOAT, TensorProto.FLOAT), threads)
    af = a.astype(np.float32)
    ta, tb = torch.from_numpy(a.astype(np.int16) - 128).to(torch.int8), torch.from_numpy(b)
    runs = {"ort_matmulinteger_u8s8": lambda: s_int.run(None, {"a": a}),
            "ort_matmul_fp32": lambda: s_f32.run(None, {"a": af}),
            "torch_int_mm_s8s8": lambda: torch._int_mm(ta, tb)}
    times = timed_round_robin(runs, rounds)
    return {name: {"median_s": t, "gmac_per_s": m * k * n / t / 1e9} for name, t in times.items()}


def timed_round_robin(runs: dict[str, Callable[[], object]], rounds: int,
                      slow: dict[str, int] | None = None) -> dict[str, float]:
    """Median seconds of each callable; one call of each per round (warm-up call first)."""
    slow = slow or {}
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for r in range(rounds):
        for name, fn in runs.items():
            if r >= slow.get(name, rounds):
                continue
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_model(arch: str, batch: int, rounds: int, threads: int, ref_rounds: int,
                openvino: bool, recipe: str) -> dict:
    model, shape, source, calib = load_or_random(arch)
    twin = quantize(model, recipe, calib)
    program = lower(twin, shape)
    exact = int8_kernels().exact_u8s8  # False: unsafe layers get uint8 weights (exact, slower)
    spatial = conv_spatial(twin, shape)
    x = calib[:batch] if len(calib) >= batch else torch.rand(batch, *shape)
    x = torch.cat([x] * (-(-batch // len(x))))[:batch]
    codes = pixel_codes(x)
    u8 = codes.to(torch.uint8).numpy()
    xf = x.numpy()
    ort_int8 = session(export_int8(program, "qdq", exact), threads)
    ort_qop = session(export_int8(program, "qoperator", exact), threads)
    ort_fp32 = session(float_model_proto(program), threads)
    reference = ReferenceIntegerModel(twin, shape)
    runs = {
        "torch_fp32": lambda: _no_grad(model, x),
        "ort_fp32": lambda: ort_fp32.run(["logits"], {"x": xf}),
        "ort_int8": lambda: ort_int8.run(["logits"], {"pixels": u8}),
        "ort_int8_qoperator": lambda: ort_qop.run(["logits"], {"pixels": u8}),
        "reference_int": lambda: reference.forward_pixels(codes),
    }
    if not exact:  # the cost of exact full 8-bit weights on this CPU
        full8 = lower(quantize(model, "w8a8", calib), shape)
        ort_u8u8 = session(export_int8(full8, "qdq", exact_u8s8=False), threads)
        runs["ort_int8_w8a8_uint8_weights"] = lambda: ort_u8u8.run(["logits"], {"pixels": u8})
    if openvino:
        ov_int8 = compile_onnx(export_int8(program, "qdq-rounded-add", exact), threads)
        ov_fp32 = compile_onnx(float_model_proto(program), threads)
        runs["openvino_fp32"] = lambda: ov_fp32({"x": xf})[ov_fp32.output(0)]
        runs["openvino_int8"] = lambda: ov_int8({"pixels": u8})[ov_int8.output(0)]
    med = timed_round_robin(runs, rounds, slow={"reference_int": ref_rounds})
    macs = macs_per_image(program, spatial)
    ips = {k: batch / v for k, v in med.items()}
    want = reference.forward_pixels(codes).argmax(1)
    row = {"model": arch, "input_shape": list(shape), "weights": source, "batch": batch,
           "recipe": recipe, "weight_types": weight_types(export_int8(program, "qdq", exact)),
           "median_seconds_per_batch": med, "images_per_s": ips,
           "int8_over_ort_fp32": ips["ort_int8"] / ips["ort_fp32"],
           "int8_qoperator_over_ort_fp32": ips["ort_int8_qoperator"] / ips["ort_fp32"],
           "int8_over_torch_fp32": ips["ort_int8"] / ips["torch_fp32"],
           "macs_per_image": macs}
    for name in [k for k in ips if k.endswith(("int8", "fp32")) and not k.startswith("torch")]:
        row[f"{name}_gmac_per_s"] = macs * ips[name] / 1e9
    logits = {"ort_int8": runs["ort_int8"]()[0]}
    if openvino:
        logits["openvino_int8"] = runs["openvino_int8"]()
    for name, got in logits.items():
        agree = (torch.from_numpy(np.asarray(got)).argmax(1) == want).float().mean()
        row[f"{name}_vs_reference_prediction_agreement"] = float(agree)
    if openvino:
        row["openvino_int8_over_ort_fp32"] = ips["openvino_int8"] / ips["ort_fp32"]
        row["openvino_int8_over_openvino_fp32"] = ips["openvino_int8"] / ips["openvino_fp32"]
        # the deployment question: the fastest int8 runtime against the fastest fp32 one
        row["best_int8_over_best_fp32"] = (max(ips["ort_int8"], ips["openvino_int8"])
                                           / max(ips["ort_fp32"], ips["openvino_fp32"]))
    return row


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ref-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="small-cnn,resnet20")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--reduce-range", default="auto", choices=("auto", "on", "off"),
                    help="7-bit weight codes where this CPU's u8 x s8 kernels saturate")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = gemm_peak(args.threads, args.rounds)
    openvino = importlib.util.find_spec("openvino") is not None  # an optional dependency
    recipe = resolve_reduce_range(args.recipe, args.reduce_range).text
    rows = [bench_model(a, args.batch, args.rounds, args.threads, args.ref_rounds, openvino, recipe)
            for a in args.models.split(",")]
    int8_peak = peak["ort_matmulinteger_u8s8"]["gmac_per_s"]
    for row in rows:
        for name in ("ort_int8", "openvino_int8"):
            if f"{name}_gmac_per_s" in row:
                row[f"{name}_fraction_of_int8_gemm_peak"] = row[f"{name}_gmac_per_s"] / int8_peak
    out = {"benchmark": "int8_inference", "threads": args.threads, "rounds": args.rounds,
           "recipe": f"{recipe} (per-channel symmetric weights, uint8 activations)",
           "cpu": cpu_info().to_dict(), "onnxruntime_kernels": int8_kernels().to_dict(),
           "formats": "ort_int8: QDQ export (ORT fuses it into QLinearConv/QLinearAdd/QGemm); "
                      "ort_int8_qoperator: the same program written as QLinear ops; "
                      "openvino_int8: the qdq-rounded-add export (residual-add inputs rounded "
                      "by explicit float ops) compiled by OpenVINO, float parts in fp32; "
                      "*_fp32: the same network in float32 (BatchNorm folded)",
           "command": f"OMP_NUM_THREADS={args.threads} nice -n 10 .venv/bin/python "
                      f"benchmarks/int8_inference.py --threads {args.threads} --rounds "
                      f"{args.rounds} --recipe {args.recipe} --reduce-range {args.reduce_range}",
           "cpu_int8_gemm": peak, "models": rows, "target_int8_over_ort_fp32": 2.5,
           "note": "medians of round-robin rounds (one batch of each backend per round) on a "
                   "shared 2-core machine",
           **provenance()}
    target = Path(args.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
