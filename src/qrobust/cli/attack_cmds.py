"""`qrobust attack`: clean and robust accuracy of a checkpoint under an attack, with masking checks;
for quantized checkpoints also the transfer of the twin's adversarial examples to the integer
model and the square attack run directly on the integer model."""

from __future__ import annotations

import json
import logging

import typer

from qrobust.attacks.gradients import ESTIMATORS
from qrobust.cli.app import app
from qrobust.cli.common import DataDir, NoVerify, ckpt_option, cli_progress
from qrobust.errors import ConfigError

log = logging.getLogger(__name__)


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
    correct are attacked), with gradient-masking warnings; for quantized checkpoints the same
    defenses around the integer model, the transfer of the adversarial examples to it and the
    square attack on it. One unit of work with a study cell (``qrobust.eval.robustness``)."""
    from qrobust.attacks import ATTACKS, ThreatModel
    from qrobust.attacks.evaluate import DEFAULT_CHECKS
    from qrobust.checkpoint import load_checkpoint, read_meta
    from qrobust.data import load_dataset, take
    from qrobust.eval.robustness import RobustnessSpec, defended_pair, robustness_cell

    ATTACKS.get(attack)  # unknown names fail before anything is loaded
    ThreatModel(norm, eps)  # type: ignore[arg-type]
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator '{estimator}'; valid: {', '.join(ESTIMATORS)}")
    check_list = (DEFAULT_CHECKS if checks == "all" else () if checks == "none"
                  else tuple(c.strip() for c in checks.split(",") if c.strip()))
    defenses = [parse_defense(d) for d in defense]
    options = {"steps": steps, "alpha": alpha, "loss": loss, "eot_samples": eot,
               "restarts": restarts if restarts != 1 else None, "targeted": targeted or None,
               "estimator": estimator if estimator != "auto" else None,
               "budget_scale": budget_scale if budget_scale != 1.0 else None}
    spec = RobustnessSpec(attack, norm, eps, {k: v for k, v in options.items() if v is not None},
                          check_list, integer_queries=queries, batch_size=batch_size)
    kind = read_meta(ckpt).get("kind")
    quantized, imported = kind == "quantized", kind == "imported"
    if quantized:
        import qrobust.quant  # noqa: F401  (registers the "quantized" checkpoint kind)
    if imported:
        import qrobust.integer.imports  # noqa: F401  (registers the "imported" kind)
    model, meta = load_checkpoint(ckpt)
    deployed = file_model = None
    if quantized and integer:
        from qrobust.integer import to_integer

        deployed = to_integer(model, backend)
    if imported and integer:  # the program's executor, and the original file's runtime
        from qrobust.integer.imports import integer_model, runtime
        from qrobust.integer.imports.checkpoint import RuntimeModel

        deployed = integer_model(model)
        file_model = RuntimeModel(runtime(model))  # refuses a file changed since the import
    target, deployed, note = defended_pair(model, deployed, defenses)
    if note:
        log.warning(note)
    ds = load_dataset(meta["dataset"], data_dir, verify=not no_verify)
    x, y = take(ds.test, limit).tensors()
    cell = robustness_cell(target, x, y, spec, seed, integer=deployed, progress=cli_progress())
    result: dict = {"ckpt": ckpt, "dataset": ds.name, "seed": seed, "defenses": list(defense),
                    "quantized": quantized or imported, "integer_note": note, **cell.metrics,
                    "warnings": cell.warnings}
    if file_model is not None and defenses:
        result["warnings"].append("the twin's adversarial examples are not replayed on the "
                                  "original file behind defenses")
    elif file_model is not None:
        from qrobust.attacks.transfer import replay_on_runtime

        result.update(replay_on_runtime(target, file_model, x, y, cell.x_adv, batch_size))
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
    if result["clean_acc_int"] is not None:
        rate = "n/a" if result["transfer_rate"] is None else f"{result['transfer_rate']:.4f}"
        typer.echo(f"integer model: clean {result['clean_acc_int']:.4f}, robust to the twin's "
                   f"adversarials {result['robust_acc_int']:.4f}, transfer rate {rate}, "
                   f"twin/integer disagreement on adversarials "
                   f"{result['adv_disagreement'] or 0.0:.4f}")
    if "n_fool_runtime" in result:
        typer.echo(f"original file ({meta['import']['format']} runtime): clean "
                   f"{result['clean_acc_runtime']:.4f}, robust to the twin's adversarials "
                   f"{result['robust_acc_runtime']:.4f}; {result['n_fool_runtime']} of "
                   f"{result['n_fool_twin']} adversarial examples that fool the twin still fool it")
    if result["robust_acc_int_square"] is not None:
        typer.echo(f"square ({queries} queries) on the integer model: robust "
                   f"{result['robust_acc_int_square']:.4f}")
    for w in result["warnings"]:
        typer.echo(f"warning: {w}")
