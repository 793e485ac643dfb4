"""Certify test images of a checkpoint with randomized smoothing: one image is one unit of work
and one row of ``<out>/results.sqlite`` (table ``certify``), locally or as Ray tasks.

A :class:`Certifier` (built once per process: the driver, or each Ray worker) loads the
checkpoint and its test split and builds the noisy classifier; it then certifies images by
index. Each image's noise comes from its own generator seeded with (seed, index), so an image
gets the same certificate in whichever process and beside whichever images it runs, and an
interrupted run resumes per image. Rows are keyed by the resolved config (weights hash, data,
index, sigma, n0, n, alpha, noise, seed, ...); only the driver writes to the store.

* ``local``: images in order in this process, a progress bar.
* ``ray``: one task per image, ``num_cpus`` local workers or the cluster at ``address``
  (:mod:`qrobust.eval.ray_session`); each worker runs one thread. On a real cluster the
  checkpoint and data paths must be readable at the same paths on every node.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from qrobust.errors import ConfigError
from qrobust.progress import bar as progress_bar
from qrobust.registry import Registry

TABLE = "certify"
RESULTS = "results.sqlite"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class CertifyJob:
    """Everything that determines the certificates of a run (see ``qrobust certify --help``).

    ``threads``: intra-op threads of torch and the integer backend in each worker (None: the
    library defaults; Ray workers use 1)."""

    ckpt: str
    sigma: float = 0.25
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    integer: bool = False
    noise: str = "gaussian"
    recipe: str = "w8a8"
    reduce_range: str = "auto"
    backend: str = "onnx"
    integer_input: str = "wide"
    batch_size: int = 1000
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    verify: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        from qrobust.certify.stats import clopper_pearson_lower

        if not self.sigma > 0 or self.n0 < 1 or self.n < 1 or self.batch_size < 1:
            raise ConfigError("need --sigma > 0 and --n0, --n, --batch-size >= 1")
        clopper_pearson_lower(0, 1, self.alpha)  # validates alpha with a user-facing message
        if self.device != "cpu" and self.integer:
            raise ConfigError("--device applies to float smoothing; integer-only smoothing runs "
                              "on the CPU (drop --device or --integer)")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"--device {self.device!r} is not a torch device; use cpu or "
                              "cuda") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: no CUDA device is available; use "
                              "--device cpu")

    def with_threads(self, threads: int | None) -> CertifyJob:
        return CertifyJob(**{**asdict(self), "threads": threads})


def select_indices(n_test: int, limit: int | None, first: bool = False) -> np.ndarray:
    """The test points ``qrobust.data.take(split, limit)`` selects (seeded permutation, sorted),
    or with ``first`` the first ``limit`` in order (as published tables often use)."""
    if limit is None or limit >= n_test:
        return np.arange(n_test)
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if first:
        return np.arange(limit)
    return np.sort(np.random.default_rng(0).permutation(n_test)[:limit])


class Certifier:
    """One process's view of a job: the model, its test split and the smoothed classifier."""

    def __init__(self, job: CertifyJob) -> None:
        from qrobust.certify import Smoothed
        from qrobust.certify.build import holds_for, noisy_classifier
        from qrobust.checkpoint import load_checkpoint, weights_path
        from qrobust.data import load_dataset, take
        from qrobust.eval.store import file_sha256
        from qrobust.integer import imports  # noqa: F401  (registers the "imported" kind)

        if job.threads is not None:
            torch.set_num_threads(job.threads)
        self.job = job
        model, meta = load_checkpoint(job.ckpt)
        model = model.to(job.device)
        ds = load_dataset(meta["dataset"], job.data_dir, verify=job.verify)
        calib = take(ds.train, 512, seed=1).tensors()[0] if job.integer else None
        imported = meta.get("kind") == "imported"
        quantized = meta.get("kind") == "quantized" or imported  # the twin is the model
        threads = ({"threads": job.threads}
                   if job.threads is not None and job.backend != "reference" else {})
        noisy = noisy_classifier(model, sigma=job.sigma, integer=job.integer, noise=job.noise,
                                 quantized=quantized, recipe=job.recipe,
                                 reduce_range=job.reduce_range, calib=calib,
                                 backend=job.backend, integer_input=job.integer_input,
                                 input_shape=ds.input_shape, imported=imported, **threads)
        self.smoothed = Smoothed(noisy, ds.num_classes, batch_size=job.batch_size)
        self.holds_for = holds_for(noisy)
        self.x, self.y = ds.test.tensors()
        context = self.holds_for
        self.base_config = {
            "weights_sha256": file_sha256(weights_path(job.ckpt)), "dataset": ds.name,
            "split": "test", "sigma": job.sigma, "n0": job.n0, "n": job.n, "alpha": job.alpha,
            "integer": job.integer, "noise": context["noise"],
            # the resolved recipe (reduce-range may depend on the CPU), not the option
            "recipe": context.get("recipe") if job.integer and not quantized else None,
            "backend": ("reference" if imported else job.backend) if job.integer else None,
            "seed": job.seed,
            "device": torch.device(job.device).type,
            **({"integer_input": job.integer_input} if job.integer else {})}

    def config(self, index: int) -> dict:
        return {**self.base_config, "index": int(index)}

    def certify(self, index: int) -> dict:
        """The certificate of test image ``index`` as a row's metrics."""
        from qrobust.certify.build import image_generator

        job, start = self.job, time.perf_counter()
        x = self.x[index:index + 1].to(job.device)
        cert = self.smoothed.certify(x, job.n0, job.n, job.alpha,
                                     image_generator(job.seed, index, job.device))[0]
        label = int(self.y[index])
        return {**cert.to_dict(), "true_label": label, "correct": cert.label == label,
                "seconds": time.perf_counter() - start}


def summarize(rows: list[dict], radii=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """Certified accuracy at ``radii``, abstention rate, mean seconds per image."""
    if not rows:
        return {"n_images": 0}
    n = len(rows)
    m = [r["metrics"] for r in rows]
    acc = {f"{r:g}": sum(x["correct"] and x["radius"] >= r for x in m) / n for r in radii}
    return {"n_images": n, "certified_accuracy": acc,
            "abstain_rate": sum(x["label"] is None for x in m) / n,
            "mean_radius_correct": float(np.mean([x["radius"] if x["correct"] else 0.0
                                                  for x in m])),
            "seconds_per_image": float(np.mean([x["seconds"] for x in m]))}


@dataclass
class CertifyRun:
    rows: list[dict]
    summary: dict
    skipped: int  # already in the store
    computed: int
    seconds: float
    timings: dict = field(default_factory=dict)  # executor's own (Ray start-up, ...)


Sink = Callable[[int, dict], None]
EXECUTORS: Registry[Callable[..., dict]] = Registry("certification executor")


@EXECUTORS.register("local")
def run_local(certifier: Certifier, indices: list[int], sink: Sink,
              progress: bool | None = None, **_: object) -> dict:
    for index in progress_bar(indices, desc="certify", unit="image", progress=progress,
                              leave=True):
        sink(index, certifier.certify(index))
    return {}


_WORKER: dict[str, Certifier] = {}


def _remote_certify(job: dict, index: int) -> tuple[int, dict]:
    """Ray task body: this worker's Certifier (built on its first task), one image."""
    from qrobust.hardware import keep_large_allocations

    key = json.dumps(job, sort_keys=True)
    if key not in _WORKER:
        keep_large_allocations()  # a worker is a qrobust process, like the command line
        _WORKER.clear()
        _WORKER[key] = Certifier(CertifyJob(**job))
    return index, _WORKER[key].certify(index)


@EXECUTORS.register("ray")
def run_ray(certifier: Certifier, indices: list[int], sink: Sink, progress: bool | None = None,
            address: str | None = None, num_cpus: int | None = None, **_: object) -> dict:
    from qrobust.eval.ray_session import as_completed, ray_session

    job = asdict(certifier.job.with_threads(1))  # one thread per worker; Ray runs many
    # workers need not share the driver's working directory
    job["ckpt"] = str(Path(job["ckpt"]).resolve())
    if job["data_dir"] is not None:
        job["data_dir"] = str(Path(job["data_dir"]).resolve())
    with ray_session(address, num_cpus) as session:
        ray = session["ray"]
        task = ray.remote(num_cpus=1)(_remote_certify)
        job_ref = ray.put(job)
        start = time.perf_counter()
        refs = [task.remote(job_ref, i) for i in indices]
        first = None
        for index, metrics in as_completed(ray, refs, progress, "certify (ray)", "image"):
            first = first if first is not None else time.perf_counter() - start
            sink(index, metrics)
    return {"ray_init_s": session["startup_s"], "first_result_s": first}


def certify_images(job: CertifyJob, out: str | Path, limit: int | None = None,
                   executor: str = "local", progress: bool | None = None,
                   certifier: Certifier | None = None, store=None, first: bool = False,
                   **options: object) -> CertifyRun:
    """Certify the ``limit`` test images of ``job`` (seeded choice, or the first ``limit``
    with ``first``; all if None) not yet in
    ``<out>/results.sqlite``, then write ``<out>/summary.json`` over all of them.

    ``store``: an open :class:`~qrobust.eval.store.ResultStore` whose writer lock the caller
    holds (a study's run): rows go there and no summary file is written."""
    from qrobust.checkpoint import atomic_write_bytes
    from qrobust.eval.store import ResultStore, cell_key, writer_lock

    run = EXECUTORS.get(executor)
    certifier = certifier or Certifier(job)
    out = Path(out)
    start = time.perf_counter()
    indices = select_indices(len(certifier.y), limit, first).tolist()
    keys = {i: cell_key(certifier.config(i)) for i in indices}
    with contextlib.ExitStack() as stack:
        if store is None:
            stack.enter_context(writer_lock(out))
            store = stack.enter_context(ResultStore(out / RESULTS))
            write_summary = True
        else:
            write_summary = False
        pending = [i for i in indices if not store.has(keys[i])]

        def sink(index: int, metrics: dict) -> None:
            store.put(keys[index], TABLE, certifier.config(index), metrics, seed=job.seed)

        timings = run(certifier, pending, sink, progress=progress, **options) if pending else {}
        rows = [store.get(keys[i]) for i in indices]
        summary = {"config": certifier.base_config, "ckpt": str(job.ckpt),
                   "holds_for": certifier.holds_for, **summarize(rows)}
        if write_summary:
            text = json.dumps(summary, indent=2, sort_keys=True)
            atomic_write_bytes(out / SUMMARY, lambda tmp: Path(tmp).write_text(text))
    return CertifyRun(rows, summary, len(indices) - len(pending), len(pending),
                      time.perf_counter() - start, timings)
