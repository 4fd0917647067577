"""Texts → embeddings with an embedding model (Kanana2Vec and declared Llama-backbone encoders), on any engine.

The one function `embed` and `serve`'s /v1/embeddings call: texts are formatted as the model expects (a query
takes its instruction prefix, a document none), tokenized with BOS, truncated to the model's max length, sorted
by length and right-padded into batches whose pool mask leaves out the prefix tokens; the engine runs the
encoder and pools; rows come back in input order, cut to a Matryoshka size if asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from kanana_quant.atomic import atomic_file
from kanana_quant.config import EmbeddingConfig, ModelConfig
from kanana_quant.errors import KananaQuantError, read_input_text
from kanana_quant.tokenizer import Tokenizer

MAX_TEXTS = 100_000


class Encoder(Protocol):
    """An engine that pools an embedding model's last hidden states (numpy, onnxruntime, llama.cpp)."""

    name: str

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, pool_mask: np.ndarray) -> np.ndarray:
        """Right-padded int64 [B, T] batches → float32 [B, hidden]: the pool_mask-weighted mean."""


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    skip: int  # leading tokens left out of the mean (the instruction prefix, BOS included)


def embedding_config(cfg: ModelConfig, source: str) -> EmbeddingConfig:
    if cfg.embedding is None:
        raise KananaQuantError(f"{source}: {cfg.architecture} is not an embedding model; `embed` runs "
                               "Kanana2VecModel (kanana-nano-2.1b-embedding) or a Llama encoder whose config.json "
                               "says 'pooling': 'mean', 'is_causal': false")
    return cfg.embedding


def check_dim(emb: EmbeddingConfig, dim: int | None, source: str) -> int:
    """The output size: the full hidden size, or a Matryoshka size the model declares."""
    full = emb.dimensions[-1]
    if dim is None or dim == full:
        return full
    if dim not in emb.dimensions:
        sizes = ", ".join(map(str, emb.dimensions))
        raise KananaQuantError(f"--dim {dim}: {source} gives embeddings of size {sizes} (config.json "
                               "'matryoshka_dimensions' lists the sizes it was trained to be cut to)")
    return dim


def encode_texts(tokenizer: Tokenizer, emb: EmbeddingConfig, texts: Sequence[str],
                 instruction: str | None = None) -> list[Encoded]:
    """Token ids of each text as the model reads it, and how many leading tokens the mean leaves out."""
    prefix, skip = "", 0
    if instruction:
        prefix = emb.query_prefix.format(instruction=instruction.strip())
        # Counted as upstream does: the prefix tokenized on its own, BOS included.
        skip = 0 if emb.pool_instruction else len(tokenizer.encode(prefix, add_special_tokens=True))
        if skip >= emb.max_length:
            raise KananaQuantError(f"--instruction is {skip} tokens, leaving no room in the model's "
                                   f"{emb.max_length}-token input; shorten it")
    out = []
    for n, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise KananaQuantError(f"text {n + 1}: empty; every text needs some characters to embed")
        full = f"{prefix} {text.strip()}" if prefix else text.strip()
        out.append(Encoded(tokenizer.encode(full, add_special_tokens=True)[:emb.max_length], skip))
    return out


def batch_arrays(rows: Sequence[Encoded], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded input_ids, attention_mask and pool_mask [B, T] (int64) of some encoded texts."""
    width = max(len(r.ids) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r.ids)] = r.ids
        mask[b, :len(r.ids)] = 1
    pool = mask.copy()
    for b, r in enumerate(rows):
        pool[b, :r.skip] = 0
    return ids, mask, pool


def pad_token_id(cfg: ModelConfig) -> int:
    """Padding is EOS (Kanana2Vec); pad positions are masked, so only their being in range matters."""
    pad = cfg.raw.get("pad_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < cfg.vocab_size:
        return pad
    return cfg.eos_token_ids[0] if cfg.eos_token_ids else 0


def embed(encoder: Encoder, tokenizer: Tokenizer, cfg: ModelConfig, texts: Sequence[str], *,
          instruction: str | None = None, dim: int | None = None, normalize: bool = False,
          batch_size: int = 16, source: str = "model") -> np.ndarray:
    """float32 [len(texts), dim]: one embedding per text, in order. `instruction` makes the texts queries;
    `normalize` scales each row to unit length (after the Matryoshka cut)."""
    emb = embedding_config(cfg, source)
    size = check_dim(emb, dim, source)
    if not texts:
        raise KananaQuantError("no texts to embed; pass --text or --file")
    if len(texts) > MAX_TEXTS:
        raise KananaQuantError(f"{len(texts)} texts is over {MAX_TEXTS} per call; split the input")
    rows = encode_texts(tokenizer, emb, texts, instruction)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))  # similar lengths share a batch
    out = np.empty((len(rows), cfg.hidden_size), np.float32)
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start:start + batch_size]
        out[chunk] = encoder.encode(*batch_arrays([rows[i] for i in chunk], pad_token_id(cfg)))
    out = out[:, :size]
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
    return out


def read_texts(texts: Sequence[str] | None, file: Path | None, max_bytes: int = 64 << 20) -> list[str]:
    """--text values or --file lines (exactly one of them), blank lines skipped."""
    if bool(texts) == (file is not None):
        raise KananaQuantError("give the texts with --text (repeatable) or --file FILE (one text per line), not both")
    if file is None:
        return list(texts)
    text = read_input_text(file, max_bytes, f"--file {file}", "split it")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise KananaQuantError(f"--file {file}: no texts (every line is blank)")
    return lines


def write_embeddings(out: Path, texts: Sequence[str], vectors: np.ndarray) -> None:
    """OUT.npy (float32 [n, dim]) or OUT.jsonl ({"text", "embedding"} per line), written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        if out.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(vectors, np.float32))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for text, row in zip(texts, vectors):
                    f.write(json.dumps({"text": text, "embedding": [float(v) for v in row]}, ensure_ascii=False) + "\n")
