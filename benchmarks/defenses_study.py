"""Defenses study (issue 7): plain vs adaptive PGD-Linf against float, vanilla quantized, DQ,
Stochastic-Shield and an SQ ensemble, on Fashion-MNIST (or digits for a smoke run).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/defenses_study.py \
        --dataset fashion-mnist --out benchmarks/results/defenses_fashion_mnist.json

Models (small-cnn, width --width): float; vanilla PTQ w4a4 / w2a2 (``quantize``, min-max
calibration); vanilla QAT w4a4 / w2a2 (ReLU6-clipped quantizers fine-tuned from float, no
regularizer: the DQ paper's "vanilla quantized" control); DQ w4a4 / w2a2 (the same plus the
Lipschitz regularizer); Shield (3x3 median + MC dropout before the classifier, T passes) on
the float and the PTQ w4a4 model; an SQ ensemble (K members, 4-bit stochastic ReLU6). QAT,
DQ and the ensemble train on --n-finetune images of a fixed permutation of the training set.

Attacks: PGD Linf, ``--steps`` steps, step 2.5 eps / steps, random start, CE loss, only on
clean-correct points. "plain": autograd through the model as it is (one random draw for
randomized models, the true gradient of a non-differentiable filter). "adaptive": for
randomized / non-differentiable models EOT(``--eot``) over BPDA (the estimator the attacks
module picks from the Defense attributes); for deterministic (quantized) models the
temperature-rescaled PGD of Gupta & Ajanthan (arXiv 2003.13511) on the points plain PGD
left, i.e. the worst case of both. Robust accuracy is re-measured with a fresh forward pass.
Trained models are cached under ``--cache`` (safetensors state dicts) so re-runs only attack.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qrobust.attacks import ATTACKS, Autograd, ThreatModel, auto_estimator, evaluate_robustness
from qrobust.checkpoint import load_checkpoint
from qrobust.data import Dataset, load_dataset, take
from qrobust.defenses.amplification import compare_amplification
from qrobust.defenses.detection import (
    detection_score,
    member_probs,
    plane_row,
)
from qrobust.defenses.dq import dq_model, fit_dq
from qrobust.defenses.ensemble import build_sq_ensemble, fit_sq_ensemble
from qrobust.defenses.shield import stochastic_shield
from qrobust.models import build_model
from qrobust.provenance import provenance
from qrobust.quant import quantize
from qrobust.report.plots import plot_amplification, plot_information_plane
from qrobust.train import accuracy, default_config, fit, model_spec

log = logging.getLogger("defenses_study")


def cached(path: Path, build, train):
    """Load ``build()``'s weights from ``path`` if present, else ``train()`` and save them."""
    if path.exists():
        model = build()
        model.load_state_dict(load_file(str(path)))
        return model.eval(), json.loads((path.with_suffix(".json")).read_text())
    model, info = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(info))
    return model.eval(), info


def build_models(args, ds) -> tuple[dict, dict]:
    """name -> model, and training info per name."""
    kwargs = {"width": args.width} if args.arch == "small-cnn" else {}
    spec = model_spec(args.arch, ds, **kwargs)
    calib, _ = take(ds.train, 512, seed=1).tensors()
    cache = Path(args.cache)
    info: dict = {}
    sub = Dataset(ds.name, take(ds.train, args.n_finetune, seed=2), ds.test, ds.classes, ds.source)
    def config(epochs, lr):  # the dataset's augmentation (crop + flip on CIFAR-10)
        return default_config(args.arch, ds.name, epochs=epochs, batch_size=128, lr=lr,
                              seed=args.seed)

    cfg = config(args.epochs, 0.05)

    def train_float():
        torch.manual_seed(args.seed)
        f = fit(args.arch, ds, cfg, model=build_model(spec), progress=False)
        return f.model, f.meta["metrics"]

    if args.init:
        float_model, meta = load_checkpoint(args.init)
        if meta["model"]["arch"] != args.arch or meta["dataset"] != ds.name:
            raise SystemExit(f"--init {args.init} is a {meta['model']['arch']} on "
                             f"{meta['dataset']}, not {args.arch} on {ds.name}")
        float_model.eval()
        info["float"] = {"checkpoint": args.init, **meta.get("metrics", {})}
    else:
        float_model, info["float"] = cached(cache / "float.safetensors",
                                            lambda: build_model(spec), train_float)
    models = {"float": float_model}
    for bits in args.bits:
        models[f"ptq-w{bits}a{bits}"] = quantize(float_model, f"w{bits}a{bits}", calib)
    qat_cfg = config(args.qat_epochs, 0.01)
    for bits in args.bits:
        runs = [(f"qat-w{bits}a{bits}", 0.0)] + [(f"dq-w{bits}a{bits}-beta{b:g}", b)
                                                  for b in args.beta]
        for name, beta in runs:
            def train_dq(bits=bits, beta=beta):
                f = fit_dq(args.arch, sub, qat_cfg, bits, bits, beta, init=float_model,
                           progress=False)
                return f.model, f.meta["metrics"]

            models[name], info[name] = cached(
                cache / f"{name.split('-beta')[0]}-beta{beta:g}.safetensors",
                lambda bits=bits: dq_model(build_model(spec), bits, bits, calib), train_dq)
    if not args.no_ensemble:
        ens_cfg = config(args.ens_epochs, args.ens_lr)

        def train_ens():
            f = fit_sq_ensemble(args.arch, sub, ens_cfg, k=args.k, bits=4, weight=args.mi_weight,
                                progress=False, model_kwargs=kwargs,
                                init=float_model if args.init else None)
            return f.model, f.meta["metrics"]

        models["sq-ensemble"], info["sq-ensemble"] = cached(
            cache / f"sq-ensemble-k{args.k}-w{args.mi_weight:g}.safetensors",
            lambda: build_sq_ensemble(lambda: build_model(spec), args.k, 4, 6.0, args.seed),
            train_ens)
    return models, info


def shields(args, models: dict) -> dict:
    out = {}
    for base in ("float", f"ptq-w{args.bits[0]}a{args.bits[0]}"):
        if base in models:
            out[f"shield({base})"] = stochastic_shield(models[base], filter="median", size=3,
                                                       rate=args.rate, passes=args.passes)
    return out


def attack_model(name, model, x, y, eps_list, args, randomized) -> list[dict]:
    rows = []
    for eps in eps_list:
        threat = ThreatModel("linf", eps)
        pgd = ATTACKS.get("pgd")
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        if randomized:
            plain = evaluate_robustness(model, pgd(model, threat, steps=args.steps,
                                                   estimator=Autograd()),
                                        x, y, generator=gen, checks=("gradients", "randomness"),
                                        return_adv=True)
            adaptive = evaluate_robustness(
                model, pgd(model, threat, steps=args.steps,
                           estimator=auto_estimator(model, args.eot)),
                x, y, generator=torch.Generator().manual_seed(args.seed),
                checks=("gradients", "randomness"), return_adv=True)
            plain_acc, adaptive_acc = plain["robust_acc"], adaptive["robust_acc"]
        else:
            checks = ("gradients", "temperature") if args.temperature else ("gradients",)
            plain = evaluate_robustness(model, pgd(model, threat, steps=args.steps,
                                                   estimator=Autograd()),
                                        x, y, generator=gen, checks=checks, return_adv=True)
            adaptive = plain
            plain_acc, adaptive_acc = plain["robust_acc"], plain["robust_acc_worst"]
        row = {"model": name, "eps": eps, "eps_255": round(eps * 255, 3), "n": len(y),
               "clean_acc": plain["clean_acc"], "plain_robust_acc": plain_acc,
               "adaptive_robust_acc": adaptive_acc, "plain_estimator": plain["estimator"],
               "adaptive_estimator": (adaptive["estimator"] if randomized else
                                      "autograd + temperature(hessian)" if args.temperature
                                      else "autograd"),
               "zero_grad_fraction_plain": plain["zero_grad_fraction"],
               "warnings": sorted(set(plain["warnings"]) | set(adaptive["warnings"])),
               "seconds": round(time.perf_counter() - t0, 1)}
        row["_x_adv"] = adaptive["x_adv"]
        rows.append(row)
        log.info("%s eps=%.1f/255: clean %.3f plain %.3f adaptive %.3f (%.0fs)", name, eps * 255,
                 row["clean_acc"], plain_acc, adaptive_acc, row["seconds"])
    return rows


AMP_DELTA = ("PGD Linf eps={eps}/255, {steps} steps, on the float model, every point attacked "
             "(no early stop); the same delta fed to every model")


def amplification(args, models: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Layer-wise amplification of one perturbation (PGD on the float model) in every
    deterministic model."""
    det = {n: m for n, m in models.items() if n != "sq-ensemble"}
    pgd = ATTACKS.get("pgd")(models["float"], ThreatModel("linf", args.eps[-1] / 255),
                             steps=args.steps, estimator=Autograd(), early_stop=False)
    delta = pgd(x, y, generator=torch.Generator().manual_seed(args.seed)) - x
    return compare_amplification(det, x, delta)


def amplification_only(args, models: dict, x: torch.Tensor, y: torch.Tensor) -> None:
    """Recompute the amplification part of an existing result file (cached models)."""
    out = Path(args.out)
    result = json.loads(out.read_text())
    result["amplification"] = amplification(args, models, x, y)
    result["amplification_delta"] = AMP_DELTA.format(eps=args.eps[-1], steps=args.steps)
    write_reports(result, out)


def write_reports(result: dict, out: Path) -> None:
    """The JSON, the plots and the markdown tables next to it."""
    out.write_text(json.dumps(result, indent=2))
    stem, cfg, plane = out.with_suffix(""), result["config"], result["information_plane"]
    plot_amplification(result["amplification"], f"{stem}_amplification.png")
    if plane:
        plot_information_plane(plane, f"{stem}_aip.png")
    arch = cfg.get("arch", "small-cnn")
    arch = f"small-cnn (width {cfg['width']})" if arch == "small-cnn" else arch
    md = [f"# Defenses study on {result['dataset']}", "",
          f"{arch}; PGD Linf {cfg['steps']} steps, step 2.5 eps/steps, "
          f"random start; robust accuracy 'plain / adaptive' on {cfg['n_test']} test points "
          f"({cfg['n_random']} for randomized models); EOT {cfg['eot']}. Produced by "
          f"`benchmarks/defenses_study.py` with config {json.dumps(cfg)}.", "",
          markdown(result), ""]
    if plane:
        md += ["## Adversarial information plane (SQ ensemble, adaptive attack)", "",
               "| eps | accuracy | mean MI (nats) | MI detection AUC |", "|---|---|---|---|"]
        md += [f"| {r['eps'] * 255:.0f}/255 | {r['accuracy']:.3f} | {r['mean_score']:.4f} | "
               f"{r['auc']:.3f} |" for r in plane["sq-ensemble"]]
        md.append("")
    amp = result["amplification"]
    depth = max(len(rows) for rows in amp.values())
    md += ["## Layer-wise amplification ||f_l(x+d)-f_l(x)|| / ||f_l(x)|| (mean over images)", "",
           result["amplification_delta"] + ".", "",
           "| model | " + " | ".join(["input"] + [f"layer {i}" for i in range(1, depth)]) + " |",
           "|" + "---|" * (depth + 1)]
    md += [f"| {name} | " + " | ".join(f"{r['mean']:.3f}" for r in rows) + " |"
           for name, rows in amp.items()]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")


def markdown(result: dict) -> str:
    eps = sorted({r["eps_255"] for r in result["rows"]})
    head = "| model | clean | " + " | ".join(f"{e:g}/255 plain / adaptive" for e in eps) + " |"
    lines = [head, "|" + "---|" * (len(eps) + 2)]
    names = list(dict.fromkeys(r["model"] for r in result["rows"]))
    for name in names:
        rows = {r["eps_255"]: r for r in result["rows"] if r["model"] == name}
        clean = next(iter(rows.values()))["clean_acc"]
        cells = [f"{rows[e]['plain_robust_acc']:.3f} / {rows[e]['adaptive_robust_acc']:.3f}"
                 if e in rows else "-" for e in eps]
        lines.append(f"| {name} | {clean:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--out", default="benchmarks/results/defenses_fashion_mnist.json")
    p.add_argument("--cache", default="runs/defenses-study")
    p.add_argument("--arch", default="small-cnn", help="small-cnn or resnet20")
    p.add_argument("--init", default=None, help="a trained float checkpoint of --arch: used as "
                   "the float model and as the start of QAT, DQ and the ensemble members")
    p.add_argument("--width", type=int, default=16, help="small-cnn width")
    p.add_argument("--ens-lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--ens-epochs", type=int, default=3)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--beta", type=float, nargs="+", default=[3e-3])
    p.add_argument("--n-finetune", type=int, default=30000,
                   help="training images for QAT / DQ fine-tuning and the ensemble")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--mi-weight", type=float, default=0.1)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--eps", type=float, nargs="+", default=[2, 5, 8, 16], help="in 1/255 units")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eot", type=int, default=8)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-random", type=int, default=200, help="test points for randomized models")
    p.add_argument("--temperature", action="store_true", help="temperature PGD as adaptive "
                   "attack on deterministic models")
    p.add_argument("--no-ensemble", action="store_true")
    p.add_argument("--full-test-acc", action="store_true",
                   help="also measure every model's clean accuracy on the whole test set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amplification-only", action="store_true",
                   help="recompute only the amplification of an existing --out file")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    ds = load_dataset(args.dataset)
    models, info = build_models(args, ds)
    log.info("trained/loaded %s in %.0fs", list(models), time.perf_counter() - t_start)
    x, y = take(ds.test, args.n_test, seed=args.seed).tensors()
    if args.amplification_only:
        amplification_only(args, models, x, y)
        return
    full_acc = ({n: accuracy(m, ds.test) for n, m in models.items() if n != "sq-ensemble"}
                if args.full_test_acc else {})
    eps = [e / 255 for e in args.eps]
    rows, plane = [], {}
    for name, model in models.items():
        randomized = name == "sq-ensemble"
        n = args.n_random if randomized else args.n_test
        rows += attack_model(name, model, x[:n], y[:n], eps, args, randomized)
    for name, model in shields(args, models).items():
        rows += attack_model(name, model, x[:args.n_random], y[:args.n_random], eps, args, True)
    if "sq-ensemble" in models:  # the adversarial information plane under the adaptive attack
        ens = models["sq-ensemble"]
        xr, yr = x[:args.n_random], y[:args.n_random]
        clean = detection_score(member_probs(ens, xr))
        plane["sq-ensemble"] = [plane_row(ens, xr, yr, clean, 0.0)] + [
            plane_row(ens, r["_x_adv"], yr, clean, r["eps"]) for r in rows
            if r["model"] == "sq-ensemble"]
    amp = amplification(args, models, x, y)
    for r in rows:
        r.pop("_x_adv")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"study": "defenses", "dataset": args.dataset, "config": vars(args),
              "train_info": info, "full_test_acc": full_acc, "rows": rows,
              "information_plane": plane, "amplification": amp,
              "amplification_delta": AMP_DELTA.format(eps=args.eps[-1], steps=args.steps),
              "seconds": round(time.perf_counter() - t_start, 1), "provenance": provenance()}
    write_reports(result, out)
    log.info("wrote %s in %.0fs", out, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
