"""A study -> a grid of cells -> one row of metrics per cell.

A *cell* is (model, recipe, defense, attack, eps, seed). Its resolved config (everything
that changes its numbers, checkpoint contents included) is hashed into the store key, so a
rerun skips finished cells and a changed config never reuses a stale row.

Work shared across cells (the :class:`Workbench` caches it per process):

* one float model per (model, seed): trained once and saved under ``<out>/models/`` (a
  killed run does not retrain it), or loaded from its checkpoint;
* one quantized twin, integer model and defended model per (model, recipe, defense, seed);
* clean predictions once per (model, recipe, defense, seed), on twin and integer model.

Inside a cell the attack runs only on points the defended twin still classifies correctly
(the others are already non-robust), in batches, with a generator seeded from the cell key:
cells are independent of each other and of the order they run in, which is what lets the
Ray executor reproduce the local one.

Metrics per cell (accuracies in [0, 1] over ``n`` test points):

* ``clean_acc`` / ``robust_acc``: defended twin on x / on x_adv;
* ``clean_acc_int`` / ``robust_acc_int``: the integer model on x / on the twin's x_adv
  (a transfer attack on the deployed model; None without an integer model);
* ``transfer_rate``: of the points the integer model classifies correctly and whose x_adv
  fools the twin, the share whose x_adv also fools the integer model (the definition of
  ``qrobust.attacks.transfer_to_integer``); ``clean_disagreement`` / ``adv_disagreement``:
  share of all points / of the attacked points' x_adv where twin and integer predictions
  differ (all of these from :func:`qrobust.attacks.transfer.transfer_metrics`, the one
  definition ``qrobust attack`` uses too);
* ``mean_linf`` / ``mean_l2``: mean perturbation norms over the successful adversarial
  examples (pixel units);
* ``attack_success``: share of attacked (clean-correct) points that were fooled;
* ``seconds``: wall time of the cell (shared work excluded).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust.attacks.transfer import transfer_metrics
from qrobust.config import AttackConfig, DataConfig, DefenseConfig, ModelConfig, StudyConfig
from qrobust.defenses import reseed
from qrobust.eval import adapters
from qrobust.eval.store import cell_key, file_sha256

log = logging.getLogger(__name__)

PROTOCOL = 2  # bump when the meaning of a metric changes: old rows stop matching new keys
# 2: twin/integer disagreement as transfer_metrics defines it (clean_ and adv_disagreement)
TABLE = "robustness"


@dataclass(frozen=True)
class Cell:
    model: ModelConfig
    recipe: str
    defense: DefenseConfig
    attack: AttackConfig
    eps: float
    seed: int
    config: dict  # the resolved config that is hashed and stored
    key: str

    @property
    def group(self) -> tuple:
        """Cells sharing a twin / integer model / clean predictions."""
        return (self.model.label, self.recipe, self.defense.label, self.seed)


def _file_digest(path: str) -> str:
    p = Path(path)
    file = p / "model.safetensors" if p.is_dir() else p
    st = file.stat()
    return _digest(str(file.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(file: str, size: int, mtime_ns: int) -> str:
    """sha256 prefix of a file, computed once per (path, size, mtime): plans are rebuilt often."""
    return file_sha256(file)[:16]


def data_identity(data: DataConfig) -> dict:
    """The data part of a cell's key: which test points of which content. A named dataset is
    pinned by the checksums its loader verifies, so where it was found (``data_dir``) does not
    enter; a dataset given as an .npz file is pinned by its content digest, not its path."""
    ident = data.model_dump(mode="json", exclude={"data_dir"})
    if data.dataset.endswith(".npz"):
        ident["dataset"] = {"npz_sha256": _file_digest(data.dataset)}
    return ident


def model_identity(model: ModelConfig) -> dict:
    ident = model.model_dump(mode="json")
    if model.checkpoint is not None:
        ident["checkpoint_sha256"] = _file_digest(model.checkpoint)
    return ident


def plan(study: StudyConfig) -> list[Cell]:
    """All cells, ordered so that cells sharing work are adjacent."""
    cells = []
    data = data_identity(study.data)
    quant = study.quant.model_dump(mode="json")
    for model in study.models:
        ident = model_identity(model)
        for seed in study.seeds:
            for recipe in study.recipes:
                for defense in study.defenses:
                    for attack in study.attacks:
                        for eps in attack.eps:
                            config = {
                                "protocol": PROTOCOL, "data": data,
                                "model": ident, "recipe": recipe, "quant": quant,
                                "defense": defense.model_dump(mode="json"),
                                "attack": {"name": attack.name, "norm": attack.norm,
                                           "params": attack.params},
                                "eps": eps, "seed": seed,
                                # batches decide how random attacks and defenses draw
                                "batch_size": study.batch_size,
                            }
                            cells.append(Cell(model, recipe, defense, attack, eps, seed, config,
                                              cell_key(config)))
    return cells


def _seed_from(key: str, seed: int) -> int:
    return (int(key[:12], 16) + seed) % (2**63 - 1)


@dataclass
class Group:
    twin: nn.Module
    defended: nn.Module
    integer: Any | None
    defended_int: Any | None
    integer_note: str | None
    clean_pred: torch.Tensor
    clean_pred_int: torch.Tensor | None


class Workbench:
    """Per-process cache of the work shared across cells of one study (see module doc)."""

    def __init__(self, study: StudyConfig, out: str | Path, progress: bool | None = None) -> None:
        self.study, self.out, self.progress = study, Path(out), progress
        self._data = None
        self._floats: dict[tuple, nn.Module] = {}
        self._groups: dict[tuple, Group] = {}
        self._quantized: dict[tuple, tuple] = {}

    # -- data ---------------------------------------------------------------------------
    def dataset(self):
        if self._data is None:
            from qrobust.data import load_dataset

            self._data = load_dataset(self.study.data.dataset, self.study.data.data_dir)
        return self._data

    def test_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        from qrobust.data import take

        d = self.study.data
        return take(self.dataset().test, d.n_test, d.sample_seed).tensors()

    def calib(self, seed: int) -> torch.Tensor:
        from qrobust.data import take

        return take(self.dataset().train, self.study.quant.calib, seed).tensors()[0]

    # -- models -------------------------------------------------------------------------
    def _model_dir(self, model: ModelConfig, seed: int, recipe: str | None = None) -> Path:
        ident = cell_key({"model": model_identity(model),
                          "data": data_identity(self.study.data)["dataset"],
                          "seed": seed, "recipe": recipe,
                          "quant": self.study.quant.model_dump(mode="json") if recipe else None})
        tag = f"{model.label}-{recipe}" if recipe else model.label
        return self.out / "models" / f"{tag}-s{seed}-{ident[:10]}"

    def float_model(self, model: ModelConfig, seed: int) -> nn.Module:
        """The trained float model (loaded, or trained once and saved under out/models)."""
        k = (model.label, seed)
        if k not in self._floats:
            self._floats[k] = self._load_or_train(model, seed)
        return self._floats[k]

    def _load_or_train(self, model: ModelConfig, seed: int, recipe: str | None = None
                       ) -> nn.Module:
        from qrobust.checkpoint import load_checkpoint, save_checkpoint
        from qrobust.train import default_config, fit

        if model.checkpoint is not None and recipe is None:
            return load_checkpoint(model.checkpoint)[0]
        where = self._model_dir(model, seed, recipe)
        if recipe is not None:
            return self._load_or_train_qat(model, seed, recipe, where)
        if (where / "model.safetensors").is_file():
            return load_checkpoint(where)[0]
        ds = self.dataset()
        cfg = default_config(model.arch, ds.name, **{**model.train, "seed": seed})
        log.info("training %s (seed %d) on %s", model.label, seed, ds.name)
        with torch.random.fork_rng(devices=[]):  # fit seeds the global RNG for weight init
            fitted = fit(model.arch, ds, cfg, dropout=model.dropout, progress=self.progress)
        save_checkpoint(where, fitted.model, fitted.meta)
        return fitted.model.eval()

    def _load_or_train_qat(self, model: ModelConfig, seed: int, recipe: str,
                           where: Path) -> nn.Module:
        """Quantization-aware training: the twin itself is trained from scratch (STE)."""
        from safetensors.torch import load_file, save_file

        from qrobust.checkpoint import atomic_write_bytes
        from qrobust.models import build_model
        from qrobust.train import default_config, fit, model_spec

        ds = self.dataset()
        if model.arch is None:
            raise ValueError(f"quant.mode qat trains from scratch; model '{model.label}' is a "
                             "checkpoint: give 'arch' instead")
        with torch.random.fork_rng(devices=[]):  # weight init from seed; the caller's RNG kept
            torch.manual_seed(seed)
            skeleton = build_model(model_spec(model.arch, ds, model.dropout))
        twin = adapters.make_twin(skeleton, recipe, self.calib(seed),
                                  self.study.quant.gorsline_grid).train()
        file = where / "twin.safetensors"
        if file.is_file():
            twin.load_state_dict(load_file(str(file)))
            return twin.eval()
        cfg = default_config(model.arch, ds.name, **{**model.train, "seed": seed})
        log.info("QAT %s %s (seed %d) on %s", model.label, recipe, seed, ds.name)
        with torch.random.fork_rng(devices=[]):
            fitted = fit(model.arch, ds, cfg, dropout=model.dropout, progress=self.progress,
                         model=twin)
        state = {k: v.detach().contiguous() for k, v in fitted.model.state_dict().items()}
        atomic_write_bytes(file, lambda tmp: save_file(state, tmp))
        return fitted.model.eval()

    def twin(self, model: ModelConfig, recipe: str, seed: int) -> nn.Module:
        if self.study.quant.mode == "qat" and recipe not in ("fp32", "float"):
            return self._load_or_train_qat(model, seed, recipe, self._model_dir(model, seed, recipe))
        return adapters.make_twin(self.float_model(model, seed), recipe, self.calib(seed),
                                  self.study.quant.gorsline_grid)

    def checkpoint(self, model: ModelConfig, seed: int) -> Path:
        """The float checkpoint of ``model`` (trained once and saved under out/models when the
        study trains it): what certification cells load."""
        if model.checkpoint is not None:
            return Path(model.checkpoint)
        self.float_model(model, seed)
        return self._model_dir(model, seed)

    def prepare(self, cells: list[Cell]) -> None:
        """Train / load everything the cells need (before fanning out to workers)."""
        for cell in cells:
            if self.study.quant.mode == "qat" and cell.recipe not in ("fp32", "float"):
                self.twin(cell.model, cell.recipe, cell.seed)
            else:
                self.float_model(cell.model, cell.seed)

    def group(self, cell: Cell) -> Group:
        if cell.group not in self._groups:
            self._groups[cell.group] = self._build_group(cell)
        return self._groups[cell.group]

    def quantized(self, model: ModelConfig, recipe: str, seed: int
                  ) -> tuple[nn.Module, Any | None, str | None]:
        """(twin, integer model or None, why there is none), once per (model, recipe, seed)."""
        k = (model.label, recipe, seed)
        if k not in self._quantized:
            q = self.study.quant
            twin = self.twin(model, recipe, seed)
            for p in twin.parameters():
                p.requires_grad_(False)
            integer, note = (None, "quant.integer is off")
            if q.integer:
                integer, note = adapters.make_integer(twin, recipe, q.integer_backend)
            self._quantized[k] = (twin, integer, note)
        return self._quantized[k]

    def _build_group(self, cell: Cell) -> Group:
        twin, integer, note = self.quantized(cell.model, cell.recipe, cell.seed)
        params = cell.defense.params
        defended = adapters.defend(twin, cell.defense.name, params)
        defended_int = None
        if integer is not None:
            try:
                defended_int = adapters.defend(integer, cell.defense.name, params)
            except Exception as err:  # noqa: BLE001 - recorded, the twin is still evaluated
                note = (f"defense '{cell.defense.name}' cannot wrap the integer model "
                        f"({type(err).__name__}: {err})")
        x, _ = self.test_points()
        gseed = _seed_from(cell_key({"group": list(cell.group)}), cell.seed)
        reseed(defended, gseed)
        clean = predict(defended, x, self.study.batch_size)
        reseed(defended_int, gseed)
        clean_int = None if defended_int is None else predict(defended_int, x,
                                                              self.study.batch_size)
        return Group(twin, defended, integer, defended_int, note, clean, clean_int)


@torch.no_grad()
def predict(model: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    if isinstance(model, nn.Module):
        model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def _mean(t: torch.Tensor) -> float | None:
    return t.float().mean().item() if t.numel() else None


def evaluate_cell(bench: Workbench, cell: Cell) -> tuple[dict, list[str]]:
    """Metrics (see module doc) and masking warnings of one cell."""
    start = time.perf_counter()
    g = bench.group(cell)
    x, y = bench.test_points()
    bs = bench.study.batch_size
    seed = _seed_from(cell.key, cell.seed)
    reseed(g.defended, seed)
    reseed(g.defended_int, seed)
    gen = torch.Generator().manual_seed(seed)
    correct = g.clean_pred == y
    x_adv, warnings = x.clone(), []
    attacked = torch.zeros_like(correct)
    info: dict[str, Any] = {"estimator": None, "grad_evals": 0}
    if cell.eps > 0 and correct.any():
        attacked = correct
        attack = adapters.make_attack(cell.attack.name, g.defended, cell.attack.norm, cell.eps,
                                      cell.attack.params)
        idx = correct.nonzero().squeeze(1)
        x_adv[idx], stats = adapters.attack_points(attack, x[idx], y[idx], bs, gen)
        warnings = adapters.masking_warnings(g.defended, attack, x[idx], stats)
        described = adapters.describe(attack)
        info = {"estimator": described["estimator"], **stats,
                **({"suite": described["suite"], "budget": described["budget"]}
                   if "suite" in described else {})}
    pred_adv = predict(g.defended, x_adv, bs)
    robust = correct & (pred_adv == y)
    fooled = correct & ~robust
    delta = (x_adv - x).flatten(1)
    metrics: dict[str, Any] = {
        "n": len(y), "clean_acc": _mean(correct), "robust_acc": _mean(robust),
        "attack_success": _mean(fooled[correct]) if correct.any() else None,
        "mean_linf": _mean(delta[fooled].abs().amax(1)) if fooled.any() else None,
        "mean_l2": _mean(delta[fooled].norm(dim=1)) if fooled.any() else None,
        **info, "integer_note": g.integer_note,
        "clean_acc_int": None, "robust_acc_int": None, "transfer_rate": None,
        "clean_disagreement": None, "adv_disagreement": None,
    }
    if g.defended_int is not None:
        pred_adv_int = predict(g.defended_int, x_adv, bs)
        t = transfer_metrics(y, g.clean_pred, pred_adv, g.clean_pred_int, pred_adv_int,
                             attacked)
        metrics.update({"clean_acc_int": t["integer_clean_acc"],
                        "robust_acc_int": t["integer_robust_acc"],
                        **{k: t[k] for k in ("transfer_rate", "clean_disagreement",
                                             "adv_disagreement")}})
    eps_tol = cell.eps * (1 + 1e-5) + 1e-6
    norm = metrics["mean_linf"] if cell.attack.norm == "linf" else metrics["mean_l2"]
    if norm is not None and norm > eps_tol:
        warnings.append(f"mean {cell.attack.norm} perturbation {norm:.4g} exceeds eps "
                        f"{cell.eps:.4g}: the attack left the threat model")
    metrics["seconds"] = round(time.perf_counter() - start, 4)
    return metrics, warnings


def _attack_label(attack: dict) -> str:
    """The attack's name; a suite run below its published budget says so."""
    scale = (attack.get("params") or {}).get("budget_scale", 1.0)
    return attack["name"] + (f"(budget x{scale:g})" if scale != 1.0 else "")


def row_label(cell_config: dict) -> dict:
    """Flat, human-facing columns of a stored cell config (for tables and plots)."""
    c = cell_config
    d = c["defense"]
    params = d.get("params") or {}
    defense = d["name"] + ("(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
                           if params else "")
    m = c["model"]
    return {"model": m.get("name") or m.get("arch") or Path(m.get("checkpoint") or "").name,
            "recipe": c["recipe"], "defense": defense, "attack": _attack_label(c["attack"]),
            "norm": c["attack"]["norm"], "eps": c["eps"], "seed": c["seed"]}
