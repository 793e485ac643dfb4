"""`qrobust attack`: clean and robust accuracy of a checkpoint under an attack, with masking checks;
for quantized checkpoints also the transfer of the twin's adversarial examples to the integer
model and the square attack run directly on the integer model."""

from __future__ import annotations

import json
import logging

import torch
import typer

from qrobust.cli.app import app
from qrobust.cli.common import DataDir, NoVerify, ckpt_option, cli_progress
from qrobust.errors import ConfigError

log = logging.getLogger(__name__)

ESTIMATORS = ("auto", "autograd", "bpda", "eot", "temperature-hessian", "temperature-jacobian")


def parse_defense(text: str) -> tuple[str, dict]:
    """``"median:size=3"`` -> ("median", {"size": 3}); values parsed as int, float or str."""
    name, _, rest = text.partition(":")
    params: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"defense parameter '{item}' in '{text}' must be key=value, "
                              "e.g. --defense median:size=3")
        for cast in (int, float):
            try:
                params[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            params[key.strip()] = value.strip()
    return name.strip(), params


def build_estimator(kind: str, model, eot: int):
    from qrobust.attacks import BPDA, EOT, Autograd, Temperature, auto_estimator

    if kind not in ESTIMATORS:
        raise ConfigError(f"unknown estimator '{kind}'; valid: {', '.join(ESTIMATORS)}")
    base = auto_estimator(model, eot)
    return {"auto": lambda: base, "autograd": Autograd, "bpda": BPDA,
            "eot": lambda: EOT(eot, BPDA()),
            "temperature-hessian": lambda: Temperature("hessian", base=base),
            "temperature-jacobian": lambda: Temperature("jacobian", base=base)}[kind]()


def describe_attack(result: dict) -> str:
    """'standard suite (budget ...)', 'fast suite (PGD-10, an upper bound ...)' or the attack."""
    suite = result.get("suite")
    if suite == "standard":
        b = result["budget"]
        return (f"standard suite (APGD-CE, APGD-T x{b['targets']}, Square; {b['steps']} steps, "
                f"{b['queries']} queries{'' if result['budget_scale'] == 1 else ', scaled'})")
    if suite == "fast":
        return f"fast suite (PGD-{result['steps']}: an upper bound; --attack standard is stronger)"
    return f"{result['attack']} (a single attack)"


@app.command("attack")
def attack_cmd(
    ckpt: str = ckpt_option(),
    attack: str = typer.Option("standard", "--attack", help="standard (AutoAttack-style "
                               "worst case: APGD-CE, APGD-T, Square), fast (PGD-10), or one "
                               "attack: fgsm, pgd, apgd, apgd-dlr, square."),
    budget_scale: float = typer.Option(1.0, "--budget-scale", help="standard/fast suites: "
                                       "scale the published iteration and query budgets (0, 1]."),
    eps: float = typer.Option(..., "--eps", help="Perturbation budget in [0, 1] pixel units."),
    norm: str = typer.Option("linf", "--norm", help="linf or l2."),
    steps: int = typer.Option(None, "--steps", help="Iterations (queries for square)."),
    alpha: float = typer.Option(None, "--alpha", help="PGD/FGSM step size."),
    restarts: int = typer.Option(1, "--restarts"),
    loss: str = typer.Option(None, "--loss", help="ce, margin or dlr."),
    targeted: bool = typer.Option(False, "--targeted", help="Random target labels."),
    estimator: str = typer.Option("auto", "--estimator", help=", ".join(ESTIMATORS) + "."),
    eot: int = typer.Option(10, "--eot", help="EOT draws for randomized models."),
    defense: list[str] = typer.Option([], "--defense",  # noqa: B008
                                      help="Defense in front, e.g. median:size=3 (repeatable)."),
    checks: str = typer.Option("all", "--checks", help="all, none or a comma list of "
                               "gradients,randomness,blackbox,temperature."),
    integer: bool = typer.Option(True, "--integer/--no-integer",
                                 help="For quantized checkpoints: evaluate on the integer model."),
    backend: str = typer.Option("reference", "--backend", help="Integer backend: reference, onnx or openvino."),
    queries: int = typer.Option(1000, "--queries", help="Square queries on the integer model."),
    limit: int = typer.Option(None, "--limit", help="First N test points."),
    batch_size: int = typer.Option(256, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
    data_dir: str = DataDir, no_verify: bool = NoVerify,
) -> None:
    """Robust accuracy of a checkpoint under an attack (AutoAttack-style: only points still
    correct are attacked), with gradient-masking warnings."""
    from qrobust.attacks import ATTACKS, Suite, ThreatModel, attack_integer_model, transfer_to_integer
    from qrobust.attacks.evaluate import DEFAULT_CHECKS, evaluate_robustness
    from qrobust.checkpoint import load_checkpoint, read_meta
    from qrobust.data import load_dataset, take
    from qrobust.defenses import DEFENSES

    cls = ATTACKS.get(attack)  # unknown names fail before anything is loaded
    threat = ThreatModel(norm, eps)  # type: ignore[arg-type]
    check_list = (DEFAULT_CHECKS if checks == "all" else () if checks == "none"
                  else tuple(c.strip() for c in checks.split(",") if c.strip()))
    quantized = read_meta(ckpt).get("kind") == "quantized"
    if quantized:
        import qrobust.quant  # noqa: F401  (registers the "quantized" checkpoint kind)
    model, meta = load_checkpoint(ckpt)
    target = model
    for spec in defense:
        name, params = parse_defense(spec)
        target = DEFENSES.get(name)(target, **params)
    ds = load_dataset(meta["dataset"], data_dir, verify=not no_verify)
    x, y = take(ds.test, limit).tensors()
    gen = torch.Generator().manual_seed(seed)
    kwargs: dict = {"restarts": restarts, "loss": loss, "targeted": targeted,
                    "estimator": build_estimator(estimator, target, eot)}
    if steps is not None:
        kwargs["steps"] = steps
    if issubclass(cls, Suite):
        kwargs["budget_scale"] = budget_scale
    elif budget_scale != 1.0:
        raise ConfigError(f"--budget-scale applies to the standard and fast suites, not {attack}")
    if alpha is not None:
        key = "alpha" if attack == "pgd" else "step_size" if attack == "fgsm" else None
        if key is None:
            raise ConfigError(f"--alpha applies to pgd and fgsm, not {attack}")
        kwargs[key] = alpha
    atk = cls(target, threat, **kwargs)
    result: dict = {"ckpt": ckpt, "dataset": ds.name, "seed": seed, "defenses": list(defense),
                    "quantized": quantized,
                    **evaluate_robustness(target, atk, x, y, batch_size=batch_size, generator=gen,
                                          checks=check_list, progress=cli_progress(),
                                          return_adv=True)}
    x_adv = result.pop("x_adv")
    if quantized and integer:
        if defense:
            log.warning("defenses are not applied to the integer model; transfer runs undefended")
        twin_estimator = build_estimator(estimator, model, eot)
        atk_twin = cls(model, threat, **{**kwargs, "estimator": twin_estimator})
        # undefended, the twin was attacked above already: its x_adv are what transfer
        result["integer_transfer"] = transfer_to_integer(
            model, atk_twin, x, y, backend=backend, batch_size=batch_size, generator=gen,
            progress=cli_progress(), x_adv=None if defense else x_adv)
        if norm == "linf":
            from qrobust.integer import to_integer

            result["integer_square"] = attack_integer_model(
                to_integer(model, backend), threat, x, y, queries=queries, batch_size=batch_size,
                generator=gen, progress=cli_progress())
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    typer.echo(f"{describe_attack(result)} ({norm}, eps={eps:g}, estimator "
               f"{result['estimator']}) on {ds.name}, n={result['n']}: clean "
               f"{result['clean_acc']:.4f}, robust {result['robust_acc']:.4f}, worst-case after "
               f"checks {result['robust_acc_worst']:.4f}")
    if result.get("stage_broken"):
        typer.echo("  broken per stage (each on the points still robust): " + ", ".join(
            f"{k} {v}" for k, v in result["stage_broken"].items() if v))
    if "integer_transfer" in result:
        t = result["integer_transfer"]
        rate = "n/a" if t["transfer_rate"] is None else f"{t['transfer_rate']:.4f}"
        typer.echo(f"integer model: clean {t['integer_clean_acc']:.4f}, robust to twin's "
                   f"adversarials {t['integer_robust_acc']:.4f}, transfer rate {rate}, "
                   f"twin/integer disagreement on adversarials "
                   f"{t['adv_disagreement'] if t['adv_disagreement'] is not None else 0.0:.4f}")
    if "integer_square" in result:
        s = result["integer_square"]
        typer.echo(f"square ({queries} queries) on the integer model: robust {s['robust_acc']:.4f}")
    for w in result["warnings"] + result.get("integer_transfer", {}).get("warnings", []):
        typer.echo(f"warning: {w}")
