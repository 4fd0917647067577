"""Calibration data: text/jsonl files or folders, a Hugging Face dataset id, or our built-in bilingual set,
tokenized and cut into `samples` windows of `seq_len` tokens."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np

from kanana_quant.errors import KananaQuantError, json_lines, read_input_text
from kanana_quant.tokenizer import Tokenizer

BUILTIN = "builtin"
BUILTIN_FILES = ("data/bilingual_train.txt", "data/calib_en.txt")  # documents split on blank lines
# Query/document pairs (Korean and English, queries in the instruction format) joined to the built-in set for
# embedding models: an encoder is calibrated on the inputs it embeds. Decoders keep the set above unchanged, so
# their calibration (and the measured results) stay as they were.
ENCODER_FILES = ("data/calib_pairs.txt",)
MAX_CALIB_BYTES = 1 << 30
_TURN = re.compile(r"^(User|Assistant|사용자|어시스턴트):\s?", re.MULTILINE)


def builtin_documents(encoder: bool = False) -> list[str]:
    """Our bilingual set: Korean and English prose, chat turns, code, math and JSON tool calls. The
    Korean-heavy bilingual_train.txt (which also trains the test tokenizer) is balanced by calib_en.txt,
    original English text, so GPTQ/AWQ are not calibrated mostly on Korean."""
    package = resources.files("kanana_quant")
    docs = []
    for name in BUILTIN_FILES + (ENCODER_FILES if encoder else ()):
        text = package.joinpath(name).read_text(encoding="utf-8")
        docs += [d.strip() for d in text.split("\n\n") if d.strip()]
    return docs


def _as_messages(document: str) -> list[dict] | None:
    """'User: … / Assistant: …' dialogues become chat messages, so calibration sees the chat template."""
    parts = _TURN.split(document)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"User": "user", "사용자": "user", "Assistant": "assistant", "어시스턴트": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _read_file(path: Path) -> list:
    text = read_input_text(path, MAX_CALIB_BYTES, f"--calib {path}", "pass a smaller sample")
    if path.suffix != ".jsonl":
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    docs = []
    for n, row in json_lines(text, str(path), "each line needs a 'text' or 'messages' field"):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            docs.append(row["messages"])
        else:
            raise KananaQuantError(f"{path}:{n}: expected an object with a 'text' string or a 'messages' list")
    return docs


def _dataset_documents(dataset_id: str, limit: int = 20000) -> list:
    try:
        import datasets  # optional: only for Hugging Face dataset ids
    except ImportError:
        raise KananaQuantError(f"--calib {dataset_id}: reading Hugging Face datasets needs `pip install datasets`; "
                               "or pass a local .txt/.jsonl file") from None
    try:
        rows = datasets.load_dataset(dataset_id, split="train", streaming=True)
        docs = []
        for row in rows:
            value = row.get("text") or row.get("messages")
            if value:
                docs.append(value)
            if len(docs) >= limit:
                break
    except Exception as e:  # datasets raises many types for offline / missing / gated
        raise KananaQuantError(f"--calib {dataset_id}: cannot load the dataset ({type(e).__name__}); "
                               "offline? pass a local .txt/.jsonl file instead") from None
    return docs


def load_documents(source: str, encoder: bool = False) -> list:
    if source == BUILTIN:
        return builtin_documents(encoder)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise KananaQuantError(f"{path}: no .txt or .jsonl calibration files in this folder")
        return [d for f in files for d in _read_file(f)]
    if path.is_file():
        return _read_file(path)
    if "/" in source and not path.exists() and not source.startswith((".", "/", "~")):
        return _dataset_documents(source)
    raise KananaQuantError(f"--calib {source}: no such file or folder (use 'builtin', a .txt/.jsonl file, a "
                           "folder, or a Hugging Face dataset id)")


def calibration_ids(tokenizer: Tokenizer, source: str, samples: int, seq_len: int, seed: int = 0,
                    encoder: bool = False) -> np.ndarray:
    """[samples, seq_len] token windows drawn at random offsets from the concatenated documents, each
    document starting with BOS as the model sees text at inference. `encoder`: the built-in set with the
    query/document pairs (an encoder attends both ways, so a window spanning documents is still read whole)."""
    if samples < 1 or seq_len < 8:
        raise KananaQuantError(f"--samples must be >= 1 and --seq-len >= 8, got {samples} and {seq_len}")
    stream: list[int] = []
    for doc in load_documents(source, encoder):
        messages = doc if isinstance(doc, list) else _as_messages(doc)
        if messages:
            stream += tokenizer.encode_chat(messages, add_generation_prompt=False)
        else:
            stream += tokenizer.encode(doc, add_special_tokens=True)
    if len(stream) < seq_len:
        raise KananaQuantError(f"--calib {source}: only {len(stream)} tokens, fewer than --seq-len {seq_len}")
    tokens = np.asarray(stream, dtype=np.int64)
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len + 1, size=samples)
    return np.stack([tokens[s:s + seq_len] for s in starts])
