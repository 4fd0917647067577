"""The one exception type for problems a user can cause (bad files, bad flags, bad configs), and the
bounded JSON reading every metadata reader shares."""

import json
from pathlib import Path


class KananaQuantError(Exception):
    """A user-facing error: the message is one line naming the file or flag and the fix.

    The CLI prints it as ``error: <message>`` and exits with code 2; anything else is a bug.
    """


def read_json_object(path: Path, max_bytes: int) -> dict:
    """A JSON object from a small metadata file, size-capped before parsing; errors name the file."""
    if path.stat().st_size > max_bytes:
        raise KananaQuantError(f"{path}: file is over {max_bytes >> 20} MiB; refusing to parse it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KananaQuantError(f"{path}: not valid JSON ({e}); re-download the model") from None
    if not isinstance(data, dict):
        raise KananaQuantError(f"{path}: expected a JSON object")
    return data
