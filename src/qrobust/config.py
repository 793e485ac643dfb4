"""Experiment (study) configs: YAML in, validated frozen pydantic models out.

A study is the grid models x recipes x defenses x attacks x eps x seeds evaluated on the
first ``data.n_test`` points of a fixed permutation of a test set. Every error names the bad
field and fits on one line, e.g.::

    study.yaml: attacks[1].eps[0]: eps must be >= 0, got -0.1

Example (``qrobust demo`` writes one like it)::

    name: demo
    data: {dataset: digits, n_test: 200}
    models:
      - {name: cnn, arch: small-cnn, train: {epochs: 10}}
      - {name: mnist-cnn, checkpoint: benchmarks/models/small-cnn-mnist}
    recipes: [fp32, w8a8, w4a4, w2a2]
    defenses: [none, {name: median, params: {size: 3}}]
    attacks:
      - {name: fgsm, eps: [0, 2/255, 8/255]}
      - {name: pgd, norm: linf, eps: [2/255, 8/255], params: {steps: 10}}
    verify:  # complete verification of the integer programs, eps in pixel codes
      - {eps: [1, 2, 0.1], timeout: 60, limit: 100}
    seeds: [0]

Relative checkpoint paths are looked up from the current directory, then from the YAML
file's directory. eps values may be written as fractions ("8/255").
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from qrobust.errors import ConfigError, QrobustError
from qrobust.quant.spec import FLOAT_RECIPES, recipe_bits


def _params_error(kind: str, name: str, err: Exception) -> ValueError:
    """A one-line message for parameters the attack / defense / trainer rejected."""
    text = str(err)
    if text.startswith(f"{kind} '{name}' has no parameter"):  # already said (make_attack)
        return ValueError(text)
    if isinstance(err, TypeError) and "unexpected keyword argument" in text:
        bad = text.rsplit("argument", 1)[1].strip(" '")
        return ValueError(f"{kind} '{name}' has no parameter '{bad}' (check the spelling)")
    return ValueError(f"{kind} '{name}' rejects these parameters: {text}")


def _check_types(functions: list, params: dict, kind: str, name: str) -> None:
    """Each parameter against its annotation in the first of ``functions`` that names it
    (pydantic's lax mode: "6" is an int, "six" is not)."""
    import typing

    from pydantic import TypeAdapter

    hints = []
    for fn in functions:
        try:
            hints.append(typing.get_type_hints(fn))
        except Exception:  # noqa: BLE001 - an unresolvable annotation is left to the call
            continue
    for key, value in params.items():
        for fn_hints in hints:
            hint = fn_hints.get(key)
            if hint is None:
                continue
            try:
                TypeAdapter(hint).validate_python(value)
            except ValidationError:
                shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
                raise ValueError(f"{kind} '{name}': parameter '{key}' must be {shown}, got "
                                 f"{value!r}") from None
            break


def _init_chain(cls: type) -> list:
    """The ``__init__`` of ``cls`` and of the bases it forwards ``**kwargs`` to."""
    return [c.__dict__["__init__"] for c in cls.__mro__ if "__init__" in c.__dict__
            and c is not object]


def _stand_in_model():
    """A tiny conv net with the layer kinds defenses attach to (ReLU, a classifier Linear):
    parameters are checked by building the attack or defense around it, before any work."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 2))


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


def _defense_dicts(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [{"name": d} if isinstance(d, str) else d for d in v]
    return v


def _check_recipes(v: tuple[str, ...]) -> tuple[str, ...]:
    for i, r in enumerate(v):
        try:
            recipe_bits(r)
        except (ConfigError, ValueError) as err:
            raise ValueError(f"recipes[{i}]: {err}") from None
    if len(set(v)) != len(v):
        raise ValueError(f"recipes repeat: {list(v)}")
    return v


def _check_arch_params(arch: str, params: dict) -> None:
    """Build ``arch`` with ``params`` on a small input: an unknown or ill-typed option fails
    here, before any training."""
    if not params:
        return
    from qrobust.models import ModelSpec, build_model

    try:
        build_model(ModelSpec(arch, (3, 32, 32), 10, kwargs=dict(params)))
    except Exception as err:  # noqa: BLE001 - any failure is a bad option, said in one line
        raise ValueError(f"arch_params {params} do not build '{arch}': "
                         f"{type(err).__name__}: {err}") from None


def integer_recipe(recipe: str) -> bool:
    """Whether a recipe has an integer program: weights and activations of at most 8 bits
    (float recipes, weight-only recipes and wider activations have none)."""
    return all(b is not None and b <= 8 for b in recipe_bits(recipe))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Which test points: the first ``n_test`` of a permutation seeded by ``sample_seed``."""

    dataset: str = "digits"
    n_test: int = Field(500, ge=1)
    sample_seed: int = 0
    data_dir: str | None = None

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from qrobust.data import dataset_names

        if v.endswith(".npz") or v in dataset_names():
            return v
        raise ValueError(f"unknown dataset '{v}'; valid: {', '.join(dataset_names())} or an .npz file")


def _parse_eps(v: Any) -> float:
    if isinstance(v, str):
        try:
            v = float(Fraction(v.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps '{v}' is not a number or a fraction like 8/255") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"eps must be a number, got {v!r}")
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"eps must be >= 0 and finite, got {v}")
    return float(v)


class AttackConfig(_Strict):
    """One attack and its eps sweep (in [0, 1] pixel units); ``params`` go to the attack."""

    name: str = "standard"  # the worst-case suite; "fast" (PGD-10) or one attack on request
    norm: Literal["linf", "l2"] = "linf"
    eps: tuple[float, ...] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    # the masking checks ``qrobust attack`` runs by default (see qrobust.eval.robustness)
    checks: tuple[Literal["gradients", "randomness", "blackbox", "temperature"], ...] = (
        "gradients", "randomness", "blackbox", "temperature")

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, v: Any) -> tuple[float, ...]:
        values = v if isinstance(v, (list, tuple)) else [v]
        out = []
        for i, e in enumerate(values):
            try:
                out.append(_parse_eps(e))
            except ValueError as err:
                raise ValueError(f"eps[{i}]: {err}") from None
        if len(set(out)) != len(out):
            raise ValueError(f"eps values repeat: {out}")
        return tuple(out)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from qrobust.attacks import ATTACKS

        names = ATTACKS.names()
        if v not in names:
            raise ValueError(f"unknown attack '{v}'; valid: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _params_build(self) -> AttackConfig:
        """Build the attack once around a stand-in model: a misspelt or badly typed parameter
        fails here, not after the models are trained."""
        from qrobust.attacks import ATTACKS, ThreatModel, make_attack

        typed = {k: v for k, v in self.params.items() if k != "estimator"}  # a name here
        _check_types(_init_chain(ATTACKS.get(self.name)), typed, "attack", self.name)
        try:  # the construction the grid makes
            threat = ThreatModel(self.norm, max(self.eps) or 1e-3)
            make_attack(self.name, _stand_in_model(), threat, self.params)
        except (TypeError, ValueError, QrobustError) as err:
            raise _params_error("attack", self.name, err) from None
        return self


class DefenseConfig(_Strict):
    """An input/model defense from ``qrobust.defenses.DEFENSES`` (``none``: no defense)."""

    name: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from qrobust.defenses import DEFENSES

        names = ["none", *DEFENSES.names()]
        if v not in names:
            raise ValueError(f"unknown defense '{v}'; valid: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _params_build(self) -> DefenseConfig:
        """Build the defense once around a stand-in model (as attacks are checked). Module
        names given as a dropout ``placement`` belong to the real model and are left to it."""
        if self.name == "none":
            return self
        from qrobust.defenses import DEFENSES

        params = dict(self.params)
        _check_types([DEFENSES.get(self.name)], params, "defense", self.name)
        if params.get("placement", "classifier") not in ("classifier", "linear", "relu"):
            params.pop("placement")
        try:
            DEFENSES.get(self.name)(_stand_in_model(), **params)
        except (TypeError, ValueError, QrobustError) as err:
            raise _params_error("defense", self.name, err) from None
        return self

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"


class QuantConfig(_Strict):
    """How recipes are applied. ``ptq``: quantize the trained float model (calibrated on
    ``calib`` training images). ``qat``: train the quantized twin itself (STE).
    ``gorsline_grid``: the weight grid of ``gorslineB`` recipes (see
    ``qrobust.quant.make_twin``)."""

    mode: Literal["ptq", "qat"] = "ptq"
    calib: int = Field(256, ge=1)
    integer: bool = True
    integer_backend: Literal["reference", "onnx", "openvino"] = "reference"
    gorsline_grid: Literal["symmetric", "midrise", "midrise-fanin", "midrise-scaled"] = "symmetric"


class CertifyConfig(_Strict):
    """Certification cells: every model of the study certified by randomized smoothing on
    ``limit`` test points (the seeded choice ``qrobust certify --limit`` makes), one row per
    image in table ``certify``, exactly as ``qrobust certify`` with these options would write
    them (the same keys: a study and the command share results)."""

    sigma: float = Field(0.25, gt=0)
    n0: int = Field(100, ge=1)
    n: int = Field(10_000, ge=1)
    alpha: float = Field(0.001, gt=0, lt=1)
    integer: bool = False
    noise: str = "gaussian"
    recipe: str = "w8a8"
    backend: Literal["reference", "onnx", "openvino"] = "onnx"
    integer_input: Literal["wide", "clipped"] = "wide"
    limit: int | None = Field(100, ge=1)
    first: bool = False  # the first `limit` test points in order instead of a seeded choice
    batch_size: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _noise(self) -> CertifyConfig:
        kinds = ("gaussian", "rounded-gaussian", "discrete-gaussian") if self.integer else \
            ("gaussian",)
        if self.noise not in kinds:
            raise ValueError(f"noise '{self.noise}' with integer={self.integer}; valid: "
                             f"{', '.join(kinds)}")
        if self.integer:
            recipe_bits(self.recipe)  # a one-line error for a bad recipe
        return self


class VerifyConfig(_Strict):
    """Verify cells: complete verification (``qrobust.verify``) of the integer program of
    every quantized recipe of every model, on the first ``limit`` of the study's test points,
    one cell per eps in pixel codes (an integer 0..255, or a fraction of the input range
    below 1 such as 0.1 or "8/255", converted as ``qrobust.verify.run.eps_codes`` says), each
    query under ``timeout`` seconds in its own process (``workers`` at once; not part of a
    cell's key). ``ties``: 'first' (the executor's argmax) or 'label'."""

    eps: tuple[int, ...] = Field(min_length=1)
    timeout: float = Field(60.0, gt=0)
    limit: int = Field(100, ge=1)
    ties: Literal["first", "label"] = "first"
    workers: int = Field(1, ge=1)

    @field_validator("eps", mode="before")
    @classmethod
    def _codes(cls, v: Any) -> tuple[int, ...]:
        from qrobust.verify.run import eps_codes

        out = []
        for i, e in enumerate(v if isinstance(v, (list, tuple)) else [v]):
            try:
                out.append(eps_codes(e))
            except ConfigError as err:
                raise ValueError(f"eps[{i}]: {err}") from None
        if len(set(out)) != len(out):
            raise ValueError(f"eps values repeat (in pixel codes): {out}")
        return tuple(out)


class FinetuneConfig(_Strict):
    """Train a defended variant of a model from its float weights (loaded or trained for the
    study), once per (recipe, seed), cached under ``<out>/models`` by content:

    * ``dq``: Defensive Quantization (``qrobust.defenses.dq.fit_dq``) at each recipe's bit
      widths, ReLU6-clipped quantizers; ``beta: 0`` is the paper's vanilla-QAT control;
    * ``sq-ensemble``: ``k`` stochastic-quantizer members with the diversity term
      (``qrobust.defenses.ensemble.fit_sq_ensemble``); its recipes must be float (the
      stochastic quantizers are its own, it has no integer program).

    ``quantizers``: ``observer`` (calibrated scales, fixed) or ``lsq`` (learned step sizes,
    ``qrobust.quant``'s ``lsq`` recipe option) for ``dq``.
    ``n_train``: train on that many images of a permutation of the training set seeded by
    ``subset_seed`` (default: the study seed of the cell)."""

    method: Literal["dq", "sq-ensemble"]
    beta: float = Field(0.0, ge=0.0)
    quantizers: Literal["observer", "lsq"] = "observer"
    k: int = Field(3, ge=1)
    bits: int = Field(4, ge=1, le=8)
    diversity_weight: float = Field(0.1, ge=0.0)
    epochs: int = Field(1, ge=1)
    lr: float = Field(0.01, gt=0.0)
    batch_size: int = Field(128, ge=1)
    n_train: int | None = Field(None, ge=1)
    subset_seed: int | None = None


class ModelConfig(_Strict):
    """Either ``arch`` (trained for the study with ``train`` overrides of
    ``qrobust.train.default_config``, and the architecture's own ``arch_params`` such as
    small-cnn's ``width``) or ``checkpoint`` (a saved float model); ``finetune`` trains a
    defended variant of it. ``recipes`` / ``defenses``, when given, replace the
    study's lists for this model (which cells exist, not what a cell computes)."""

    name: str | None = None
    arch: str | None = None
    checkpoint: str | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    arch_params: dict[str, Any] = Field(default_factory=dict)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    finetune: FinetuneConfig | None = None
    recipes: tuple[str, ...] | None = Field(None, min_length=1)
    defenses: tuple[DefenseConfig, ...] | None = Field(None, min_length=1)

    _recipe_list = field_validator("recipes", mode="before")(lambda v: _as_list(v))
    _defense_strings = field_validator("defenses", mode="before")(lambda v: _defense_dicts(v))

    @field_validator("recipes")
    @classmethod
    def _valid_recipes(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else _check_recipes(v)

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.arch is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of 'arch' (train it) or 'checkpoint' (load it)")
        if self.arch_params and self.arch is None:
            raise ValueError("arch_params go with 'arch'; a checkpoint's architecture is stored "
                             "in it")
        if self.arch is not None:
            from qrobust.models import MODELS

            if self.arch not in MODELS:
                raise ValueError(f"unknown model '{self.arch}'; valid: {', '.join(MODELS.names())}")
            _check_arch_params(self.arch, self.arch_params)
            from qrobust.train import TrainConfig

            unknown = set(self.train) - set(TrainConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown train option(s) {sorted(unknown)}; valid: "
                                 f"{', '.join(sorted(TrainConfig.__dataclass_fields__))}")
            _check_types([TrainConfig], self.train, "train", self.arch)
        return self

    @property
    def label(self) -> str:
        return self.name or self.arch or Path(self.checkpoint or "model").name

    @property
    def finetune_method(self) -> str | None:
        return self.finetune.method if self.finetune is not None else None


class StudyConfig(_Strict):
    name: str = Field("study", pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = Field(default_factory=DataConfig)
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    recipes: tuple[str, ...] = Field(("fp32",), min_length=1)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    defenses: tuple[DefenseConfig, ...] = Field((DefenseConfig(),), min_length=1)
    attacks: tuple[AttackConfig, ...] = ()
    certify: tuple[CertifyConfig, ...] = ()
    verify: tuple[VerifyConfig, ...] = ()
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _some_work(self) -> StudyConfig:
        if not self.attacks and not self.certify and not self.verify:
            raise ValueError("a study needs attacks, certify or verify cells")
        return self

    _defense_strings = field_validator("defenses", mode="before")(lambda v: _defense_dicts(v))
    _recipe_list = field_validator("recipes", mode="before")(lambda v: _as_list(v))
    _valid_recipes = field_validator("recipes")(lambda v: _check_recipes(v))

    def recipes_of(self, model: ModelConfig) -> tuple[str, ...]:
        return model.recipes or self.recipes

    def defenses_of(self, model: ModelConfig) -> tuple[DefenseConfig, ...]:
        return model.defenses or self.defenses

    @model_validator(mode="after")
    def _finetune_recipes(self) -> StudyConfig:
        for i, m in enumerate(self.models):
            method = m.finetune_method
            floats = [r for r in self.recipes_of(m) if r in FLOAT_RECIPES]
            if method == "sq-ensemble" and len(floats) != len(self.recipes_of(m)):
                raise ValueError(f"models[{i}] ({m.label}): an sq-ensemble has its own "
                                 "stochastic quantizers; give it recipes: [fp32]")
            if method == "dq" and self.certify:
                raise ValueError(f"models[{i}] ({m.label}): certify cells certify float "
                                 "checkpoints; a dq model has none (certify its base model)")
            if method == "dq" and floats:
                raise ValueError(f"models[{i}] ({m.label}): dq fine-tunes quantized recipes; "
                                 f"remove {floats} from its recipes")
        return self

    @model_validator(mode="after")
    def _verifiable(self) -> StudyConfig:
        if self.verify and not any(integer_recipe(r) for m in self.models
                                   for r in self.recipes_of(m)):
            raise ValueError("verify cells verify integer programs: give a recipe with weights "
                             "and activations of at most 8 bits (e.g. w8a8, w4a4)")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> StudyConfig:
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model names repeat: {labels}; give each model a distinct 'name'")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    errors = err.errors()
    locs = [e["loc"] for e in errors]
    parts = []
    for e in errors:
        loc_t = e["loc"]
        # a tuple that is "too short" only because its items failed: report the items only
        if e["type"] == "too_short" and any(o[:len(loc_t)] == loc_t and o != loc_t for o in locs):
            continue
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc_t).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        last = str(loc_t[-1]) if loc_t else ""
        if last and msg.startswith(last + "["):  # "recipes: recipes[1]: ..." -> "recipes[1]: ..."
            loc, msg = loc[: len(loc) - len(last)] + msg.split(":", 1)[0], msg.split(":", 1)[1].strip()
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)


def parse_study(data: Any, source: str = "config") -> StudyConfig:
    """Validate a plain dict (e.g. parsed YAML); raise ConfigError with a one-line message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of study fields, got {type(data).__name__}")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def resolve_paths(study: StudyConfig, base: Path) -> StudyConfig:
    """Make checkpoint paths absolute (cwd first, then ``base``); missing files fail here."""
    models = []
    for i, m in enumerate(study.models):
        if m.checkpoint is None:
            models.append(m)
            continue
        found = next((p for p in (Path(m.checkpoint), base / m.checkpoint) if p.exists()), None)
        if found is None:
            raise ConfigError(f"models[{i}].checkpoint: '{m.checkpoint}' not found (looked in "
                              f"{Path.cwd()} and {base}); train one with `qrobust train`")
        models.append(m.model_copy(update={"checkpoint": str(found.resolve())}))
    return study.model_copy(update={"models": tuple(models)})


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    return resolve_paths(parse_study(data, str(path)), path.parent)


def dump_study(study: StudyConfig) -> str:
    """YAML text of a validated study (round-trips through :func:`parse_study`)."""
    return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
