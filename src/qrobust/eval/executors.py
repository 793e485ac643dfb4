"""Run the pending cells of a study and write each result to the store as it arrives.

* ``local`` (default): one process, cells in plan order (adjacent cells share models and
  clean predictions), a tqdm progress bar.
* ``ray``: one Ray task per cell (``pip install qrobust[ray]``); ``address`` joins an
  existing cluster, else a local Ray instance is started that does not outlive this process
  (:mod:`qrobust.eval.ray_session`). Float / QAT models are trained
  on the driver before the fan-out and saved under ``<out>/models``, so workers only load
  them; each worker keeps its own :class:`~qrobust.eval.grid.Workbench`. Cell seeds come
  from the cell keys, so the numbers equal the local executor's.

Only the driver writes to the store (one transaction per row), so a killed run loses at
most the cells in flight and a rerun computes exactly the missing ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qrobust.config import StudyConfig
from qrobust.eval.grid import TABLE, Cell, Workbench, evaluate_cell, plan
from qrobust.eval.store import ResultStore, writer_lock
from qrobust.progress import bar as progress_bar
from qrobust.registry import Registry

log = logging.getLogger(__name__)

RESULTS = "results.sqlite"

Sink = Callable[[Cell, dict, list[str]], None]


@dataclass(frozen=True)
class RunSummary:
    total: int
    skipped: int  # already in the store
    computed: int
    seconds: float
    store: Path
    images: int = 0  # certification: images planned over all certify cells
    images_computed: int = 0
    verify_cells: int = 0  # verify cells planned (qrobust.eval.verification)
    verify_computed: int = 0


def certification_jobs(study: StudyConfig, bench: Workbench) -> list:
    """One :class:`~qrobust.eval.certification.CertifyJob` per (model, seed, certify cell), on
    the model's float checkpoint: the job ``qrobust certify`` with the same options runs."""
    from qrobust.eval.certification import CertifyJob

    jobs = []
    for model in study.models:
        for seed in study.seeds:
            ckpt = str(bench.checkpoint(model, seed))
            for c in study.certify:
                options = c.model_dump(exclude={"limit", "first"})
                jobs.append((CertifyJob(ckpt=ckpt, seed=seed, data_dir=study.data.data_dir,
                                        **options), c.limit, c.first))
    return jobs


EXECUTORS: Registry[Callable[..., None]] = Registry("executor")


@EXECUTORS.register("local")
def run_local(study: StudyConfig, out: Path, cells: list[Cell], sink: Sink,
              progress: bool | None = None, **_: object) -> None:
    bench = Workbench(study, out, progress=progress)
    bench.prepare(cells)
    for cell in progress_bar(cells, desc=f"study {study.name}", unit="cell", progress=progress,
                             leave=True):
        metrics, warnings = evaluate_cell(bench, cell)
        sink(cell, metrics, warnings)


_WORKER_BENCH: dict[str, Workbench] = {}


def _remote_cell(study_json: dict, out: str, index: int) -> tuple[int, dict, list[str]]:
    """Ray task body: rebuild the study, reuse this worker's Workbench, evaluate one cell."""
    import torch

    from qrobust.hardware import keep_large_allocations

    torch.set_num_threads(1)
    study = StudyConfig.model_validate(study_json)
    cell = plan(study)[index]
    key = f"{out}:{study.model_dump_json()}"
    if key not in _WORKER_BENCH:
        keep_large_allocations()  # a worker is a qrobust process, like the command line
        _WORKER_BENCH.clear()
        _WORKER_BENCH[key] = Workbench(study, out)
    metrics, warnings = evaluate_cell(_WORKER_BENCH[key], cell)
    return index, metrics, warnings


@EXECUTORS.register("ray")
def run_ray(study: StudyConfig, out: Path, cells: list[Cell], sink: Sink, progress: bool | None = None,
            address: str | None = None, num_cpus: int | None = None, **_: object) -> None:
    from qrobust.eval.ray_session import as_completed, ray_session

    Workbench(study, out, progress=progress).prepare(cells)  # train once, on the driver
    with ray_session(address, num_cpus) as session:
        ray = session["ray"]
        task = ray.remote(num_cpus=1)(_remote_cell)
        index = {c.key: i for i, c in enumerate(plan(study))}
        study_json = study.model_dump(mode="json")
        refs = [task.remote(study_json, str(out), index[c.key]) for c in cells]
        by_index = {index[c.key]: c for c in cells}
        for i, metrics, warnings in as_completed(ray, refs, progress,
                                                 f"study {study.name} (ray)", "cell"):
            sink(by_index[i], metrics, warnings)


def run_study(study: StudyConfig, out: str | Path, executor: str = "local",
              progress: bool | None = None, **options: object) -> RunSummary:
    """Evaluate every cell of ``study`` not yet in ``<out>/results.sqlite``."""
    run = EXECUTORS.get(executor)
    out = Path(out)
    start = time.perf_counter()
    cells = plan(study)
    with writer_lock(out), ResultStore(out / RESULTS) as store:
        store.set_meta("study", study.model_dump(mode="json"))
        store.set_meta("plan", [c.key for c in cells])  # the report shows these cells only
        pending = [c for c in cells if not store.has(c.key)]
        log.info("%d cells, %d already stored, %d to run", len(cells), len(cells) - len(pending),
                 len(pending))
        written = []

        def sink(cell: Cell, metrics: dict, warnings: list[str]) -> None:
            if store.put(cell.key, TABLE, cell.config, metrics, warnings, seed=cell.seed):
                written.append(cell.key)

        if pending:
            run(study, out, pending, sink, progress=progress, **options)
        images = images_computed = 0
        if study.certify:
            from qrobust.eval.certification import certify_images

            bench = Workbench(study, out, progress=progress)
            for job, limit, first in certification_jobs(study, bench):
                done = certify_images(job, out, limit, executor, progress=progress,
                                      store=store, first=first, **options)
                images, images_computed = images + len(done.rows), images_computed + done.computed
        verify_cells = verify_computed = 0
        if study.verify:  # in this process: each cell's queries run in their own process pool
            from qrobust.eval.verification import run_verify_cells

            bench = Workbench(study, out, progress=progress)
            verify_cells, verify_computed = run_verify_cells(study, bench, store, progress)
    return RunSummary(len(cells), len(cells) - len(pending), len(written),
                      time.perf_counter() - start, out / RESULTS, images, images_computed,
                      verify_cells, verify_computed)
