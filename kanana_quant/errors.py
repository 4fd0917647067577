"""The one exception type for problems a user can cause (bad files, bad flags, bad configs), the bounded
JSON reading and path confinement every metadata reader shares, and the bounded reading of the user's own data
files (calibration text, retrieval pairs, texts to embed)."""

import errno
import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath


class KananaQuantError(Exception):
    """A user-facing error: the message is one line naming the file or flag and the fix.

    The CLI prints it as ``error: <message>`` and exits with code 2; anything else is a bug.
    """


class EngineCrashed(KananaQuantError):
    """A native engine's child process died (a signal or an exit) while loading or running a model: not the
    user's input but the engine failing, so the CLI exits with 1, not 2."""


def parse_json(text: str | bytes, where: str):
    """json.loads with every failure mode of hostile input as one KananaQuantError: bad syntax or UTF-8,
    integers too long to convert (ValueError), nesting deeper than the recursion limit (RecursionError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(e).splitlines()[0][:120] if not isinstance(e, RecursionError) else "nested too deeply"
        raise KananaQuantError(f"{where}: not valid JSON ({reason}); re-download the model") from None


def read_text(path: Path, max_bytes: int) -> str:
    """A small UTF-8 text file, size-capped before reading; errors name the file."""
    try:
        if path.stat().st_size > max_bytes:
            raise KananaQuantError(f"{path}: file is over {max_bytes >> 20} MiB; refusing to parse it")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KananaQuantError(f"{path}: not UTF-8 text; re-download the model") from None
    except OSError as e:
        raise KananaQuantError(f"{path}: cannot read ({e.strerror or e})") from None


def read_input_text(path: Path, max_bytes: int, where: str, advice: str) -> str:
    """A data file the user passed, size-capped before reading. Unlike a model's metadata (read_text), the
    fix is the user's to make: `where` names the flag and the file, `advice` what to do with one too large."""
    if not path.is_file():
        raise KananaQuantError(f"{where}: no such file")
    if path.stat().st_size > max_bytes:
        raise KananaQuantError(f"{where}: over {max_bytes >> 20} MiB; {advice}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KananaQuantError(f"{where}: not UTF-8 text") from None


def json_lines(text: str, where: str, expected: str) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a .jsonl text; a line that is not JSON is one error
    naming `where`:line and what every line should hold (`expected`)."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, and integers too long to convert
            raise KananaQuantError(f"{where}:{n}: not valid JSON; {expected}") from None
        yield n, row


def read_json_object(path: Path, max_bytes: int) -> dict:
    """A JSON object from a small metadata file, size-capped before parsing; errors name the file."""
    data = parse_json(read_text(path, max_bytes), str(path))
    if not isinstance(data, dict):
        raise KananaQuantError(f"{path}: expected a JSON object")
    return data


def confined(model_dir: Path, name: str, where: str) -> Path:
    """`model_dir / name` for a file name taken from a model's own metadata (a shard in an index, ...),
    refused unless it is a plain relative name that stays inside the directory. Symbolic links are followed
    only into the directory itself or, for a Hugging Face cache snapshot, into that repository's blobs."""
    pure = PurePosixPath(name)
    if (not name or "\0" in name or "\\" in name or pure.is_absolute() or ".." in pure.parts
            or pure.parts[:1] == ("~",)):
        raise KananaQuantError(f"{where}: file {name[:80]!r} is outside the model directory; refusing it")
    path = model_dir / name
    real, root = path.resolve(), model_dir.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # hub cache: snapshots/<rev>/file -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    if not any(real == r or r in real.parents for r in allowed):
        raise KananaQuantError(f"{where}: file {name[:80]!r} leads outside the model directory (to {real}); "
                               "refusing it")
    return path


# OSErrors about a path the user chose (exit 2: fix the path or its permissions); every other OSError (disk
# full, I/O error) is the system failing under a correct command (exit 1). Both print one line.
BAD_PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                             errno.ENAMETOOLONG, errno.EEXIST, errno.ELOOP, errno.ENOTEMPTY})


def os_error_exit(e: OSError) -> tuple[str, int]:
    """One line and an exit code (2 bad path, 1 system failure) for an OSError that reached the CLI."""
    where = " -> ".join(repr(str(f)) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space or write elsewhere (no partial output was left)"
    return f"{reason}{': ' + where if where else ''}", 2 if e.errno in BAD_PATH_ERRNOS else 1
