"""Outputs appear complete or not at all: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kanana_quant.errors import KananaQuantError

PARTIAL_MARK = ".partial-"


def _temp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}{PARTIAL_MARK}{os.getpid()}"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it to `path`, on any error remove it."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` in one rename, on any error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise KananaQuantError(f"{path}: already exists; choose another output or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Fail before any work when the output would not fit (10% margin)."""
    directory = Path(directory)
    while not directory.exists():
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    if needed_bytes * 1.1 > free:
        raise KananaQuantError(f"{directory}: {what} needs {needed_bytes / 1e9:.2f} GB but only "
                               f"{free / 1e9:.2f} GB is free; free some space or write elsewhere")
