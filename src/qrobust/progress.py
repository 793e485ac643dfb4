"""Progress bars for long work, in one style (tqdm on stderr).

``progress``: True shows the bar, False hides it, None (the default everywhere) shows it only
when stderr is a terminal; ``qrobust -q`` passes False. Bars never change what a function
returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def bar(iterable: Iterable | None = None, *, progress: bool | None = None, leave: bool = False,
        **options) -> tqdm:
    """A tqdm bar over ``iterable`` (or of ``total=``), hidden unless ``progress`` allows."""
    return tqdm(iterable, disable=None if progress is None else not progress, leave=leave,
                dynamic_ncols=True, **options)
