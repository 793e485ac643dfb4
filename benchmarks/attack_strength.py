"""How strong is each attack, on the same images: qrobust's suites against independent PGDs.

Columns (robust accuracy, lower is stronger), on one seeded subset of the test set:

* ``fast``: ``qrobust attack --attack fast`` (PGD-10, one restart: qrobust's former default);
* ``torchattacks_pgd20``: torchattacks' PGD, 20 steps, one random start;
* ``torchattacks_pgd50x3``: the same at 50 steps, worst case over 3 random starts;
* ``foolbox_linfpgd40``: Foolbox's LinfPGD, 40 steps (when foolbox is installed; it is not a
  qrobust dependency: ``pip install foolbox``);
* ``standard``: ``qrobust attack`` (the standard suite at its published budget).

Every PGD uses the step size 2.5 eps / steps (Madry et al.). The JSON also holds each column's
wall seconds and its cost relative to ``fast``, and the standard suite's per-stage breaks.

    .venv/bin/python benchmarks/attack_strength.py --ckpt benchmarks/models/small-cnn-mnist \\
        --n 500 --eps 0.1,0.2,0.3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from qrobust.attacks.evaluate import predict
from qrobust.checkpoint import load_checkpoint
from qrobust.data import load_dataset, take
from qrobust.eval.robustness import RobustnessSpec, robustness_cell
from qrobust.hardware import cpu_info
from qrobust.provenance import provenance
from qrobust.quant import quantize


def robust(model, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return predict(model, x_adv, 500) == y


def torchattacks_pgd(model, x, y, eps, steps, restarts) -> float:
    import torchattacks

    still = torch.ones(len(y), dtype=torch.bool)
    with torch.random.fork_rng():  # torchattacks draws its random start from the global RNG
        for seed in range(restarts):
            torch.manual_seed(seed)
            atk = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                                   random_start=True)
            still &= robust(model, atk(x, y), y)
    return float(still.float().mean())


def foolbox_pgd(model, x, y, eps, steps=40) -> float:
    import foolbox as fb

    fmodel = fb.PyTorchModel(model.eval(), bounds=(0, 1))
    attack = fb.attacks.LinfPGD(abs_stepsize=2.5 * eps / steps, steps=steps, random_start=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, adv, _ = attack(fmodel, x, y, epsilons=eps)
    return float(robust(model, adv, y).float().mean())


def ours(model, name, x, y, eps) -> tuple[float, dict]:
    # the unit of work of `qrobust attack`, without the masking checks (a float model)
    m = robustness_cell(model, x, y, RobustnessSpec(name, "linf", eps, checks=(), batch_size=500),
                        seed=0).metrics
    return m["robust_acc"], {"stage_broken": m.get("stage_broken"), "budget": m.get("budget")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="benchmarks/models/small-cnn-mnist")
    ap.add_argument("--recipe", default="fp32", help="fp32, or a recipe to attack the twin")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", default="0.1,0.2,0.3")
    ap.add_argument("--seed", type=int, default=0, help="the test subset (qrobust.data.take)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/attack_strength_mnist.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.ckpt)
    ds = load_dataset(meta["dataset"], args.data_dir)
    if args.recipe != "fp32":
        model = quantize(model, args.recipe, take(ds.train, 512, seed=1).tensors()[0])
    model.eval()
    x, y = take(ds.test, args.n, seed=args.seed).tensors()
    columns = {
        "fast": lambda e: ours(model, "fast", x, y, e),
        "torchattacks_pgd20": lambda e: (torchattacks_pgd(model, x, y, e, 20, 1), {}),
        "torchattacks_pgd50x3": lambda e: (torchattacks_pgd(model, x, y, e, 50, 3), {}),
        "standard": lambda e: ours(model, "standard", x, y, e),
    }
    if importlib.util.find_spec("foolbox") is not None:
        columns["foolbox_linfpgd40"] = lambda e: (foolbox_pgd(model, x, y, e), {})
    rows = []
    for eps in (float(e) for e in args.eps.split(",")):
        row: dict = {"eps": eps, "robust_acc": {}, "seconds": {}, "details": {}}
        for name, fn in columns.items():
            start = time.perf_counter()
            row["robust_acc"][name], details = fn(eps)
            row["seconds"][name] = time.perf_counter() - start
            if details:
                row["details"][name] = details
        row["cost_vs_fast"] = {k: v / row["seconds"]["fast"] for k, v in row["seconds"].items()}
        rows.append(row)
        print(f"eps {eps:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["robust_acc"].items()),
              flush=True)
    out = {"benchmark": "attack_strength", "command": " ".join(
        [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "ckpt": args.ckpt, "recipe": args.recipe, "dataset": ds.name, "n": len(y),
        "subset_seed": args.seed, "rows": rows, "cpu": cpu_info().to_dict(), **provenance(),
        "note": "robust accuracy on the same images for every column; PGD step 2.5 eps/steps; "
                "standard = APGD-CE, APGD-T (9 targets), Square 5000, each on the survivors"}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
