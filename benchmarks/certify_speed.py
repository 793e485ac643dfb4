"""Certification speed and certified accuracy: float smoothing vs integer-only smoothing.

Three certifiers on the same checkpoint, the same test images and the same n0 / n / alpha:

* ``reference_fp32``: a straightforward Cohen-style fp32 loop written here independently
  (per image: repeat the image, add sigma * randn, run the float model, bincount; the
  Clopper-Pearson bound from scipy's beta quantile), as in locuslab/smoothing core.py;
* ``ours_float``: :class:`qrobust.certify.Smoothed` with :class:`GaussianNoise`;
* ``ours_float_clipped`` (opt-in): the same with ``GaussianNoise(clip=True)``, i.e. float
  smoothing of f(clip(x + noise, 0, 1)), the float counterpart of ``--integer-input clipped``;
* ``ours_integer``: :class:`Smoothed` with :class:`IntegerNoise` (integer noise from an alias
  table, rounded-Gaussian by default or ``--noise discrete-gaussian``, pixel codes, the ONNX
  Runtime int8 IntegerModel of the w8a8 twin). By default (``--integer-input wide``) the
  twin's input window is widened to [-6 sigma, 1 + 6 sigma] (:func:`qrobust.certify.
  integer_base`), so it classifies the unclipped noisy image as the float smoothing does;
  ``--integer-input clipped`` smooths f(clip(codes, 0, 255)) instead;
* ``ours_float_twin`` (with ``--twin``): float smoothing of the fake-quant twin, to tell the
  accuracy cost of quantization from that of the integer noise and radius.
* ``ort_fp32`` and ``openvino_fp32`` (opt-in, issue 17): ``ours_float``'s smoothing with the
  float model run by ONNX Runtime or OpenVINO in fp32 (torch's ONNX export of the model, the
  same threads): the integer path against the best float runtime, not only against torch.

Timing includes noise generation and the n0 selection pass. The methods run interleaved,
image by image (one image with every method, then the next), so a shared, noisy machine
slows them alike; the JSON reports total seconds, images/s, the median per-image time and
the ratios of medians and of totals, plus certified accuracy at radii 0, 0.25, 0.5, 0.75.

    .venv/bin/python benchmarks/certify_speed.py --ckpt benchmarks/models/resnet20-cifar10 \\
        --n 10000 --limit 100 --sigma 0.25
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta, norm
from tqdm import tqdm

RADII = (0.0, 0.25, 0.5, 0.75)


def reference_certify(model, x, sigma, n0, n, alpha, batch, num_classes, generator):
    """Cohen et al.'s CERTIFY for one image x (1, C, H, W), fp32, straightforwardly."""

    def sample(num):
        counts = np.zeros(num_classes, dtype=np.int64)
        remaining = num
        with torch.no_grad():
            while remaining > 0:
                this = min(batch, remaining)
                remaining -= this
                rep = x.repeat((this, 1, 1, 1))
                noise = torch.randn(rep.shape, generator=generator) * sigma
                pred = model(rep + noise).argmax(1)
                counts += np.bincount(pred.numpy(), minlength=num_classes)
        return counts

    c_a = int(sample(n0).argmax())
    n_a = int(sample(n)[c_a])
    p_a = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
    if p_a < 0.5:
        return None, 0.0
    return c_a, sigma * norm.ppf(p_a)


def float_runtime(model, input_shape, runtime: str, threads: int):
    """The float model as ONNX Runtime or OpenVINO runs it in fp32: images -> logits."""
    import io

    import onnx

    from qrobust.integer.onnx import session
    from qrobust.integer.openvino import compile_onnx

    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.zeros(1, *input_shape),), buffer, dynamo=False,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}})
    proto = onnx.load_from_string(buffer.getvalue())
    if runtime == "ort":
        sess = session(proto, threads)
        return lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    compiled = compile_onnx(proto, threads)
    return lambda x: torch.from_numpy(compiled({"x": x.numpy()})[compiled.output(0)].copy())


def certified(results, labels):
    """Certified accuracy at RADII of (label, radius) pairs: the library's definition."""
    from types import SimpleNamespace

    from qrobust.certify.smoothing import certified_accuracy

    outcomes = [SimpleNamespace(label=c, radius=rad) for c, rad in results]
    return {f"{r:g}": acc for r, acc in certified_accuracy(outcomes, labels, RADII).items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/digits-cnn-noise025")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--limit", type=int, default=50, help="a seeded choice of N test images")
    parser.add_argument("--first", type=int, default=None,
                        help="test images 0..N-1 in order instead of --limit's seeded choice")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--recipe", default="w8a8")
    parser.add_argument("--reduce-range", default="auto", choices=("auto", "on", "off"),
                        help="7-bit weight codes where this CPU's int8 kernels saturate (as the CLI)")
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--extra-backends", default="",
                        help="comma-separated integer backends also run (method ours_integer_<name>)")
    parser.add_argument("--noise", default="rounded-gaussian",
                        help="integer noise: rounded-gaussian or discrete-gaussian (IntRS)")
    parser.add_argument("--integer-input", choices=("wide", "clipped"), default="wide",
                        help="the integer base classifier's input: the unclipped noisy image "
                             "(input window widened to 6 sigma) or codes clipped to [0, 255]")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    parser.add_argument("--twin", action="store_true",
                        help="also float-smooth the fake-quant twin (separates the effect of "
                             "quantization from that of the integer noise on accuracy)")
    parser.add_argument("--methods", default="reference_fp32,ours_float,ours_integer",
                        help="comma-separated subset of reference_fp32, ours_float, "
                             "ours_float_clipped, ort_fp32, openvino_fp32, ours_integer "
                             "(ours_integer is always run: the ratios are against it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/certify_speed.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (same settings) from its last image")
    args = parser.parse_args(argv)

    from qrobust.certify import GaussianNoise, Smoothed
    from qrobust.certify.build import holds_for, image_generator, noisy_classifier
    from qrobust.checkpoint import load_checkpoint
    from qrobust.data import load_dataset, take
    from qrobust.eval.certification import select_indices
    from qrobust.hardware import cpu_info, keep_large_allocations

    # as the command line runs: torch's float batches (65 MB activations) from the heap, not
    # fresh mmap pages (2.0x torch fp32 smoothing on resnet20 at 2 threads; runs before
    # 2026-12-04 did not, and their ours_float / reference_fp32 rows paid for it)
    allocator_tuned = keep_large_allocations()
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.ckpt)
    ds = load_dataset(meta["dataset"], args.data_dir)
    calib = take(ds.train, 512, seed=1).tensors()[0]
    x_all, y_all = ds.test.tensors()
    idx = (np.arange(min(args.first, len(y_all))) if args.first is not None
           else select_indices(len(y_all), args.limit))
    k = ds.num_classes

    def integer(backend):  # exactly what `qrobust certify --integer` builds
        options = {"threads": args.threads} if backend in ("onnx", "openvino") else {}
        return noisy_classifier(model, sigma=args.sigma, integer=True, noise=args.noise,
                                quantized=meta.get("kind") == "quantized", recipe=args.recipe,
                                reduce_range=args.reduce_range, calib=calib, backend=backend,
                                integer_input=args.integer_input, input_shape=ds.input_shape,
                                **options)

    noisy_i = integer(args.backend)
    ours_f = Smoothed(GaussianNoise(model, args.sigma), k, batch_size=args.batch_size)
    ours_i = Smoothed(noisy_i, k, batch_size=args.batch_size)
    extra = [b for b in args.extra_backends.split(",") if b]
    deployments = {"ours_integer": holds_for(noisy_i)}

    def run_ours(sm):
        def go(x, g):
            c = sm.certify(x, args.n0, args.n, args.alpha, g)[0]
            return c.label, c.radius
        return go

    methods = {
        "reference_fp32": lambda x, g: reference_certify(model, x, args.sigma, args.n0, args.n,
                                                         args.alpha, args.batch_size, k, g),
        "ours_float": run_ours(ours_f),
        # the base classifier IntRS certifies: f(clip(x + noise)), in float
        "ours_float_clipped": run_ours(Smoothed(GaussianNoise(model, args.sigma, clip=True), k,
                                                batch_size=args.batch_size)),
        "ours_integer": run_ours(ours_i),
    }
    keep = set(args.methods.split(",")) | {"ours_integer"}
    for runtime in ("ort", "openvino"):  # built only when asked for (OpenVINO is an extra)
        if f"{runtime}_fp32" in keep:
            base = float_runtime(model, tuple(ds.input_shape), runtime, args.threads)
            methods[f"{runtime}_fp32"] = run_ours(Smoothed(GaussianNoise(base, args.sigma), k,
                                                           batch_size=args.batch_size))
    unknown = keep - set(methods)
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {sorted(methods)}")
    methods = {name: fn for name, fn in methods.items() if name in keep}
    for backend in extra:
        noisy = integer(backend)
        deployments[f"ours_integer_{backend}"] = holds_for(noisy)
        methods[f"ours_integer_{backend}"] = run_ours(Smoothed(noisy, k, batch_size=args.batch_size))
    if args.twin:
        from qrobust.quant import quantize, resolve_reduce_range

        twin = quantize(model, resolve_reduce_range(args.recipe, args.reduce_range), calib)
        methods["ours_float_twin"] = run_ours(Smoothed(GaussianNoise(twin, args.sigma), k,
                                                       batch_size=args.batch_size))
    # warm-up (ONNX session, allocator) outside the timings
    for fn in methods.values():
        fn(x_all[:1], torch.Generator().manual_seed(0))
    times = {m: [] for m in methods}
    cpu_times = {m: [] for m in methods}
    results = {m: [] for m in methods}
    eta = ours_i.noisy.eta(tuple(ds.input_shape))
    machine = {"cpu": cpu_info().to_dict(), "deployments": deployments,
               "large_allocations_kept": allocator_tuned}
    if args.resume and Path(args.out).is_file():
        machine["earlier_segments"] = restore(Path(args.out), args, idx, times, cpu_times, results)
    out: dict = {}
    for i in tqdm(idx[len(results["ours_integer"]):].tolist(), desc="certify", unit="img"):
        x = x_all[i:i + 1]
        for name, fn in methods.items():
            g = image_generator(args.seed, i)
            start, cpu_start = time.perf_counter(), time.process_time()
            results[name].append(fn(x, g))
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
        # rewritten after every image: a stopped run keeps what it certified
        out = summarize(args, argv, meta, ds.name, eta, idx, y_all, times, cpu_times, results,
                        machine)
    # a resumed run with nothing left to certify still reports what it holds
    return out or summarize(args, argv, meta, ds.name, eta, idx, y_all, times, cpu_times,
                            results, machine)


def settings(args) -> dict:
    """What a run's numbers depend on: stored in its JSON, and what --resume must match."""
    return {"ckpt": args.ckpt, "sigma": args.sigma, "n0": args.n0, "n": args.n,
            "alpha": args.alpha, "batch_size": args.batch_size, "threads": args.threads,
            "recipe": args.recipe, "reduce_range": args.reduce_range, "backend": args.backend,
            "integer_noise": args.noise, "integer_input": args.integer_input}


def restore(path: Path, args, idx, times, cpu_times, results) -> list[dict]:
    """Refill ``results`` (and the per-image times where stored) from a stopped run in ``path``;
    refuses a run made with other settings. Returns the earlier runs' own speed blocks, kept
    because images certified before per-image times were stored have only totals."""
    old = json.loads(path.read_text())
    differ = {k: (old.get(k), v) for k, v in settings(args).items() if old.get(k) != v}
    if differ or set(old["methods"]) != set(results):
        sys.exit(f"--resume: {path} was made with other settings or methods: {differ}")
    if [e["index"] for e in old["per_image"]] != idx[:len(old["per_image"])].tolist():
        sys.exit(f"--resume: {path} certified other images than --first/--limit choose")
    for entry in old["per_image"]:
        for name in results:
            results[name].append((entry[name]["prediction"], entry[name]["radius"]))
            times[name].append(entry[name].get("seconds"))  # None: not timed per image
            cpu_times[name].append(entry[name].get("cpu_seconds"))
    earlier = old["machine"].get("earlier_segments", [])
    # a run from before per-image times: its speed totals are all that is left of them
    if all(e[name].get("seconds") is None for e in old["per_image"] for name in results):
        earlier = [*earlier, {"images": old["images"], "methods": {
            name: {k: v for k, v in r.items() if "second" in k or "_s_" in k}
            for name, r in old["methods"].items()}}]
    return earlier


def radius_differences(results, labels, method: str, base: str) -> dict:
    """(method radius - base radius) per image, counting an abstention or a wrong label as
    radius 0 (what certified accuracy sees): mean, quantiles, and how many differ by > 0.05."""
    def r(c, rad, y):
        return rad if c == y else 0.0
    d = np.array([r(*a, y) - r(*b, y) for a, b, y in zip(results[method], results[base], labels,
                                                          strict=True)])
    q = np.quantile(d, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "quantiles_0_10_25_50_75_90_100": [float(v) for v in q],
            "more_than_0.05_smaller": int((d < -0.05).sum()),
            "more_than_0.05_larger": int((d > 0.05).sum())}


def summarize(args, argv, meta, dataset, eta, idx, y_all, times, cpu_times, results,
              machine) -> dict:
    """The JSON of the images certified so far (written to ``args.out``)."""
    done = len(next(iter(times.values())))
    labels = y_all[idx[:done]].tolist()
    report = {}
    for name in times:  # speed over the images timed per image (a resumed run may lack some)
        wall = [t for t in times[name] if t is not None] or [float("nan")]
        cpu = [t for t in cpu_times[name] if t is not None] or [float("nan")]
        report[name] = {"timed_images": len(wall), "seconds": sum(wall), "cpu_seconds": sum(cpu),
                        "images_per_s": len(wall) / sum(wall),
                        "median_s_per_image": statistics.median(wall),
                        "median_cpu_s_per_image": statistics.median(cpu),
                        "certified_accuracy": certified(results[name], labels),
                        "abstain_rate": sum(c is None for c, _ in results[name]) / done}
    ratio = {}
    for base in ("reference_fp32", "ours_float", "ours_float_clipped", "ours_float_twin",
                 "ort_fp32", "openvino_fp32"):
        if base not in report:
            continue
        ratio[f"ours_integer_vs_{base}"] = {
            "speedup_of_medians": report[base]["median_s_per_image"]
            / report["ours_integer"]["median_s_per_image"],
            "speedup_of_totals": report[base]["seconds"] / report["ours_integer"]["seconds"],
            "speedup_of_cpu_seconds": report[base]["cpu_seconds"]
            / report["ours_integer"]["cpu_seconds"],
            "radius_difference": radius_differences(results, labels, "ours_integer", base),
            "certified_accuracy_diff_points": {
                r: 100 * (report["ours_integer"]["certified_accuracy"][r]
                          - report[base]["certified_accuracy"][r])
                for r in report[base]["certified_accuracy"]},
        }
    out = {"benchmark": "certify_speed", "command": " ".join([Path(sys.argv[0]).name, *(argv or
                                                                                    sys.argv[1:])]),
           "dataset": dataset, "arch": meta["model"]["arch"], "images": done,
           "images_planned": len(idx), **settings(args),
           "indices": "first" if args.first is not None else "seeded", "integer_radius_eta": eta, "methods": report,
           "ratios": ratio,
           "per_image": [{"index": int(i), "label": int(y), **{
               name: {"prediction": results[name][j][0], "radius": float(results[name][j][1]),
                      "seconds": times[name][j], "cpu_seconds": cpu_times[name][j]}
               for name in results}} for j, (i, y) in enumerate(zip(idx[:done].tolist(), labels,
                                                                   strict=True))],
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), **machine},
           "note": "times include noise generation and the n0 pass; methods interleaved per "
                   "image on a shared machine"}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    res = main()
    for name, r in res["methods"].items():
        acc = " ".join(f"{k}:{v:.3f}" for k, v in r["certified_accuracy"].items())
        print(f"{name:15s} {r['images_per_s']:8.3f} img/s  median {r['median_s_per_image']:.3f}s"
              f"  cert acc {acc}")
    for name, r in res["ratios"].items():
        print(f"{name}: x{r['speedup_of_medians']:.2f} (medians), x{r['speedup_of_totals']:.2f}"
              f" (totals), acc diff {r['certified_accuracy_diff_points']}")
    print(f"integer radius eta = {res['integer_radius_eta']:.3g}")
