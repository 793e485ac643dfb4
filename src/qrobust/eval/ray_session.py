"""The one way qrobust connects to Ray: join a cluster at ``address``, or start a local instance
that does not outlive this process.

``address``: what ``ray.init`` takes: ``"auto"`` (the cluster this node belongs to, after
``ray start --head`` or ``ray up``), ``"HOST:6379"`` (a head's GCS), or ``"ray://HOST:10001"``
(Ray Client). Without one, a local instance is started with ``num_cpus`` workers (default: all
cores) and no dashboard, and a watchdog (:mod:`qrobust.eval.ray_reaper`) stops every Ray process
it started when this process ends, even by ``kill -9``. Joining an already initialized Ray
(a caller's own ``ray.init``) leaves it running.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qrobust.errors import ConfigError
from qrobust.progress import bar as progress_bar

log = logging.getLogger(__name__)

REAPER = Path(__file__).with_name("ray_reaper.py")


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'qrobust[ray]'") from None
    return ray


def start_reaper() -> subprocess.Popen | None:
    """The watchdog process (Linux), or None where /proc is missing."""
    if not Path("/proc/self/stat").exists():
        log.warning("no /proc: Ray processes may outlive a killed run on this platform")
        return None
    from qrobust.eval.ray_reaper import processes

    pid = os.getpid()
    children = [p for p, (ppid, _) in processes().items() if ppid == pid]
    return subprocess.Popen([sys.executable, "-S", str(REAPER), str(pid), *map(str, children)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def as_completed(ray, refs: list, progress: bool | None, desc: str,
                 unit: str) -> Iterator:
    """The results of Ray object refs in the order they finish, with a progress bar."""
    pending = list(refs)
    with progress_bar(total=len(pending), desc=desc, unit=unit, progress=progress,
                      leave=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
            bar.update(1)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict]:
    """Yield ``{"ray": module, "startup_s": seconds ray.init took}`` inside a Ray session."""
    ray = import_ray()
    if ray.is_initialized():
        yield {"ray": ray, "startup_s": 0.0}
        return
    reaper = None if address else start_reaper()
    start = time.perf_counter()
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        yield {"ray": ray, "startup_s": time.perf_counter() - start}
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.stdin.close()  # the watchdog stops any straggler, then exits
            try:
                reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("Ray watchdog still running after 10 s (pid %d)", reaper.pid)
