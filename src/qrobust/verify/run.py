"""Many verification queries of one integer program: eps parsing, the program of a quantized
twin, a process pool that runs each query under a hard time limit, and the summary per eps.

:func:`verify_points` (test points x radii -> records and per-eps summaries) is the unit of
work of ``qrobust verify`` and of a study's verify cells (:mod:`qrobust.eval.verification`).
Each query runs in a worker process (``spawn``: a fresh interpreter, so no OpenMP state is
inherited from a forked parent). :func:`qrobust.verify.verify` stops itself at ``timeout``
(its clock is checked between batches of boxes); the pool is the second line of defense: a
query still running ``timeout + grace(timeout)`` seconds after it was handed to a started
worker has its worker killed and is recorded as ``timeout``.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from qrobust.errors import ConfigError
from qrobust.integer.program import Program
from qrobust.progress import bar as progress_bar

PIXEL_LEVELS = 255
EPS_HELP = ("an integer is pixel codes 0..255; a fraction of the input range in [0, 1) (0.1, "
            "8/255) is converted to codes as round(eps * 255) with halves rounded up "
            "(0.1 -> 26, 8/255 -> 8)")
_EPS_HINT = "give pixel codes 0..255 or a fraction of the range in [0, 1) such as 0.1 or 8/255"


def eps_codes(value: int | float | str) -> int:
    """An L-infinity radius in pixel codes: an integer (``2``, ``"2"``) is codes 0..255; a
    decimal or fraction (``0.1``, ``"8/255"``) is a fraction of the input range in [0, 1),
    converted exactly (rational arithmetic, no float rounding) to ``floor(eps * 255 + 1/2)``,
    so 0.1 -> 26 (25.5 rounded up: eps = 0.1 counts as 26 codes) and 8/255 -> 8.
    A ConfigError with a one-line message for anything else."""
    if isinstance(value, bool):
        raise ConfigError(f"eps must be a number, got {value!r}; {_EPS_HINT}")
    text = str(value).strip()
    try:
        exact = Fraction(text.replace(" ", ""))  # Fraction("0.1") is exactly 1/10
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"eps '{text}' is not a number; {_EPS_HINT}") from None
    is_codes = isinstance(value, int) or text.lstrip("+-").isdigit()
    if exact < 0:
        raise ConfigError(f"eps {text} is negative; {_EPS_HINT}")
    if is_codes:
        if exact > PIXEL_LEVELS:
            raise ConfigError(f"eps {text} is beyond the input range; {_EPS_HINT}")
        return int(exact)
    if exact >= 1:
        raise ConfigError(f"eps {text} is beyond the input range; {_EPS_HINT}")
    return math.floor(exact * PIXEL_LEVELS + Fraction(1, 2))


def integer_program(twin: nn.Module, input_shape: tuple[int, ...]) -> Program:
    """The exact integer program of a quantized twin (or an imported file's twin: its own
    program) for images of ``input_shape`` (C, H, W); a ConfigError that says why when there
    is none the verifier takes (float activations, an unsupported layer, an op the bounds
    cannot follow: :func:`~qrobust.verify.search.check_supported`), raised before any query
    runs."""
    from qrobust.integer import to_integer
    from qrobust.integer.imports import ProgramTwin
    from qrobust.verify.search import check_supported

    if isinstance(twin, ProgramTwin):
        program = twin.program
        if tuple(program.input_shape) != tuple(input_shape):
            raise ConfigError(f"the imported program takes images of shape "
                              f"{tuple(program.input_shape)}, not {tuple(input_shape)}")
    else:
        try:
            program = to_integer(twin, "reference").program(tuple(input_shape))
        except ConfigError as err:
            raise ConfigError(f"verify needs an integer program (activations quantized to <= 8 "
                              f"bits), and this model does not lower to one: {err}") from None
    check_supported(program)
    return program


# ---- the worker side ------------------------------------------------------------------------
_PROGRAM: list[Program] = []  # the worker's program, set once by the pool's initializer


def _init_worker(program: Program) -> None:
    from qrobust.verify.search import predict, verify

    torch.set_num_threads(1)  # one core per query; --workers decides the parallelism
    _PROGRAM[:] = [program]
    # a first query in a fresh process pays for lazy imports and first kernel calls (over a
    # second on a busy machine): pay it here, not out of the first real query's time limit
    image = torch.zeros(program.input_shape, dtype=torch.long)
    verify(program, image, int(predict(program, image[None])[0]), 0, 10.0)


def _ready() -> None:
    """A no-op task: returns once a worker has started (and run its initializer)."""


def _run_query(image: torch.Tensor, label: int, eps: int, timeout: float, ties: str) -> dict:
    from qrobust.verify.search import verify

    v = verify(_PROGRAM[0], image, label, eps, timeout, ties=ties)  # type: ignore[arg-type]
    cex = v.counterexample
    return {"verdict": v.status, "method": v.method, "seconds": v.seconds, "nodes": v.nodes,
            "counterexample": None if cex is None else cex.tolist()}


# ---- the driver side ------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    """One query: test point ``id`` (its index), pixel codes (C, H, W), label, eps in codes."""

    id: int
    image: torch.Tensor
    label: int
    eps: int


def grace(timeout: float) -> float:
    """Extra seconds before a worker is killed: the verifier checks its clock between batches
    of boxes, which take longer on a busy machine."""
    return 10.0 + 0.5 * timeout


def run_queries(program: Program, queries: list[Query], timeout: float, workers: int = 1,
                ties: str = "first", progress: bool | None = None,
                sink: Callable[[Query, dict], None] | None = None) -> list[dict]:
    """Verify every query in a pool of ``workers`` processes; one record per query, in the
    order given: ``{id, eps, verdict, seconds, nodes, counterexample}`` (``counterexample``:
    nested lists of pixel codes (C, H, W) for ``vulnerable``, else None). ``sink`` sees each
    record as it arrives."""
    if not timeout > 0:
        raise ConfigError(f"the time limit must be a positive number of seconds, got {timeout}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    results: dict[int, dict] = {}
    todo = list(range(len(queries)))[::-1]  # a stack: pop() hands out queries in order
    limit = timeout + grace(timeout)
    context = multiprocessing.get_context("spawn")
    with progress_bar(total=len(queries), desc="verify", unit="query", progress=progress,
                      leave=True) as bar:

        def finish(i: int, record: dict) -> None:
            results[i] = {"id": queries[i].id, "eps": queries[i].eps, **record}
            if sink is not None:
                sink(queries[i], results[i])
            bar.update(1)

        while todo:  # one pool per round; a round ends early only when a worker is killed
            pool = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                          initargs=(program,))
            running: dict[cf.Future, tuple[int, float]] = {}
            killed = False
            try:
                # start every worker first: a fresh interpreter's start-up is not query time
                cf.wait([pool.submit(_ready) for _ in range(workers)])
                while (todo or running) and not killed:
                    while todo and len(running) < workers:  # in flight = executing: no queue
                        i = todo.pop()
                        q = queries[i]
                        future = pool.submit(_run_query, q.image, q.label, q.eps, timeout, ties)
                        running[future] = (i, time.monotonic())
                    deadline = min(t for _, t in running.values()) + limit
                    done, _ = cf.wait(running, timeout=max(0.0, deadline - time.monotonic()),
                                      return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        finish(running.pop(future)[0], future.result())
                    now = time.monotonic()
                    for future, (i, started) in list(running.items()):
                        if now - started >= limit:  # overran: its verdict is timeout
                            running.pop(future)
                            finish(i, {"verdict": "timeout", "method": None, "seconds": now - started,
                                       "nodes": 0, "counterexample": None})
                            killed = True
            finally:
                if killed:  # a pool cannot stop one task: end its workers, requeue the others
                    for process in list((getattr(pool, "_processes", None) or {}).values()):
                        process.kill()
                    todo.extend(i for i, _ in running.values())
                pool.shutdown(wait=True, cancel_futures=True)
    return [results[i] for i in range(len(queries))]


@dataclass(frozen=True)
class PointsRun:
    """What :func:`verify_points` found: one record per query, the summary per eps, and the
    points the program misclassifies (asked no query)."""

    records: list[dict]
    summaries: dict[int, dict]
    misclassified: list[int]


def verify_points(program: Program, codes: torch.Tensor, labels: torch.Tensor,
                  radii: list[int], timeout: float, workers: int = 1, ties: str = "first",
                  progress: bool | None = None) -> PointsRun:
    """Verify test points (pixel codes (N, C, H, W), labels (N,)) at every eps in ``radii``
    (codes): the points the program classifies correctly are queried, the others count as
    not robust."""
    from qrobust.verify.search import predict

    pred = predict(program, codes)
    correct = [i for i in range(len(labels)) if int(pred[i]) == int(labels[i])]
    queries = [Query(i, codes[i], int(labels[i]), e) for e in radii for i in correct]
    records = run_queries(program, queries, timeout, workers, ties, progress=progress)
    summaries = {e: summarize([r for r in records if r["eps"] == e], len(labels), len(correct))
                 for e in radii}
    return PointsRun(records, summaries, sorted(set(range(len(labels))) - set(correct)))


def summarize(records: list[dict], n: int, correct: int) -> dict:
    """Per-eps numbers over ``n`` test points of which ``correct`` are classified correctly
    (queries are asked of those only): verified accuracy = robust / n, vulnerable and timeout
    counts, clean accuracy, median and max seconds per query (None without queries)."""
    counts = {s: sum(r["verdict"] == s for r in records) for s in ("robust", "vulnerable",
                                                                    "timeout")}
    seconds = [r["seconds"] for r in records]
    return {"n": n, "queries": len(records), "clean_acc": correct / n if n else None,
            "verified_acc": counts["robust"] / n if n else None, **counts,
            "median_seconds": statistics.median(seconds) if seconds else None,
            "max_seconds": max(seconds) if seconds else None}
