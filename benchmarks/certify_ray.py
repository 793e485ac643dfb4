"""Certification on Ray: throughput with 1 and 2 local workers against one process, Ray's
start-up cost, and the same certificates everywhere.

The one unit of work is :func:`qrobust.eval.certification.certify_images` (what
``qrobust certify`` runs): ``local`` certifies the images in this process with 1 thread,
``ray`` runs one task per image on ``w`` local single-threaded workers. Each run writes a
fresh store. Reported per run: wall seconds (driver start-up of the classifier included, the
same for all), ``ray.init`` seconds, seconds from submitting the tasks to the first result
(worker start, imports, building the classifier, one image), and the steady throughput
(images after the first / seconds between the first and the last result, from the store's
row times). The certificates of every run are compared with the local run's.

    .venv/bin/python benchmarks/certify_ray.py --limit 16 \\
        --out benchmarks/results/certify_ray_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(job, limit: int, executor: str, workers: int | None, certifier) -> dict:
    from qrobust.eval.certification import certify_images

    with tempfile.TemporaryDirectory() as tmp:
        options = {"num_cpus": workers} if executor == "ray" else {}
        result = certify_images(job, tmp, limit, executor, progress=False,
                                certifier=certifier,
                                **options)
    created = sorted(r["created"] for r in result.rows)
    steady = (len(created) - 1) / (created[-1] - created[0]) if len(created) > 1 else None
    certs = {r["config"]["index"]: {k: v for k, v in r["metrics"].items() if k != "seconds"}
             for r in result.rows}
    return {"executor": executor, "workers": workers, "wall_s": result.seconds,
            "images": len(result.rows), "steady_images_per_s": steady, **result.timings,
            "certified_accuracy": result.summary["certified_accuracy"], "_certs": certs}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "benchmarks/models/resnet20-cifar10-noise025"))
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--float", action="store_true", help="float smoothing (default: integer)")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/certify_ray_cifar10.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    from qrobust.eval.certification import Certifier, CertifyJob
    from qrobust.hardware import cpu_info, keep_large_allocations

    keep_large_allocations()  # as the command line and every Ray worker do
    job = CertifyJob(args.ckpt, sigma=args.sigma, n0=args.n0, n=args.n, alpha=0.001,
                     integer=not args.float, backend=args.backend, threads=1)
    certifier = Certifier(job)  # on the driver, shared by the runs (keys, the local run)
    runs = [run(job, args.limit, "local", None, certifier)]
    for w in map(int, args.workers.split(",")):
        runs.append(run(job, args.limit, "ray", w, certifier))
    reference = runs[0].pop("_certs")
    for r in runs[1:]:
        r["certificates_equal_local"] = r.pop("_certs") == reference
    by = {(r["executor"], r["workers"]): r for r in runs}
    ratios = {}
    if ("ray", 1) in by and ("ray", 2) in by:
        one, two = by[("ray", 1)], by[("ray", 2)]
        ratios = {"ray2_vs_ray1_steady_throughput": two["steady_images_per_s"]
                  / one["steady_images_per_s"],
                  "ray2_vs_ray1_wall": one["wall_s"] / two["wall_s"],
                  "ray1_vs_local_steady_throughput": one["steady_images_per_s"]
                  / runs[0]["steady_images_per_s"]}
    result = {"benchmark": "certify_ray", "command": " ".join([".venv/bin/python",
                                                             "benchmarks/certify_ray.py",
                                                             *(argv or sys.argv[1:])]),
              "job": {k: v for k, v in vars(job).items()}, "limit": args.limit, "runs": runs,
              "ratios": ratios, "target": {"ray2_vs_ray1_steady_throughput": 1.8},
              "machine": {"cpu": cpu_info(), "cores": __import__("os").cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "ray": ray.__version__}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    for r in runs:
        print(f"{r['executor']:>5} workers={r['workers']}: wall {r['wall_s']:.1f} s, steady "
              f"{r['steady_images_per_s']:.3f} img/s, ray.init {r.get('ray_init_s', 0):.1f} s, "
              f"first result {r.get('first_result_s') or 0:.1f} s")
    print(json.dumps(ratios, indent=1), f"-> {out}")
    return result


if __name__ == "__main__":
    main()
