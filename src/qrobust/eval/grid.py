"""A study -> a grid of cells -> one row of metrics per cell.

A *cell* is (model, recipe, defense, attack, eps, seed). Its resolved config (everything
that changes its numbers, checkpoint contents included) is hashed into the store key, so a
rerun skips finished cells and a changed config never reuses a stale row.

Work shared across cells (the :class:`Workbench` caches it per process):

* one float model per (model, seed): trained once and saved under ``<out>/models/`` (a
  killed run does not retrain it), or loaded from its checkpoint;
* one quantized twin, integer model and defended model per (model, recipe, defense, seed);
* clean predictions once per (model, recipe, defense, seed), on twin and integer model.

A model whose ``checkpoint`` is already quantized (kind "quantized": ``qrobust quantize``, a
user's own model too; kind "imported": ``qrobust import``) is its own twin: it gets one recipe,
its stored one (``"imported"`` for a file from another toolchain), whatever ``recipes`` says,
and its integer model is its program (:func:`deployed_recipe`).

Each cell is one :func:`qrobust.eval.robustness.robustness_cell` (the unit of work of
``qrobust attack`` too; its module doc defines the metrics) on the defended twin and the
same defense around the integer model, with one generator seeded from the cell key: cells
are independent of each other and of the order they run in, which is what lets the Ray
executor reproduce the local one. A row adds ``integer_note`` (why there is no integer model)
and ``seconds`` (wall time of the cell, shared work excluded).
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

from qrobust.attacks.evaluate import predict
from qrobust.config import AttackConfig, DataConfig, DefenseConfig, ModelConfig, StudyConfig
from qrobust.defenses import reseed
from qrobust.errors import ConfigError
from qrobust.eval.robustness import RobustnessSpec, defended_pair, robustness_cell
from qrobust.eval.store import cell_key, file_sha256
from qrobust.integer import integer_or_reason
from qrobust.integer.imports import integer_model
from qrobust.quant.spec import FLOAT_RECIPES, recipe_bits
from qrobust.quant.twin import make_twin

log = logging.getLogger(__name__)

PROTOCOL = 3  # bump when the meaning of a metric changes: old rows stop matching new keys
# 2: twin/integer disagreement as transfer_metrics defines it (clean_ and adv_disagreement)
# 3: cells are qrobust.eval.robustness cells: the masking checks of `qrobust attack`
TABLE = "robustness"
IMPORTED = "imported"  # the recipe of an imported file's cells (int8 programs)


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
    """What the model's weights depend on (its recipes / defenses lists only pick cells)."""
    ident = model.model_dump(mode="json", exclude={"recipes", "defenses"})
    for optional in ("finetune", "arch_params"):  # keys of studies written before they existed
        if not ident[optional]:
            ident.pop(optional)
    if "finetune" in ident and ident["finetune"]["subset_seed"] is None:
        ident["finetune"].pop("subset_seed")
    if "finetune" in ident and ident["finetune"]["quantizers"] == "observer":
        ident["finetune"].pop("quantizers")  # the default before LSQ: older keys stay valid
    if model.checkpoint is not None:  # its content, not where it lies (a clone, a copy)
        ident["checkpoint"] = None
        ident["checkpoint_sha256"] = _file_digest(model.checkpoint)
    return ident


@functools.lru_cache(maxsize=64)
def _kind_and_recipe(file: str, size: int, mtime_ns: int) -> tuple[str, str | None]:
    from qrobust.checkpoint import read_meta

    meta = read_meta(file)
    kind = meta.get("kind", "float")
    if kind == "imported":
        return kind, IMPORTED
    if kind == "quantized":
        return kind, meta["quant"]["recipe"]["text"]
    return kind, None


def deployed_recipe(model: ModelConfig) -> str | None:
    """The recipe of a model whose checkpoint is already quantized (its stored recipe, or
    :data:`IMPORTED` for an imported file); None for a float model the study quantizes."""
    if model.checkpoint is None:
        return None
    p = Path(model.checkpoint)
    file = p / "model.safetensors" if p.is_dir() else p
    st = file.stat()
    kind, recipe = _kind_and_recipe(str(file.resolve()), st.st_size, st.st_mtime_ns)
    if recipe is not None and model.finetune is not None:
        raise ConfigError(f"model '{model.label}': its checkpoint is already {kind}; a "
                          "fine-tune starts from a float checkpoint")
    return recipe


def recipes_for(study: StudyConfig, model: ModelConfig) -> tuple[str, ...]:
    """The recipes of ``model``'s cells: the study's (or the model's own list), or the one
    recipe of an already quantized checkpoint."""
    recipe = deployed_recipe(model)
    return (recipe,) if recipe is not None else study.recipes_of(model)


def plan(study: StudyConfig) -> list[Cell]:
    """All cells, ordered so that cells sharing work are adjacent."""
    cells = []
    data = data_identity(study.data)
    quant = study.quant.model_dump(mode="json")
    for model in study.models:
        ident = model_identity(model)
        for seed in study.seeds:
            for recipe in recipes_for(study, model):
                for defense in study.defenses_of(model):
                    for attack in study.attacks:
                        for eps in attack.eps:
                            config = {
                                "protocol": PROTOCOL, "data": data,
                                "model": ident, "recipe": recipe, "quant": quant,
                                "defense": defense.model_dump(mode="json"),
                                "attack": {"name": attack.name, "norm": attack.norm,
                                           "params": attack.params,
                                           "checks": list(attack.checks)},
                                "eps": eps, "seed": seed,
                                # batches decide how random attacks and defenses draw
                                "batch_size": study.batch_size,
                            }
                            cells.append(Cell(model, recipe, defense, attack, eps, seed, config,
                                              cell_key(config)))
    return cells


def _seed_from(key: str, seed: int) -> int:
    return (int(key[:12], 16) + seed) % (2**63 - 1)


def cell_seed(cell: Cell) -> int:
    """The seed of the cell's one generator: from the study seed and the cell key, so that a
    cell draws the same wherever and in whatever order it runs."""
    return _seed_from(cell.key, cell.seed)


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
        """The trained float model (loaded, or trained once and saved under out/models); for
        an ``sq-ensemble`` fine-tune, the ensemble trained from it."""
        k = (model.label, seed)
        if k not in self._floats:
            if model.finetune_method == "sq-ensemble":
                self._floats[k] = self._finetuned(model, seed, None)
            else:
                self._floats[k] = self._load_or_train(model, seed)
        return self._floats[k]

    def _base_model(self, model: ModelConfig, seed: int) -> tuple[nn.Module, str, dict]:
        """The float model a fine-tune starts from, its architecture name and options."""
        from qrobust.checkpoint import read_meta

        # unnamed: every fine-tune of one float model shares it (and so does an unnamed model
        # of the study with the same arch and train options)
        base = model.model_copy(update={"finetune": None, "name": None})
        if model.arch is not None:
            arch, params = model.arch, model.arch_params
        else:
            spec = read_meta(model.checkpoint)["model"]
            arch, params = spec["arch"], spec.get("kwargs") or {}
        return self._load_or_train(base, seed), arch, params

    def _finetuned(self, model: ModelConfig, seed: int, recipe: str | None) -> nn.Module:
        """A ``finetune`` variant (see ``qrobust.config.FinetuneConfig``), trained once and saved
        under out/models as a checkpoint of its own kind."""
        from qrobust.checkpoint import load_checkpoint, save_checkpoint
        from qrobust.data import Dataset, take
        from qrobust.train import default_config

        where = self._model_dir(model, seed, recipe)
        if (where / "model.safetensors").is_file():
            import qrobust.defenses  # noqa: F401  (registers the sq-ensemble checkpoint kind)
            import qrobust.quant  # noqa: F401  (registers the quantized checkpoint kind)

            return load_checkpoint(where)[0].eval()
        ft = model.finetune
        base, arch, arch_params = self._base_model(model, seed)
        ds = self.dataset()
        subset = take(ds.train, ft.n_train, seed if ft.subset_seed is None else ft.subset_seed)
        data = Dataset(ds.name, subset, ds.test, ds.classes, ds.source)
        cfg = default_config(arch, ds.name, epochs=ft.epochs, lr=ft.lr,
                             batch_size=ft.batch_size, seed=seed)
        log.info("fine-tuning %s%s (seed %d) on %s", model.label, f" {recipe}" if recipe else "",
                 seed, ds.name)
        with torch.random.fork_rng(devices=[]):  # the fits seed torch for their inits
            if ft.method == "dq":
                from qrobust.defenses.dq import fit_dq

                wbits, abits = recipe_bits(recipe)
                fitted = fit_dq(arch, data, cfg, wbits, abits, ft.beta, init=base,
                                progress=self.progress, arch_params=arch_params,
                                lsq=ft.quantizers == "lsq")
                kind = "quantized"
            else:
                from qrobust.defenses.ensemble import fit_sq_ensemble

                fitted = fit_sq_ensemble(arch, data, cfg, k=ft.k, bits=ft.bits,
                                         weight=ft.diversity_weight, progress=self.progress,
                                         init=base, model_kwargs=arch_params)
                kind = "sq-ensemble"
        save_checkpoint(where, fitted.model, fitted.meta, kind=kind)
        return fitted.model.eval()

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
            fitted = fit(model.arch, ds, cfg, dropout=model.dropout, progress=self.progress,
                         arch_params=model.arch_params)
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
            skeleton = build_model(model_spec(model.arch, ds, model.dropout, **model.arch_params))
        twin = make_twin(skeleton, recipe, self.calib(seed),
                         self.study.quant.gorsline_grid).train()
        file = where / "twin.safetensors"
        if file.is_file():
            twin.load_state_dict(load_file(str(file)))
            return twin.eval()
        cfg = default_config(model.arch, ds.name, **{**model.train, "seed": seed})
        log.info("QAT %s %s (seed %d) on %s", model.label, recipe, seed, ds.name)
        with torch.random.fork_rng(devices=[]):
            fitted = fit(model.arch, ds, cfg, dropout=model.dropout, progress=self.progress,
                         model=twin, arch_params=model.arch_params)
        state = {k: v.detach().contiguous() for k, v in fitted.model.state_dict().items()}
        atomic_write_bytes(file, lambda tmp: save_file(state, tmp))
        return fitted.model.eval()

    def _trained_twin(self, model: ModelConfig, recipe: str) -> bool:
        """Whether the twin is trained itself (DQ fine-tune, QAT) rather than quantized from
        the float model."""
        return deployed_recipe(model) is None and (
            model.finetune_method == "dq"
            or self.study.quant.mode == "qat" and recipe not in FLOAT_RECIPES)

    def twin(self, model: ModelConfig, recipe: str, seed: int) -> nn.Module:
        if deployed_recipe(model) is not None:  # the checkpoint is the twin
            return self.float_model(model, seed)
        if model.finetune_method == "dq":
            return self._finetuned(model, seed, recipe)
        if self._trained_twin(model, recipe):
            return self._load_or_train_qat(model, seed, recipe, self._model_dir(model, seed, recipe))
        return make_twin(self.float_model(model, seed), recipe, self.calib(seed),
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
            if self._trained_twin(cell.model, cell.recipe):
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
            if q.integer and recipe == IMPORTED:
                integer, note = integer_model(twin), None  # the file's program, exactly
            elif q.integer:
                integer, note = integer_or_reason(twin, recipe, q.integer_backend)
            self._quantized[k] = (twin, integer, note)
        return self._quantized[k]

    def _build_group(self, cell: Cell) -> Group:
        twin, integer, note = self.quantized(cell.model, cell.recipe, cell.seed)
        defense = [(cell.defense.name, cell.defense.params)]
        defended, defended_int, why_not = defended_pair(twin, integer, defense)
        note = why_not or note
        x, _ = self.test_points()
        gseed = _seed_from(cell_key({"group": list(cell.group)}), cell.seed)
        reseed(defended, gseed)
        clean = predict(defended, x, self.study.batch_size)
        reseed(defended_int, gseed)
        clean_int = None if defended_int is None else predict(defended_int, x,
                                                              self.study.batch_size)
        return Group(twin, defended, integer, defended_int, note, clean, clean_int)


def spec_of(cell: Cell, batch_size: int) -> RobustnessSpec:
    a = cell.attack
    return RobustnessSpec(attack=a.name, norm=a.norm, eps=cell.eps, params=a.params,
                          checks=a.checks, batch_size=batch_size)


def evaluate_cell(bench: Workbench, cell: Cell) -> tuple[dict, list[str]]:
    """Metrics (see :mod:`qrobust.eval.robustness`) and masking warnings of one cell."""
    start = time.perf_counter()
    g = bench.group(cell)
    x, y = bench.test_points()
    result = robustness_cell(g.defended, x, y, spec_of(cell, bench.study.batch_size),
                             cell_seed(cell), integer=g.defended_int,
                             clean_pred=g.clean_pred, clean_pred_int=g.clean_pred_int)
    metrics = {**result.metrics, "integer_note": g.integer_note,
               "seconds": round(time.perf_counter() - start, 4)}
    return metrics, result.warnings


LABEL_PARAMS = ("estimator", "eot_samples", "budget_scale")  # what tells two attack rows apart


def _attack_label(attack: dict) -> str:
    """The attack's name, with the parameters that tell attacks of one name apart (the
    estimator, EOT draws, a suite run below its published budget)."""
    params = attack.get("params") or {}
    shown = [f"{k}={params[k]}" for k in LABEL_PARAMS if k in params]
    return attack["name"] + (f"({','.join(shown)})" if shown else "")


def model_label(model_identity: dict) -> str:
    """A model's name in tables: its name, arch or checkpoint file name."""
    m = model_identity
    return m.get("name") or m.get("arch") or Path(m.get("checkpoint") or "").name


def row_label(cell_config: dict) -> dict:
    """Flat, human-facing columns of a stored cell config (for tables and plots)."""
    c = cell_config
    d = c["defense"]
    params = d.get("params") or {}
    defense = d["name"] + ("(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
                           if params else "")
    return {"model": model_label(c["model"]),
            "recipe": c["recipe"], "defense": defense, "attack": _attack_label(c["attack"]),
            "norm": c["attack"]["norm"], "eps": c["eps"], "seed": c["seed"]}
