"""Certification as units of work: Ray gives the certificates of one process, resumes per image,
and a `kill -9` of a Ray run leaves no Ray process behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from qrobust.eval.certification import CertifyJob, certify_images
from qrobust.eval.ray_reaper import descendants, is_ray, processes
from qrobust.eval.store import ResultStore

pytestmark = pytest.mark.slow


def certificates(out) -> dict[int, dict]:
    """index -> certificate metrics without the timing."""
    with ResultStore(out / "results.sqlite") as store:
        rows = store.rows("certify")
    return {r["config"]["index"]: {k: v for k, v in r["metrics"].items() if k != "seconds"}
            for r in rows}


@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer-onnx"])
def test_ray_certificates_equal_one_process_and_resume_per_image(digits_ckpt, tmp_path,
                                                                 integer):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    job = CertifyJob(str(digits_ckpt), sigma=0.25, n0=10, n=200, alpha=0.01, integer=integer,
                     batch_size=100, threads=1)
    local = certify_images(job, tmp_path / "local", limit=6, progress=False)
    first = certify_images(job, tmp_path / "ray", limit=4, executor="ray", progress=False,
                           num_cpus=2)
    assert not ray.is_initialized()
    assert first.computed == 4 and first.timings["ray_init_s"] > 0
    # a larger run on the same store computes only the two new images
    second = certify_images(job, tmp_path / "ray", limit=6, executor="ray", progress=False,
                            num_cpus=2)
    assert (second.skipped, second.computed) == (4, 2)
    assert certificates(tmp_path / "ray") == certificates(tmp_path / "local")
    assert second.summary["certified_accuracy"] == local.summary["certified_accuracy"]
    assert len(set(certificates(tmp_path / "local"))) == 6


def _stored(path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _ray_processes_under(pid: int, seen: set[int]) -> set[int]:
    table = processes()
    return {p for p in descendants({pid, *seen}, table, set()) if is_ray(p)}


def test_kill_9_of_a_ray_certification_leaves_no_ray_process(digits_ckpt, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    out = tmp_path / "cert"
    cmd = [sys.executable, "-c", "from qrobust.cli import run; run()", "-q", "certify",
           "--ckpt", str(digits_ckpt), "--n0", "10", "--n", "2000", "--limit", "60",
           "--out", str(out), "--executor", "ray", "--workers", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: set[int] = set()
    deadline = time.monotonic() + 120
    while _stored(out / "results.sqlite") < 1 and proc.poll() is None:
        seen |= _ray_processes_under(proc.pid, seen)
        assert time.monotonic() < deadline, "no certificate within 120 s"
        time.sleep(0.05)
    seen |= _ray_processes_under(proc.pid, seen)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-500:]}")
    assert len(seen) >= 3  # gcs, raylet, agents, the worker: what had to be stopped
    table = processes()
    start = {p: table[p][1] for p in seen if p in table}  # pid -> start time
    deadline = time.monotonic() + 20  # the watchdog's grace period is 3 s
    while time.monotonic() < deadline:
        now = processes()
        alive = {p for p, t in start.items() if p in now and now[p][1] == t}
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, f"Ray processes outlived the run: {sorted(alive)}"
    # what was stored survives and a resumed run completes it
    assert 1 <= _stored(out / "results.sqlite") < 60


def test_the_documented_ray_cluster_config_is_valid_for_ray_up():
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from pathlib import Path

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(__file__).parents[2] / "docs" / "examples" / "ray-cluster.yaml"
    config = prepare_config(yaml.safe_load(path.read_text()))  # what `ray up` does first
    validate_config(config)
    assert config["provider"]["type"] == "local" and config["max_workers"] == 2


def test_a_one_cell_certification_study_gives_what_qrobust_certify_gives(digits_ckpt, tmp_path,
                                                                         capsys):
    import yaml

    from qrobust.cli import main

    options = ["--sigma", "0.25", "--n0", "10", "--n", "120", "--alpha", "0.01", "--limit", "5",
               "--batch-size", "100"]
    assert main(["-q", "certify", "--ckpt", str(digits_ckpt), *options,
                 "--out", str(tmp_path / "cli")]) == 0
    study = {"name": "cert", "data": {"dataset": "digits"},
             "models": [{"name": "cnn", "checkpoint": str(digits_ckpt)}],
             "certify": [{"sigma": 0.25, "n0": 10, "n": 120, "alpha": 0.01, "limit": 5,
                          "batch_size": 100}]}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    capsys.readouterr()
    assert main(["-q", "run", str(config), "--out", str(tmp_path / "study")]) == 0
    assert "certification: 5 images, 0 already stored, 5 computed" in capsys.readouterr().out
    assert certificates(tmp_path / "study") == certificates(tmp_path / "cli")
    with ResultStore(tmp_path / "cli" / "results.sqlite") as a, \
            ResultStore(tmp_path / "study" / "results.sqlite") as b:
        assert a.keys("certify") == b.keys("certify")  # the same cells, the same keys
    # and a rerun of the study finds them all stored
    assert main(["-q", "run", str(config), "--out", str(tmp_path / "study")]) == 0
    assert "certification: 5 images, 5 already stored, 0 computed" in capsys.readouterr().out
    # the report shows the cell with the command's summary numbers and its curve
    import json

    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert main(["-q", "report", str(tmp_path / "study")]) == 0
    md = (tmp_path / "study" / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if "float, sigma 0.25, n 120" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "5" and float(cells[2]) == pytest.approx(
        summary["certified_accuracy"]["0"], abs=1e-3)
    assert (tmp_path / "study" / "report" / "figures" / "certified-accuracy.png").is_file()
