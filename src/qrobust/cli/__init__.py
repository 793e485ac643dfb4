"""The ``qrobust`` command line. Each sub-module adds its commands to ``app``
(:mod:`qrobust.cli.app`, which they import, so that nothing imports this package back).

``main(argv) -> int`` never raises for user errors: they print one ``error: ...`` line on
stderr and return 2.
"""

from __future__ import annotations

import sys

import typer

from qrobust.cli.app import app
from qrobust.errors import QrobustError
from qrobust.hardware import keep_large_allocations


def _register_commands() -> None:
    # each module adds its commands to ``app`` when imported
    from qrobust.cli import (  # noqa: F401
        attack_cmds,
        certify_cmds,
        data_cmds,
        defense_cmds,
        import_cmds,
        quant_cmds,
        study_cmds,
        train_cmds,
        verify_cmds,
    )


def main(argv: list[str] | None = None) -> int:
    keep_large_allocations()  # torch on CPU: large tensors from the heap, not fresh mmap pages
    _register_commands()
    try:
        result = app(args=argv, prog_name="qrobust", standalone_mode=False)
    except QrobustError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.Exit as err:
        return err.exit_code
    except typer.TyperException as err:  # usage errors: typer prints usage and the problem
        show = getattr(err, "show", None)
        show() if show else print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def run() -> None:  # console-script entry point
    sys.exit(main())
