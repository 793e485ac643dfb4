"""What produced a result: library versions and the git commit, stored with every artefact."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from qrobust.hardware import cpu_info


@functools.cache
def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in ("qrobust", "torch", "numpy", "scipy", "onnxruntime", "openvino"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    found["cpu"] = cpu_info().describe()  # int8 runtimes' results depend on it (VNNI or not)
    return found


def provenance() -> dict:
    return {"versions": versions(), "git_sha": git_sha()}
