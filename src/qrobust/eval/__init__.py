"""Robustness studies: the results store, the grid of cells, and the executors.

Only the store is imported here (it is light: sqlite3 + json); import ``qrobust.eval.grid``
and ``qrobust.eval.executors`` explicitly.
"""

from qrobust.eval.store import ResultStore, StoreError, canonical_json, cell_key

__all__ = ["ResultStore", "StoreError", "canonical_json", "cell_key"]
