"""Attack throughput: our PGD vs torchattacks PGD, our batched EOT-PGD vs torchattacks EOTPGD.

Same model, same data (first 256 test images), same eps/alpha/steps; timings interleaved
(ours, theirs, theirs, ours, ...) and reported as medians over repeats, with the ratio
theirs / ours (> 1: ours is faster). Targets (issue 4): PGD >= 1.0x, EOT-PGD >= 2x.

Cases
- small-cnn on MNIST (benchmarks/models/small-cnn-mnist if present, else random init) and
  resnet20 on CIFAR-10 (random init unless benchmarks/models/resnet20-cifar10 exists; the
  speed of an attack does not depend on the weights except through early stopping);
- PGD, 10 steps, batch 256, with our default early stopping (points already broken stop
  being attacked, AutoAttack style) and with early_stop=False (exactly the same work as
  torchattacks);
- EOT-PGD, 10 steps, 10 draws, on small-cnn with MC dropout (rate 0.2) inserted before the
  classifier (our EOT runs the deterministic prefix once) and after every ReLU (no shared
  prefix: pure batching). Against a randomized model our loop never stops early, so both
  sides do the same number of steps on every point.
- robust accuracies are single forward passes of the (random) model on the returned points.
- the work each side does: our loop evaluates steps + 1 points (the last one without a
  gradient, to keep the best iterate, not the last), torchattacks steps; every PGD row holds
  the median seconds of one forward+backward and of one no-grad forward of the batch, and the
  ratio that work alone predicts, 10 fb / (10 fb + f), so the loop's own overhead is the
  difference between that and the measured ratio.
- ``--allocator tuned`` (default) keeps large allocations on glibc's heap, as the command
  line does (:func:`qrobust.hardware.keep_large_allocations`); both sides run in the same
  process, so it speeds them alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_speed.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qrobust.attacks import EOT, PGD, ThreatModel
from qrobust.checkpoint import load_checkpoint
from qrobust.defenses import insert_dropout
from qrobust.models import ModelSpec, build_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "attack_speed.json"


def load_case(ckpt: str, arch: str, shape: tuple[int, int, int], dataset: str,
              n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict]:
    """(model, x, y, provenance) for a checkpoint if present, else a random-init model; real
    test images if the dataset is found, else uniform noise with random labels."""
    path = ROOT / "benchmarks" / "models" / ckpt
    info: dict = {}
    if (path / "model.safetensors").exists():
        model, meta = load_checkpoint(path)
        info["model"] = f"trained checkpoint benchmarks/models/{ckpt} " \
                        f"(test acc {meta.get('metrics', {}).get('test_acc')})"
    else:
        torch.manual_seed(0)
        model = build_model(ModelSpec(arch, shape))
        info["model"] = f"random-init {arch} (benchmarks/models/{ckpt} absent)"
    try:
        from qrobust.data import load_dataset, take

        x, y = take(load_dataset(dataset).test, n).tensors()
        info["data"] = f"{dataset} test, {n} images"
    except Exception as err:  # noqa: BLE001 - benchmark falls back to noise, says so
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
        info["data"] = f"uniform noise ({dataset} unavailable: {type(err).__name__})"
    return model.eval(), x, y, info


def timed(fn) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def compare(name: str, ours, theirs, repeats: int, model, x, y,
            peer: str = "torchattacks") -> dict:
    """Interleaved timings of ours(x, y) and theirs(x, y), alternating which goes first
    (ABBA...) so that neither side always runs on a warmer or colder machine; warm-up on 8
    images."""
    ours(x[:8], y[:8]), theirs(x[:8], y[:8])
    t_ours, t_theirs = [], []
    for i in range(repeats):
        for side in (("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")):
            if side == "ours":
                t, adv_ours = timed(lambda: ours(x, y))
                t_ours.append(t)
            else:
                t, adv_theirs = timed(lambda: theirs(x, y))
                t_theirs.append(t)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    row = {"case": name, "peer": peer, "ours_s": mo, "torchattacks_s": mt, "ratio": mt / mo,
           "ours_img_per_s": len(y) / mo, "torchattacks_img_per_s": len(y) / mt,
           "ours_all_s": t_ours, "torchattacks_all_s": t_theirs,
           "ours_robust_acc": robust_acc(model, adv_ours, y),
           "torchattacks_robust_acc": robust_acc(model, adv_theirs, y)}
    print(f"{name:<60} ours {mo:8.3f}s  torchattacks {mt:8.3f}s  ratio {mt / mo:5.2f}x", flush=True)
    return row


def robust_acc(model, x_adv, y, passes: int = 5) -> float:
    """Mean over ``passes`` forward passes (they differ for randomized models)."""
    with torch.no_grad():
        return sum(float((model(x_adv).argmax(1) == y).float().mean())
                   for _ in range(passes)) / passes


def pass_costs(model, x, y, repeats: int) -> dict:
    """Median seconds of one forward+backward (input gradient) and one no-grad forward."""
    def fb():
        xg = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xg), y)
        torch.autograd.grad(loss, xg)

    def f():
        with torch.no_grad():
            model(x)

    fb(), f()
    t_fb = statistics.median(timed(fb)[0] for _ in range(repeats))
    t_f = statistics.median(timed(f)[0] for _ in range(repeats))
    return {"forward_backward_s": t_fb, "forward_s": t_f,
            "work_predicted_ratio_equal_steps": 10 * t_fb / (10 * t_fb + t_f)}


def pgd_rows(label: str, case, eps: float, alpha: float, repeats: int, dev) -> list[dict]:
    import torchattacks

    model, x, y, info = case
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    costs = pass_costs(model, x, y, max(3, repeats))
    ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=10, random_start=True)
    # early stopping only means something for a trained model
    modes = (True, False) if info["model"].startswith("trained") else (False,)
    rows = []
    for early in modes:
        ours = PGD(model, ThreatModel("linf", eps), steps=10, alpha=alpha, early_stop=early)
        gen = torch.Generator(device=dev).manual_seed(0)
        rows.append({**compare(f"PGD-10 {label} batch {len(y)} early_stop={early}",
                               lambda a, b, ours=ours, gen=gen: ours(a, b, gen), ta, repeats,
                               model, x, y), **costs})
    return rows


def apgd_rows(label: str, case, eps: float, repeats: int, dev, steps: int = 20) -> list[dict]:
    """Our APGD-CE vs the reference implementation (pyautoattack, the authors' code on PyPI),
    Linf, 1 restart. The reference attacks only the points it classifies correctly at first
    and every one of them for all steps; ours with ``early_stop=False`` does the same work
    on every point (a trained model gets nearly all right, so the work is about equal)."""
    from pyautoattack.autopgd_base import APGDAttack

    from qrobust.attacks import APGD

    model, x, y, info = case
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    ref = APGDAttack(model, n_iter=steps, norm="Linf", n_restarts=1, eps=eps, seed=0,
                     loss="ce", device=dev)
    rows = []
    for early in (True, False):
        ours = APGD(model, ThreatModel("linf", eps), steps=steps, early_stop=early)
        gen = torch.Generator(device=dev).manual_seed(0)
        rows.append(compare(f"APGD-CE-{steps} {label} batch {len(y)} early_stop={early} vs "
                            "reference", lambda a, b, ours=ours, gen=gen: ours(a, b, gen),
                            lambda a, b: ref.perturb(a, b), repeats, model, x, y,
                            peer="pyautoattack 0.2.0 APGDAttack (reference; its time under "
                                 "torchattacks_s)"))
    return rows


def eot_rows(case, batch: int, repeats: int, dev, chunk: str = "auto") -> list[dict]:
    import torchattacks

    model, x, y, info = case
    model, x, y = model.to(dev), x[:batch].to(dev), y[:batch].to(dev)
    rows = []
    for placement in ("classifier", "relu"):
        noisy = insert_dropout(model, 0.2, placement).to(dev)
        label = f"EOT-PGD-10 x10 small-cnn/mnist dropout@{placement} batch {len(y)} chunk={chunk}"
        ta = torchattacks.EOTPGD(noisy, eps=0.3, alpha=0.03, steps=10, eot_iter=10)
        # with a randomized model our loop attacks every point for all steps (no early stop)
        est = EOT(10, chunk="auto" if chunk == "auto" else 10)
        ours = PGD(noisy, ThreatModel("linf", 0.3), steps=10, alpha=0.03, estimator=est)
        gen = torch.Generator(device=dev).manual_seed(0)
        row = compare(label, lambda a, b, ours=ours, gen=gen: ours(a, b, gen), ta, repeats,
                      noisy, x, y)
        rows.append({**row, "eot_draws_per_pass": est._chunks.get((id(noisy), tuple(x.shape)))
                     if chunk == "auto" else 10})
    return rows


def main() -> None:
    import torchattacks

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256, help="PGD batch")
    ap.add_argument("--eot-batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", default="pgd-mnist,pgd-cifar,eot",
                    help="comma list of pgd-mnist, pgd-cifar, eot, apgd (needs pyautoattack)")
    ap.add_argument("--eot-chunk", choices=("auto", "all"), default="auto",
                    help="our EOT's draws per pass: auto (default) or all 10 at once")
    ap.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                    help="tuned: large allocations kept on the heap, as the command line does")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.allocator == "tuned":
        from qrobust.hardware import keep_large_allocations

        keep_large_allocations()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    dev = torch.device(args.device)
    parts = set(args.parts.split(","))
    rows, cases = [], {}
    if parts & {"pgd-mnist", "eot", "apgd"}:
        mnist = load_case("small-cnn-mnist", "small-cnn", (1, 28, 28), "mnist", args.batch)
        cases["small-cnn/mnist"] = mnist[3]
    if "pgd-mnist" in parts:
        rows += pgd_rows("small-cnn/mnist", mnist, 0.3, 0.03, args.repeats, dev)
    if parts & {"pgd-cifar", "apgd"}:
        cifar = load_case("resnet20-cifar10", "resnet20", (3, 32, 32), "cifar10", args.batch)
        cases["resnet20/cifar10"] = cifar[3]
    if "pgd-cifar" in parts:
        rows += pgd_rows("resnet20/cifar10", cifar, 8 / 255, 2 / 255, args.repeats, dev)
    if "apgd" in parts:
        rows += apgd_rows("small-cnn/mnist", mnist, 0.3, args.repeats, dev)
        rows += apgd_rows("resnet20/cifar10", cifar, 8 / 255, args.repeats, dev)
    if "eot" in parts:
        rows += eot_rows(mnist, args.eot_batch, args.repeats, dev, args.eot_chunk)
    result = {
        "description": __doc__.strip().splitlines()[0],
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python "
                   f"benchmarks/attack_speed.py --repeats {args.repeats} --batch {args.batch} "
                   f"--eot-batch {args.eot_batch} --device {args.device} --parts {args.parts} "
                   f"--allocator {args.allocator} --eot-chunk {args.eot_chunk}",
        "allocator": args.allocator,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "torch": torch.__version__, "torchattacks": torchattacks.__version__,
        "python": platform.python_version(), "cases": cases,
        "settings": {"small-cnn/mnist": {"eps": 0.3, "alpha": 0.03},
                     "resnet20/cifar10": {"eps": 8 / 255, "alpha": 2 / 255},
                     "eot": {"draws": 10, "dropout_rate": 0.2, "eps": 0.3, "alpha": 0.03}},
        "targets": {"pgd_ratio": 1.0, "eot_pgd_ratio": 2.0},
        "note": "ratio = torchattacks median / ours median (>1: ours faster); medians over "
                "interleaved repeats in one run on a shared, noisy machine",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
