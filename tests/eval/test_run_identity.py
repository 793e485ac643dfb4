"""What a stored result is keyed by, and one writer per output directory: a rerun never reuses
a cell computed with another batch size or other data, and two runs never race on one store."""

from __future__ import annotations

import numpy as np
import pytest

from qrobust.config import FinetuneConfig, parse_study
from qrobust.eval.certification import CertifyJob, certify_images
from qrobust.eval.executors import run_study
from qrobust.eval.grid import Workbench, plan
from qrobust.eval.store import StoreError, writer_lock


def test_batch_size_is_part_of_every_cell_key(tiny_study):
    small = plan(parse_study(tiny_study(batch_size=16)))
    large = plan(parse_study(tiny_study(batch_size=256)))
    assert len(small) == len(large)
    assert not {c.key for c in small} & {c.key for c in large}
    assert {c.config["batch_size"] for c in small} == {16}


def _write_npz(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8),
             y_train=rng.integers(0, 10, 20), x_test=rng.integers(0, 256, (10, 8, 8),
                                                                  dtype=np.uint8),
             y_test=rng.integers(0, 10, 10))


def test_an_npz_dataset_is_keyed_by_its_content_not_its_path(tiny_study, tmp_path):
    path = tmp_path / "mine.npz"
    spec = tiny_study(data={"dataset": str(path), "n_test": 10},
                      models=[{"name": "mlp", "arch": "mlp"}])
    _write_npz(path, 0)
    study = parse_study(spec)
    before = plan(study)
    model_dir = Workbench(study, tmp_path / "run")._model_dir(study.models[0], 0)
    assert plan(study) == before  # stable while the file is unchanged
    _write_npz(path, 1)  # other arrays at the same path
    after = plan(study)
    assert not {c.key for c in before} & {c.key for c in after}
    assert Workbench(study, tmp_path / "run")._model_dir(study.models[0], 0) != model_dir


def test_a_checkpoint_is_keyed_by_its_content_not_its_path(tiny_study, digits_ckpt, tmp_path):
    import shutil

    copy = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(digits_ckpt, copy)
    here = parse_study(tiny_study())
    there = parse_study(tiny_study(models=[{"name": "cnn", "checkpoint": str(copy)}]))
    assert [c.key for c in plan(here)] == [c.key for c in plan(there)]  # a clone, a copy
    dq = FinetuneConfig(method="dq")  # a fine-tune's weights are cached under the same name
    assert len({Workbench(s, tmp_path / "run")._model_dir(
        s.models[0].model_copy(update={"finetune": dq}), 0, "w4a4") for s in (here, there)}) == 1
    other = tmp_path / "other" / "ckpt"
    shutil.copytree(digits_ckpt, other)
    with open(other / "model.safetensors", "r+b") as f:  # one changed byte of the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    changed = parse_study(tiny_study(models=[{"name": "cnn", "checkpoint": str(other)}]))
    assert not {c.key for c in plan(here)} & {c.key for c in plan(changed)}


def test_a_second_run_on_a_directory_being_written_fails_and_writes_nothing(tiny_study,
                                                                            digits_ckpt,
                                                                            tmp_path):
    study = parse_study(tiny_study(attacks=[{"name": "fgsm", "eps": [0]}]))
    out = tmp_path / "run"
    with writer_lock(out):
        with pytest.raises(StoreError, match=r"being written by another qrobust run \(pid"):
            run_study(study, out, progress=False)
        job = CertifyJob(str(digits_ckpt), n0=10, n=50, alpha=0.01)
        with pytest.raises(StoreError, match="being written by another qrobust run"):
            certify_images(job, out, limit=1, progress=False)
        assert not (out / "results.sqlite").exists() and not (out / "models").exists()
    # the lock goes with its holder: now the run proceeds
    assert run_study(study, out, progress=False).computed == 2


@pytest.mark.parametrize("defense,params", [("mc-dropout", {"passes": 2, "rate": 0.3}),
                                            ("sq", {"bits": 3})])
def test_randomized_cells_neither_read_nor_move_the_global_rng(tiny_study, tmp_path, defense,
                                                               params):
    import torch

    from qrobust.eval.grid import evaluate_cell

    study = parse_study(tiny_study(recipes=["fp32"], defenses=[{"name": defense,
                                                                "params": params}],
                                   attacks=[{"name": "pgd", "eps": ["8/255"],
                                             "params": {"steps": 2}}]))
    (cell,) = plan(study)
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        metrics, _ = evaluate_cell(Workbench(study, tmp_path), cell)
        assert torch.equal(torch.get_rng_state(), state), "the cell drew from torch's global RNG"
        metrics.pop("seconds")
        results.append(metrics)
    assert results[0] == results[1]
    assert results[0]["estimator"].startswith("eot")


RELEVANT = {  # every edit that changes a cell's numbers must change its key
    "batch_size": lambda s: {**s, "batch_size": 7},
    "n_test": lambda s: {**s, "data": {**s["data"], "n_test": 40}},
    "sample_seed": lambda s: {**s, "data": {**s["data"], "sample_seed": 3}},
    "seed": lambda s: {**s, "seeds": [1]},
    "calibration": lambda s: {**s, "quant": {"calib": 64}},
    "attack params": lambda s: {**s, "attacks": [{"name": "fgsm", "eps": [0, "4/255"],
                                                  "params": {"loss": "dlr"}}]},
    "defense": lambda s: {**s, "defenses": [{"name": "bit-depth", "params": {"bits": 4}}]},
}
IRRELEVANT = {  # and an edit that does not must keep it
    "study name": lambda s: {**s, "name": "renamed"},
    "data_dir": lambda s: {**s, "data": {**s["data"], "data_dir": "/somewhere/else"}},
}


@pytest.mark.parametrize("edit", sorted(RELEVANT))
def test_editing_what_a_result_depends_on_recomputes_the_cell(tiny_study, edit):
    base = tiny_study(recipes=["w4a4"], attacks=[{"name": "fgsm", "eps": [0, "4/255"]}])
    before = {c.key for c in plan(parse_study(base))}
    after = {c.key for c in plan(parse_study(RELEVANT[edit](base)))}
    assert not before & after


def test_editing_what_it_does_not_depend_on_reuses_every_cell(tiny_study, tmp_path):
    base = tiny_study(recipes=["w4a4"], attacks=[{"name": "fgsm", "eps": [0, "4/255"]}])
    first = run_study(parse_study(base), tmp_path / "run", progress=False)
    assert first.computed == 2
    for edit in IRRELEVANT.values():
        again = run_study(parse_study(edit(base)), tmp_path / "run", progress=False)
        assert (again.skipped, again.computed) == (2, 0)


def test_an_output_path_that_is_a_file_fails_before_any_work(tiny_study, tmp_path, capsys):
    import yaml

    from qrobust.cli import main

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tiny_study(attacks=[{"name": "fgsm", "eps": [0]}])))
    (tmp_path / "taken").write_text("not a directory")
    assert main(["-q", "run", str(config), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is a file, not a directory" in err and "\n" not in err
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_a_write_error_mid_run_is_one_line_keeps_the_store_and_the_rerun_resumes(
        tiny_study, tmp_path, capsys, monkeypatch):
    import sqlite3

    import yaml

    from qrobust.cli import main
    from qrobust.eval.store import ResultStore

    # without the black-box check (the square attack on the integer model, most of the run's
    # time): resuming with it is tested in test_grid.py
    spec = tiny_study(attacks=[{"name": "fgsm", "eps": [0, "4/255", "8/255"],
                                "checks": ["gradients", "randomness"]}])
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    real_put, calls = ResultStore.put, []

    def failing_put(self, *args, **kwargs):  # the disk fills after two results
        calls.append(1)
        if len(calls) > 2:
            real_db = self._db
            self._db = sqlite3.connect(":memory:")  # a connection whose writes fail:
            self._db.execute("PRAGMA query_only = ON")  # "attempt to write a readonly database"
            try:
                return real_put(self, *args, **kwargs)
            finally:
                self._db.close()
                self._db = real_db
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(ResultStore, "put", failing_put)
    assert main(["-q", "run", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not write a result" in err and "rerun to resume" in err and "\n" not in err
    with ResultStore(out / "results.sqlite") as store:
        assert len(store) == 2  # what was written before the error is intact
    monkeypatch.setattr(ResultStore, "put", real_put)
    assert main(["-q", "run", str(config), "--out", str(out)]) == 0
    assert "6 cells, 2 already stored, 4 computed" in capsys.readouterr().out
    reference = run_study(parse_study(spec), tmp_path / "clean", progress=False)
    from .test_grid import table

    assert table(out / "results.sqlite") == table(reference.store)


def test_the_next_run_removes_what_a_killed_run_left_half_written(tmp_path):
    out = tmp_path / "run"
    (out / "models" / "cnn").mkdir(parents=True)
    stale = [out / ".summary.json.abc123.tmp", out / "models" / "cnn" / ".model.safetensors.x.tmp"]
    for f in stale:
        f.write_bytes(b"half")
    kept = out / "results.sqlite"
    kept.write_bytes(b"")
    with writer_lock(out):
        assert not any(f.exists() for f in stale) and kept.exists()
