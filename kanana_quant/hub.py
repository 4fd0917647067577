"""Resolve MODEL arguments: a local directory or file, else a Hugging Face id downloaded when online."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from kanana_quant.errors import KananaQuantError

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what a safetensors checkpoint needs: never pickles, never python files from the repository.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def resolve_model(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not HF_ID.match(spec):
        raise KananaQuantError(f"{spec}: no such file or directory (and not a Hugging Face id like kakao/NAME)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a base dependency
        raise KananaQuantError(f"{spec}: not a local path, and huggingface_hub is not installed") from None
    try:
        root = Path(snapshot_download(spec, allow_patterns=ALLOW_PATTERNS))
    except RepositoryNotFoundError:
        raise KananaQuantError(f"{spec}: no such model on the Hugging Face Hub (or it is gated); "
                               "pass a local directory instead") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise KananaQuantError(f"{spec}: cannot download from the Hugging Face Hub ({type(e).__name__}); "
                               "offline? download the model elsewhere and pass its local directory") from None
    verify_download(spec, root)
    return root


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_download(spec: str, root: Path) -> None:
    """Check each downloaded weight file against the size and sha256 the Hub lists for it (LFS files carry
    both). Offline, the Hub cannot be asked and the cached copy is used as is; a file that was checked once
    is not hashed again while its size and mtime stay the same."""
    from huggingface_hub import HfApi

    try:
        siblings = HfApi().model_info(spec, files_metadata=True).siblings or []
    except Exception:  # offline or rate-limited: snapshot_download already fell back to the cache
        return
    seen_path = root / ".kanana-quant-verified.json"
    try:
        seen = json.loads(seen_path.read_text()) if seen_path.is_file() else {}
    except (OSError, ValueError):
        seen = {}
    for sibling in siblings:
        lfs, path = sibling.lfs, root / sibling.rfilename
        if lfs is None or not sibling.rfilename.endswith(".safetensors") or not path.is_file():
            continue
        stat = path.stat()
        stamp = f"{lfs.sha256}:{stat.st_size}:{stat.st_mtime_ns}"
        if seen.get(sibling.rfilename) == stamp:
            continue
        if stat.st_size != lfs.size or _sha256(path) != lfs.sha256:
            raise KananaQuantError(f"{path}: does not match the Hub's size/sha256 for {spec}/{sibling.rfilename}; "
                                   "delete it from the Hugging Face cache and download again")
        seen[sibling.rfilename] = stamp
    try:
        seen_path.write_text(json.dumps(seen))
    except OSError:  # a read-only cache still works, it is just hashed again next time
        pass
