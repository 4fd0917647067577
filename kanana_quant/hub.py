"""Resolve MODEL arguments: a local directory or file, else a Hugging Face id downloaded when online."""

from __future__ import annotations

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
        return Path(snapshot_download(spec, allow_patterns=ALLOW_PATTERNS))
    except RepositoryNotFoundError:
        raise KananaQuantError(f"{spec}: no such model on the Hugging Face Hub (or it is gated); "
                               "pass a local directory instead") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise KananaQuantError(f"{spec}: cannot download from the Hugging Face Hub ({type(e).__name__}); "
                               "offline? download the model elsewhere and pass its local directory") from None
