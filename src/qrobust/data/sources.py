"""Where dataset files are found, how they are checked, and how they are downloaded.

Search order for a dataset's files (the first root that holds a complete, valid copy wins):
  1. an explicit directory (``--data-dir`` / ``data_dir=``),
  2. the directory in the environment variable ``QROBUST_DATA``,
  3. ``../shared/data`` relative to the working directory, when present,
  4. ``~/.cache/qrobust/data`` (where downloads go when no directory is given),
  5. ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist`` installs Fashion-MNIST there).
Inside a root, a dataset lives in a sub-folder named after it (``mnist/``, ``fashion-mnist/``,
``cifar10/``, ``svhn/``) or directly in the root.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from qrobust.errors import DataError

log = logging.getLogger(__name__)
ENV_VAR = "QROBUST_DATA"
DEBIAN_ROOT = Path("/usr/share/datasets")
CACHE_ROOT = Path("~/.cache/qrobust/data").expanduser()


@dataclass(frozen=True)
class RemoteFile:
    """A file with a known digest. ``content_sha256`` hashes the *decompressed* bytes of a .gz
    (gzip headers differ between mirrors, e.g. Debian's copy); ``md5`` hashes the file itself."""

    name: str
    url: str | None = None
    content_sha256: str | None = None
    md5: str | None = None
    sha256: str | None = None


def search_roots(data_dir: str | Path | None) -> list[Path]:
    roots = [Path(data_dir)] if data_dir else []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    roots += [Path.cwd().parent / "shared" / "data", CACHE_ROOT, DEBIAN_ROOT]
    return [r.expanduser() for r in dict.fromkeys(roots)]


def candidate_dirs(root: Path, folders: tuple[str, ...]) -> list[Path]:
    return [root / f for f in folders] + [root]


def find_files(data_dir, folders: tuple[str, ...], names: tuple[str, ...]) -> Path | None:
    """The first directory (in search order) that holds all of ``names``."""
    for root in search_roots(data_dir):
        for d in candidate_dirs(root, folders):
            if all((d / n).is_file() for n in names):
                return d
    return None


def verify(path: Path, spec: RemoteFile) -> None:
    """Raise DataError when the file's digest differs from the known one."""
    checks = []
    if spec.content_sha256:
        try:
            content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataError(f"{path}: cannot decompress ({err}); the file is truncated or corrupt") from None
        checks.append(("sha256 of contents", hashlib.sha256(content).hexdigest(), spec.content_sha256))
    if spec.sha256:
        checks.append(("sha256", file_digest(path, "sha256"), spec.sha256))
    if spec.md5:
        checks.append(("md5", file_digest(path, "md5"), spec.md5))
    for what, got, want in checks:
        if got != want:
            raise DataError(f"{path}: {what} is {got[:16]}..., expected {want[:16]}...; the file is "
                            "corrupt or not the original (delete it, or pass --no-verify for your own copy)")


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(spec: RemoteFile, folder: Path, timeout: float = 30.0) -> Path:
    """Fetch ``spec.url`` into ``folder`` (temp file, verify, then rename: never half-written)."""
    if not spec.url:
        raise DataError(f"{spec.name}: no download address is known; place the file by hand")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / spec.name
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        log.info("downloading %s", spec.url)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
        tmp_path = Path(tmp).with_name(spec.name + ".part")
        os.replace(tmp, tmp_path)
        tmp = str(tmp_path)
        verify(tmp_path, spec)
        os.replace(tmp_path, target)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DataError(f"could not download {spec.url} ({err}); this machine seems offline: place "
                        f"the file in {folder} or set {ENV_VAR}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
