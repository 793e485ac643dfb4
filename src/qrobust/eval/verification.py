"""Verify cells of a study: verified accuracy of the integer program of each quantized
(model, recipe, seed) at each eps in pixel codes (``StudyConfig.verify``, see
:class:`qrobust.config.VerifyConfig`). Imported checkpoints are skipped with a warning: the
verifier does not support their programs yet (input tables, float requantization).

A cell is (model, recipe, verify config, eps, seed); its resolved config is hashed into the
store key (table ``verify``), so a rerun skips stored cells. The cells of one (model, recipe,
seed, verify config) share one twin and one batch of queries: every eps of the group is
asked of the same points in one process pool (:func:`qrobust.verify.run.run_queries`), and
each cell is written when the group is done. Queries are asked of the first ``limit`` of the
study's test points that the integer program classifies correctly.

Metrics per cell (:func:`qrobust.verify.run.summarize`): ``n``, ``queries``, ``clean_acc``
(of the integer program), ``verified_acc`` (robust / n), ``robust``, ``vulnerable``,
``timeout``, ``median_seconds``, ``max_seconds`` per query, plus ``seconds`` (the cell's
queries' seconds added up) and, for the report's comparison with randomized smoothing, ``input_dim`` (values
per image) and ``float_weights_sha256`` (the float checkpoint the twin was quantized from,
the key ``qrobust certify`` rows carry; None for fine-tuned and QAT twins).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from qrobust.config import ModelConfig, StudyConfig, VerifyConfig, integer_recipe
from qrobust.eval.grid import IMPORTED, Workbench, data_identity, model_identity, recipes_for
from qrobust.eval.store import cell_key

log = logging.getLogger(__name__)

TABLE = "verify"
PROTOCOL = 1  # bump when the meaning of a verify metric changes


@dataclass(frozen=True)
class VerifyCell:
    model: ModelConfig
    recipe: str
    verify: VerifyConfig
    eps: int  # pixel codes
    seed: int
    config: dict  # the resolved config that is hashed and stored
    key: str

    @property
    def group(self) -> tuple:
        """Cells answered by one batch of queries."""
        return (self.model.label, self.recipe, self.seed, self.verify)


def verify_plan(study: StudyConfig) -> list[VerifyCell]:
    """Every verify cell, for the recipes that have an integer program."""
    cells = []
    data = data_identity(study.data)
    # how the twin is made; whether the study's attack cells also build an integer model is not
    quant = study.quant.model_dump(mode="json", exclude={"integer", "integer_backend"})
    for model in study.models:
        ident = model_identity(model)
        for seed in study.seeds:
            for recipe in recipes_for(study, model):
                if recipe == IMPORTED:  # not wired into studies yet; `qrobust verify` takes them
                    log.warning("verify skips %s: studies do not verify imported programs yet; "
                                "run `qrobust verify --ckpt` on the checkpoint", model.label)
                    continue
                if not integer_recipe(recipe):
                    continue
                for v in study.verify:
                    for eps in v.eps:
                        config = {"protocol": PROTOCOL, "data": data, "model": ident,
                                  "recipe": recipe, "quant": quant,
                                  "verify": v.model_dump(mode="json", exclude={"eps", "workers"}),
                                  "eps": eps, "seed": seed}
                        cells.append(VerifyCell(model, recipe, v, eps, seed, config,
                                                cell_key(config)))
    return cells


def evaluate_group(bench: Workbench, cells: list[VerifyCell],
                   progress: bool | None = None) -> list[tuple[VerifyCell, dict]]:
    """Metrics of cells of one group (same model, recipe, seed and verify config)."""
    from qrobust.integer.base import pixel_codes
    from qrobust.verify.run import integer_program, verify_points

    first, v = cells[0], cells[0].verify
    twin = bench.twin(first.model, first.recipe, first.seed).eval()
    x, y = bench.test_points()
    codes = pixel_codes(x[:v.limit])
    program = integer_program(twin, tuple(codes.shape[1:]))
    log.info("verify %s %s (seed %d) at eps %s", first.model.label, first.recipe, first.seed,
             [c.eps for c in cells])
    run = verify_points(program, codes, y[:v.limit], [c.eps for c in cells], v.timeout,
                        v.workers, v.ties, progress=progress)
    extra = {"input_dim": int(codes[0].numel()),
             "float_weights_sha256": _float_weights(bench, first)}
    return [(c, {**run.summaries[c.eps], **extra,
                 "seconds": round(sum(r["seconds"] for r in run.records if r["eps"] == c.eps),
                                  4)}) for c in cells]


def _float_weights(bench: Workbench, cell: VerifyCell) -> str | None:
    """sha256 of the float checkpoint behind the twin (what smoothing rows are keyed by)."""
    from qrobust.checkpoint import weights_path
    from qrobust.eval.store import file_sha256

    if cell.model.finetune is not None or bench.study.quant.mode == "qat":
        return None  # the twin is trained itself, not quantized from a float checkpoint
    return file_sha256(weights_path(bench.checkpoint(cell.model, cell.seed)))


def run_verify_cells(study: StudyConfig, bench: Workbench, store,
                     progress: bool | None = None) -> tuple[int, int]:
    """Compute the verify cells not yet in ``store`` (whose writer lock the caller holds);
    (cells planned, cells computed)."""
    cells = verify_plan(study)
    store.set_meta("verify_plan", [c.key for c in cells])  # the report shows these cells only
    groups: dict[tuple, list[VerifyCell]] = {}
    for c in cells:
        if not store.has(c.key):
            groups.setdefault(c.group, []).append(c)
    computed = 0
    for members in groups.values():
        for cell, metrics in evaluate_group(bench, members, progress):
            computed += bool(store.put(cell.key, TABLE, cell.config, metrics, [], seed=cell.seed))
    return len(cells), computed
