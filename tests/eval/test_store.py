"""The results store: keys, round trips, no duplicates, and survival of a real kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qrobust.errors import ConfigError
from qrobust.eval.store import ResultStore, StoreError, canonical_json, cell_key
from qrobust.provenance import provenance

json_leaf = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=5), st.booleans(), st.none())
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=10)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_value, max_size=6))
def test_cell_key_is_sha256_of_sorted_json_and_ignores_key_order(config):
    expected = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"))
                              .encode()).hexdigest()
    assert cell_key(config) == expected
    assert cell_key(dict(reversed(list(config.items())))) == expected


def test_cell_key_normalises_tuples_numpy_and_torch_scalars():
    a = {"eps": 0.25, "bits": 4, "shape": (1, 8, 8)}
    b = {"shape": [1, 8, 8], "bits": np.int64(4), "eps": torch.tensor(0.25).item()}
    assert cell_key(a) == cell_key(b)
    assert cell_key({"eps": 0.25}) != cell_key({"eps": 0.5})
    assert json.loads(canonical_json({"x": np.float32(0.5)})) == {"x": 0.5}


def test_cell_key_rejects_unstorable_values():
    with pytest.raises(ConfigError, match="finite"):
        cell_key({"eps": float("nan")})
    with pytest.raises(ConfigError, match="object"):
        cell_key({"f": object()})


def test_put_get_roundtrip_with_provenance(tmp_path):
    cfg = {"recipe": "w4a4", "eps": 0.1, "attack": "pgd"}
    metrics = {"robust_acc": 0.5, "transfer_rate": float("nan"), "n": np.int64(10)}
    with ResultStore(tmp_path / "r.sqlite") as store:
        key = cell_key(cfg)
        assert not store.has(key) and store.get(key) is None
        assert store.put(key, "robustness", cfg, metrics, ["gradient masking?"], seed=3)
        row = store.get(key)
    assert row["config"] == cfg and row["table"] == "robustness" and row["seed"] == 3
    assert row["metrics"] == {"robust_acc": 0.5, "transfer_rate": None, "n": 10}
    assert row["warnings"] == ["gradient masking?"]
    prov = provenance()
    assert row["git_sha"] == prov["git_sha"] and row["versions"] == prov["versions"]


def test_no_duplicates_and_replace(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        key = cell_key({"a": 1})
        assert store.put(key, "t", {"a": 1}, {"m": 1})
        assert not store.put(key, "t", {"a": 1}, {"m": 2})  # first write wins
        assert store.get(key)["metrics"] == {"m": 1}
        assert store.put(key, "t", {"a": 1}, {"m": 3}, replace=True)
        store.put(cell_key({"a": 2}), "other", {"a": 2}, {"m": 0})
        assert len(store) == 2 and store.tables() == ["other", "t"]
        assert [r["metrics"]["m"] for r in store.rows("t")] == [3]
    raw = sqlite3.connect(path).execute("SELECT key, COUNT(*) FROM results GROUP BY key").fetchall()
    assert all(n == 1 for _, n in raw)


def test_reopen_keeps_rows_and_meta(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        for i in range(5):
            store.put(cell_key({"i": i}), "t", {"i": i}, {"v": i * i})
        store.set_meta("study", {"name": "x"})
    with ResultStore(path) as store:
        assert [r["config"]["i"] for r in store.rows()] == list(range(5))
        assert store.get_meta("study") == {"name": "x"} and store.get_meta("nope", 7) == 7
        mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_not_a_store(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a qrobust results store"):
        ResultStore(bad)
    with pytest.raises(StoreError, match="directory"):
        ResultStore(tmp_path)


WRITER = textwrap.dedent("""
    import sys
    from qrobust.eval.store import ResultStore, cell_key
    path, n = sys.argv[1], int(sys.argv[2])
    with ResultStore(path) as store:
        for i in range(n):
            cfg = {"cell": i, "payload": "x" * 2000}
            key = cell_key(cfg)
            if store.has(key):
                continue
            store.put(key, "t", cfg, {"value": i * 0.5}, seed=i)
            print(i, flush=True)  # after the commit: i is durable from here on
""")


def test_kill_9_mid_run_loses_nothing_written_and_resume_fills_the_rest(tmp_path):
    path, n = tmp_path / "r.sqlite", 400
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(n)],
                            stdout=subprocess.PIPE, text=True, env=env)
    reported = []
    for line in proc.stdout:
        reported.append(int(line))
        if len(reported) == 25:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with ResultStore(path) as store:
        stored = [r["config"]["cell"] for r in store.rows()]
    assert set(reported) <= set(stored) and len(stored) < n
    assert stored == list(range(len(stored)))  # a prefix, each exactly once

    out = subprocess.run([sys.executable, str(script), str(path), str(n)], capture_output=True,
                         text=True, env=env, check=True).stdout.split()
    assert [int(i) for i in out] == list(range(len(stored), n))  # only missing cells computed
    with ResultStore(path) as store:
        rows = store.rows()
    assert [r["config"]["cell"] for r in rows] == list(range(n))
    assert all(r["metrics"]["value"] == r["config"]["cell"] * 0.5 for r in rows)
