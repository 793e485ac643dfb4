"""The verifier of :mod:`qrobust.verify` on the published QNN verification benchmark of
Henzinger, Lechner and Zikelic ("Scalable Verification of Quantized Neural Networks",
arXiv 2012.08185): two 784-64-32 integer MLPs (MNIST, Fashion-MNIST) and L-infinity queries
in pixel codes.

A benchmark-only reader (not a product format): the Keras HDF5 weights in
``../shared/data/qnn-verification`` (read with h5py, a benchmark-only dependency: ``pip
install h5py``) become a qrobust integer :class:`Program` with the README's semantics:
input codes p (zero point 0, step 1); ``acc = p . w1 + 512 c1``; ``h = clamp(floor((acc +
256) / 512), 0, 63)`` = fixed point with m = 1, S = 9; ``acc = h . w2 + 32 c2``; ``out =
clamp(floor((acc + 16) / 32), -32, 31)`` = m = 1, S = 5; prediction = first index of the
maximum of the 32 outputs, which is the reference executor's argmax rule (torch.argmax). The
script first checks the reading against the README (test accuracy, misclassified MNIST ids
among 0..399) and against a second, numpy-only implementation of the README's semantics
(:func:`readme_predict`, same predictions on the whole test set), then verifies a sample of
queries (only correctly classified images, as the paper) and writes
benchmarks/results/qnn_verification_sample.json (``--out`` for another file); every counterexample is re-checked by the
numpy implementation (``counterexample_confirmed``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qnn_verification.py \\
        --query mnist:0-19:1 --query mnist:100-119:2 --timeout 60
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from qrobust.data import load_dataset
from qrobust.integer.program import FlattenOp, InputOp, LinearOp, OutputOp, Program, RequantOp, Term
from qrobust.integer.reference import execute
from qrobust.provenance import provenance
from qrobust.verify import verify

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "qnn-verification"
NETWORKS = {"mnist": ("mnist_mlp.h5", "mnist"), "fashion-mnist": ("fashion-mnist_mlp.h5",
                                                                 "fashion-mnist")}
README_ACCURACY = {"mnist": 0.9708, "fashion-mnist": 0.8560}
README_MNIST_ERRORS = [18, 149, 217, 241, 247, 259, 321, 340, 381]  # among test ids 0..399
# the paper's Boolector outcome per query set (README table): robust, vulnerable, timeouts
PUBLISHED = {("mnist", 0, 99, 1): (99, 0, 0), ("mnist", 100, 199, 2): (91, 3, 5),
             ("mnist", 200, 299, 3): (70, 1, 25), ("mnist", 300, 399, 4): (53, 1, 43),
             ("fashion-mnist", 0, 99, 1): (76, 0, 11), ("fashion-mnist", 100, 199, 2): (72, 1, 17),
             ("fashion-mnist", 200, 249, 3): (26, 1, 16),
             ("fashion-mnist", 300, 349, 4): (18, 0, 26)}


def _round(v: np.ndarray) -> np.ndarray:
    """round(v) = floor(v + 1/2), ties up also for negatives (the README's rule)."""
    return np.floor(v.astype(np.float64) + 0.5)


def _dataset(h5: h5py.File, layer: str, leaf: str) -> np.ndarray:
    found = []
    h5[layer].visititems(lambda name, obj: found.append(obj[()]) if (
        isinstance(obj, h5py.Dataset) and name.split("/")[-1] == leaf) else None)
    if len(found) != 1:
        raise ValueError(f"expected one '{leaf}' under '{layer}', found {len(found)}")
    return np.asarray(found[0])


def read_network(path: Path) -> Program:
    """The integer program of one benchmark network (input (1, 28, 28) pixel codes)."""
    with h5py.File(path, "r") as h5:
        layers = [(_dataset(h5, name, "kernel:0"), _dataset(h5, name, "bias:0"))
                  for name in ("quantized_dense", "quantized_dense_1")]
    ops: list = [InputOp("x", torch.zeros(1, dtype=torch.long), 1, torch.zeros(1, dtype=torch.long)),
                 FlattenOp("flat", "x")]
    prev = "flat"
    # (bias factor, shift, clamp) per layer: acc = x . w + factor c; out = clamp(floor((acc +
    # 2^(S-1)) / 2^S), lo, hi)
    plan = [(512, 9, (0, 63)), (32, 5, (-32, 31))]
    for k, ((kernel, bias), (factor, shift, (lo, hi))) in enumerate(zip(layers, plan, strict=True)):
        w = np.clip(_round(kernel * 32.0), -32, 31).astype(np.int64)
        c = np.clip(_round(bias * 16.0), -32, 31).astype(np.int64)
        out = w.shape[1]
        ops.append(LinearOp(f"dense{k}", prev, 0, torch.from_numpy(w.T.copy()),
                            torch.from_numpy(c * factor),
                            torch.full((out,), 2.0 ** -(8 + 5 + 4 * k), dtype=torch.float64)))
        ones = torch.ones(out, dtype=torch.long)
        term = Term(f"dense{k}", 0, ones, torch.full((out,), 2.0**-shift, dtype=torch.float64))
        ops.append(RequantOp(f"act{k}", (term,), torch.full((out,), shift, dtype=torch.long),
                             0, lo, hi))
        prev = f"act{k}"
    ops.append(OutputOp(prev, torch.tensor(1.0, dtype=torch.float64), 0))
    return Program(tuple(ops), (1, 28, 28), {})


def readme_outputs(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The README's semantics written out once more in numpy int64, independent of qrobust's
    Program and executor: pixels (N, 784) -> the 32 output codes (N, 32)."""
    with h5py.File(path, "r") as h5:
        (k1, b1), (k2, b2) = [(_dataset(h5, n, "kernel:0"), _dataset(h5, n, "bias:0"))
                              for n in ("quantized_dense", "quantized_dense_1")]
    w1, w2 = (np.clip(_round(k * 32.0), -32, 31).astype(np.int64) for k in (k1, k2))
    c1, c2 = (np.clip(_round(b * 16.0), -32, 31).astype(np.int64) for b in (b1, b2))
    h = np.clip((pixels.astype(np.int64) @ w1 + 512 * c1 + 256) // 512, 0, 63)
    return np.clip((h @ w2 + 32 * c2 + 16) // 32, -32, 31)


def readme_predict(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Predictions (N,): the first index of the maximum (np.argmax)."""
    return readme_outputs(path, pixels).argmax(1)


def test_set(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Test pixel codes (N, 1, 28, 28) int64 and labels (N,)."""
    split = load_dataset(NETWORKS[name][1]).test
    return torch.from_numpy(split.x.astype(np.int64)), torch.from_numpy(split.y.astype(np.int64))


def predictions(program: Program, x: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    return torch.cat([execute(program, x[i:i + chunk])["logits"].argmax(1)
                      for i in range(0, len(x), chunk)])


def check_reading(name: str, program: Program, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Test accuracy (and MNIST's misclassified ids 0..399) against the README's."""
    pred = predictions(program, x)
    wrong = (pred != y).nonzero().squeeze(1)
    accuracy = 1.0 - len(wrong) / len(y)
    numpy_pred = readme_predict(DATA / NETWORKS[name][0], x.flatten(1).numpy())
    check = {"accuracy": accuracy, "readme_accuracy": README_ACCURACY[name],
             "accuracy_matches": abs(accuracy - README_ACCURACY[name]) < 5e-5,
             "program_equals_numpy_reading": bool((pred.numpy() == numpy_pred).all())}
    if name == "mnist":
        ids = [int(i) for i in wrong if i < 400]
        check |= {"misclassified_0_399": ids, "ids_match": ids == README_MNIST_ERRORS}
    return check


def parse_query(text: str) -> tuple[str, int, int, int]:
    """'mnist:0-19:1' -> ('mnist', 0, 19, 1)."""
    name, ids, eps = text.split(":")
    first, last = (int(v) for v in ids.split("-"))
    return name, first, last, int(eps)


def run_queries(name: str, first: int, last: int, eps: int, program: Program, x: torch.Tensor,
                y: torch.Tensor, timeout: float, ties: str = "first") -> list[dict]:
    """Verify the correctly classified test images first..last at eps; every counterexample
    is re-checked against :func:`readme_predict` and the box."""
    path = DATA / NETWORKS[name][0]
    rows = []
    pred = predictions(program, x[first:last + 1])
    for i in range(first, last + 1):
        row = {"dataset": name, "id": i, "label": int(y[i]), "eps": eps}
        if int(pred[i - first]) != int(y[i]):
            rows.append(row | {"status": "skipped (misclassified)"})
            continue
        verdict = verify(program, x[i], int(y[i]), eps, timeout=timeout, ties=ties)
        row |= {"status": verdict.status, "seconds": round(verdict.seconds, 3),
                "nodes": verdict.nodes, "method": verdict.method}
        if verdict.counterexample is not None:
            cex = verdict.counterexample
            changed = (cex != x[i]).flatten().nonzero().squeeze(1)
            independent = readme_outputs(path, cex.flatten()[None].numpy())[0]
            wrong = (independent.argmax() != int(y[i]) if ties == "first" else
                     independent.max() > independent[int(y[i])])
            in_box = bool(((cex - x[i]).abs() <= eps).all() and cex.min() >= 0 and cex.max() <= 255)
            row |= {"prediction": int(predictions(program, cex[None])[0]),
                    "readme_numpy_outputs": independent.tolist(),
                    "counterexample_confirmed": bool(in_box and wrong),
                    "changed_pixels": changed.tolist(),
                    "changed_values": cex.flatten()[changed].tolist()}
        logging.info("%s id %d eps %d: %s (%.2fs, %d nodes)", name, i, eps, verdict.status,
                     verdict.seconds, verdict.nodes)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    done = [r for r in rows if "seconds" in r]
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("robust", "vulnerable", "timeout", "skipped (misclassified)")}
    secs = [r["seconds"] for r in done]
    methods = {m: sum(r.get("method") == m for r in done)
               for m in ("attack", "branch-and-bound", "milp")}
    return counts | {"decided_by": methods} | (
        {"median_seconds": statistics.median(secs), "max_seconds": max(secs)} if secs else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query", action="append", default=None,
                        help="dataset:first-last:eps (repeatable; default mnist:0-19:1 and "
                             "mnist:100-119:2)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--ties", choices=("first", "label"), default="first",
                        help="first: the README's rule (lowest index wins a tie); label: the "
                             "label wins ties")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "qnn_verification_sample.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    queries = [parse_query(q) for q in (args.query or ["mnist:0-19:1", "mnist:100-119:2"])]
    start = time.perf_counter()
    report: dict = {"benchmark": "Henzinger et al. arXiv 2012.08185 (mlech26l/"
                                 "qnn_robustness_benchmarks @87e141d)",
                    "timeout_seconds": args.timeout, "threads": 1, "ties": args.ties,
                    "cpu": platform.processor() or platform.machine(), "checks": {}, "sets": []}
    for name in sorted({q[0] for q in queries}):
        program = read_network(DATA / NETWORKS[name][0])
        x, y = test_set(name)
        report["checks"][name] = check_reading(name, program, x, y)
        logging.info("%s reading: %s", name, report["checks"][name])
        for q in (q for q in queries if q[0] == name):
            rows = run_queries(*q, program, x, y, args.timeout, args.ties)
            published = next((v for k, v in PUBLISHED.items()
                              if k[0] == name and k[1] <= q[1] and q[2] <= k[2] and k[3] == q[3]),
                             None)
            report["sets"].append({"dataset": name, "ids": [q[1], q[2]], "eps": q[3],
                                   "summary": summary(rows),
                                   "published_set_outcome_robust_vulnerable_timeout": published,
                                   "rows": rows})
            logging.info("%s %d-%d eps %d: %s", name, q[1], q[2], q[3], summary(rows))
            write(report, start, args.out)  # after every set: a cut-off run keeps its sets
    write(report, start, args.out)
    return 0


def write(report: dict, start: float, out: Path) -> None:
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["provenance"] = provenance()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(out)


if __name__ == "__main__":
    raise SystemExit(main())
