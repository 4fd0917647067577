"""Outputs appear complete or not at all: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kanana_quant.errors import KananaQuantError

PARTIAL_MARK = ".partial-"


PREVIOUS_MARK = ".old-"


def _temp_sibling(path: Path) -> Path:
    _sweep_stale(path)
    return path.parent / f".{path.name}{PARTIAL_MARK}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can judge: leave its files alone
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep_stale(path: Path) -> None:
    """Tidy up after runs that were killed outright (SIGKILL, power loss), whose writers are gone: remove
    their temporaries of `path`, and put back a previous `path` they had moved aside to replace it but had
    not yet replaced. Files of live processes are left alone."""
    try:
        siblings = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return
    for mark in (PARTIAL_MARK, PREVIOUS_MARK):
        prefix = f".{path.name}{mark}"
        for old in siblings:
            pid = old.name[len(prefix):]
            if not (old.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid()) or _alive(int(pid)):
                continue
            if mark == PREVIOUS_MARK and not path.exists():
                os.replace(old, path)
            else:
                _remove(old)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (so a rename survives a power cut), to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


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
    _fsync(path.parent)


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` in one rename, on any error it is removed
    and `path` is left as it was."""
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise KananaQuantError(f"{path}: already exists; choose another output or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old = path.parent / f".{path.name}{PREVIOUS_MARK}{os.getpid()}"
    moved = False
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync(tmp)
        if path.exists():
            moved = True  # set first: an interrupt may land between the rename and the next statement
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if moved and old.exists() and not path.exists():
            os.replace(old, path)  # interrupted between the two renames: put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync(path.parent)


def ensure_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Fail before any work when the output would not fit (10% margin)."""
    directory = Path(directory)
    while not directory.exists():
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    if needed_bytes * 1.1 > free:
        raise KananaQuantError(f"{directory}: {what} needs {needed_bytes / 1e9:.2f} GB but only "
                               f"{free / 1e9:.2f} GB is free; free some space or write elsewhere")
