"""Does the deployed int8 model compute what the twin computes, on this CPU? Layer by layer.

For each recipe (default ``w8a8`` and ``w8a8,reduce-range``) of one checkpoint, on the whole
test set:

* prediction agreement of the twin with ONNX Runtime and OpenVINO, for the export that trusts
  this CPU's u8 x s8 kernels (int8 weights everywhere, what qrobust did before) and for the
  automatic one (uint8 weights where the pairs could saturate; OpenVINO refuses those);
* per requantized tensor, on ``--layer-images`` clean images and the same images with Gaussian
  noise (sigma, the widened input that integer smoothing uses): the share of ORT's output codes
  that differ from the exact reference executor's, the layer's worst int16 pair sum
  (:func:`qrobust.integer.int8.pair_sum_bound`; > 32767 can saturate without VNNI), and the
  share of the reference codes at the top of their range (activation clipping);
* under noise: label agreement of twin and float model, and of the integer model and twin.

    .venv/bin/python benchmarks/int8_fidelity.py --ckpt benchmarks/models/resnet20-cifar10-noise025
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from qrobust.attacks.evaluate import predict
from qrobust.certify import integer_base, noise_window
from qrobust.checkpoint import load_checkpoint
from qrobust.data import load_dataset, take
from qrobust.errors import ConfigError
from qrobust.hardware import cpu_info
from qrobust.integer import to_integer
from qrobust.integer.base import pixel_codes
from qrobust.integer.int8 import pair_sum_bound
from qrobust.integer.onnx import export_int8, int8_kernels, lower_for_export, session, weight_types
from qrobust.integer.program import ConvOp, LinearOp, RequantOp, input_codes
from qrobust.provenance import provenance
from qrobust.quant import quantize, widen_input


def with_codes_outputs(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``proto`` with every QuantizeLinear output (one per requantized tensor, in program order)
    added as a graph output."""
    names = [n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for name in names:
        out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8,
                                                                   None))
    return out, names


def layer_table(twin, x: torch.Tensor, input_shape, exact_u8s8: bool) -> list[dict]:
    """Per requantized tensor: ORT vs reference code mismatch, pair-sum bound, clipping."""
    program = lower_for_export(twin, input_shape, "onnx")
    proto, names = with_codes_outputs(export_int8(program, "qdq", exact_u8s8))
    requants = [op for op in program.ops if isinstance(op, RequantOp)]
    if len(names) != len(requants):
        raise RuntimeError("QuantizeLinear nodes do not match the program's requantizations")
    layers = {op.out: op for op in program.ops if isinstance(op, (ConvOp, LinearOp))}
    codes = pixel_codes(x, clip=False)
    ref = to_integer(twin).intermediate_codes(codes)
    got = session(proto, threads=1).run(names, {"pixels": input_codes(program.input_op, codes)
                                                .to(torch.uint8).numpy()})
    rows = []
    for op, ort_codes in zip(requants, got, strict=True):
        shifted = 128 if op.lo < 0 else 0  # signed codes are stored as uint8 + 128
        want = ref[op.out].numpy().reshape(ort_codes.shape)
        diff = np.abs(ort_codes.astype(np.int64) - shifted - want)
        sources = [layers[t.slot] for t in op.terms if t.slot in layers]
        rows.append({"tensor": op.out,
                     "pair_sum_bound": max((pair_sum_bound(s.weight) for s in sources),
                                           default=None),
                     "codes_differing": float((diff > 0).mean()),
                     "codes_off_by_more_than_1": float((diff > 1).mean()),
                     "clipped_at_top": float((want == op.hi).mean())})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="benchmarks/models/resnet20-cifar10-noise025")
    parser.add_argument("--recipe", action="append", default=None,
                        help="repeatable; default w8a8 and w8a8,reduce-range")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--layer-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/int8_fidelity.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.ckpt)
    ds = load_dataset(meta["dataset"], args.data_dir)
    calib = take(ds.train, 512, seed=1).tensors()[0]
    x, _ = ds.test.tensors()
    g = torch.Generator().manual_seed(args.seed)
    x_layer = x[:args.layer_images]
    x_noisy = x_layer + args.sigma * torch.randn(x_layer.shape, generator=g)
    report: dict = {"benchmark": "int8_fidelity", "command": " ".join(
        [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "ckpt": args.ckpt, "dataset": ds.name, "images": len(x), "sigma": args.sigma,
        "cpu": cpu_info().to_dict(), "onnxruntime_kernels": int8_kernels().to_dict(),
        **provenance(), "recipes": {}}
    for recipe in args.recipe or ["w8a8", "w8a8,reduce-range"]:
        twin = quantize(model, recipe, calib)
        twin_pred = predict(twin, x)
        program = lower_for_export(twin, ds.input_shape, "onnx")
        pixels = input_codes(program.input_op, pixel_codes(x)).to(torch.uint8).numpy()
        agreement = {}
        for exact, label in ((True, "int8_weights_everywhere"), (False, "auto")):
            ort = session(export_int8(program, "qdq", exact), threads=args.threads)
            pred = torch.from_numpy(ort.run(["logits"], {"pixels": pixels})[0]).argmax(1)
            agreement[f"onnx_{label}"] = float((pred == twin_pred).float().mean())
        agreement["weight_types_auto"] = weight_types(export_int8(program, "qdq", False))
        try:
            ov = to_integer(twin, "openvino", input_shape=ds.input_shape, threads=args.threads)
            agreement["openvino"] = float((predict(ov, x) == twin_pred).float().mean())
        except ConfigError as err:
            agreement["openvino"] = f"refused: {err}"
        wide = widen_input(twin, *noise_window(args.sigma))
        noisy_int = integer_base(twin, args.sigma, "onnx", input_shape=ds.input_shape)
        wide_pred = predict(wide, x_noisy)
        report["recipes"][recipe] = {
            "twin_accuracy": float((twin_pred == ds.test.tensors()[1]).float().mean()),
            "agreement_with_twin": agreement,
            "under_noise": {
                "twin_vs_float_label_agreement": float(
                    (wide_pred == predict(model, x_noisy)).float().mean()),
                "integer_onnx_vs_twin_label_agreement": float(
                    (predict(noisy_int, x_noisy) == wide_pred).float().mean())},
            "layers_clean_int8_weights_everywhere": layer_table(twin, x_layer, ds.input_shape, True),
            "layers_noisy_int8_weights_everywhere": layer_table(wide, x_noisy, ds.input_shape, True),
            "layers_noisy_auto": layer_table(wide, x_noisy, ds.input_shape, False),
        }
        print(recipe, json.dumps(agreement), report["recipes"][recipe]["under_noise"], flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
