"""Executors: `qrobust run` survives kill -9 and resumes to the same table; Ray == local."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from qrobust.config import parse_study
from qrobust.eval.executors import run_study
from qrobust.eval.store import ResultStore

from .test_grid import table


def _stored(path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


@pytest.mark.slow
def test_kill_9_during_qrobust_run_then_resume_gives_the_same_table(tiny_study, tmp_path):
    # without the black-box check: its square attack on the w4a4 integer model (1,000
    # queries per cell) was 60% of this test's three study runs and tests nothing of resuming
    spec = tiny_study(attacks=[{"name": "pgd", "eps": ["2/255", "4/255", "8/255", "16/255"],
                                "params": {"steps": 10}, "checks": ["gradients", "randomness"]}])
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    store = out / "results.sqlite"
    cmd = [sys.executable, "-c", "from qrobust.cli import run; run()", "run", str(config),
           "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _stored(store) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run finished before it could be killed: {proc.stderr.read()[-500:]}")
    before = _stored(store)
    assert 2 <= before < 8

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert f"8 cells, {before} already stored, {8 - before} computed" in resumed.stdout
    with ResultStore(store) as s:
        assert len(s) == 8 and len({r["key"] for r in s.rows()}) == 8

    reference = run_study(parse_study(spec), tmp_path / "uninterrupted", progress=False)
    assert table(store) == table(reference.store)


@pytest.mark.slow
def test_ray_executor_matches_local(tiny_study, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    study = parse_study(tiny_study(attacks=[{"name": "fgsm", "eps": [0, "8/255"]}]))
    local = run_study(study, tmp_path / "local", progress=False)
    remote = run_study(study, tmp_path / "ray", executor="ray", progress=False, num_cpus=1)
    assert not ray.is_initialized()
    assert remote.computed == local.computed == 4
    assert table(remote.store) == table(local.store)
