"""Embedding fidelity and retrieval accuracy: how far a (quantized) embedding model's vectors are from its float
reference's, and how well its queries find their passages on our bilingual retrieval set.

The built-in set (data/retrieval_pairs.jsonl) holds 203 query/passage pairs, 101 English and 102 Korean,
written for this project: every query is answered by exactly one passage. Each query ranks all passages of the
set by cosine similarity; recall@1 is the share whose own passage ranks first, MRR the mean of 1 / its rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from kanana_quant.errors import KananaQuantError, json_lines, read_input_text

BUILTIN_PAIRS = "data/retrieval_pairs.jsonl"
# The instruction the set's queries are embedded with (documents take none).
INSTRUCTION = "Given a question, retrieve a passage that answers it"
MAX_PAIRS_BYTES = 64 << 20


@dataclass(frozen=True)
class Pair:
    lang: str
    query: str
    passage: str


def load_pairs(path: Path | None = None) -> list[Pair]:
    """The built-in set, or a .jsonl file of {"query", "passage"[, "lang"]} objects."""
    if path is None:
        text = resources.files("kanana_quant").joinpath(BUILTIN_PAIRS).read_text(encoding="utf-8")
        where = BUILTIN_PAIRS
    else:
        text = read_input_text(path, MAX_PAIRS_BYTES, f"--pairs {path}", "pass a smaller set")
        where = str(path)
    pairs = []
    for n, row in json_lines(text, where, "each line needs 'query' and 'passage' strings"):
        if not (isinstance(row, dict) and isinstance(row.get("query"), str) and isinstance(row.get("passage"), str)
                and row["query"].strip() and row["passage"].strip()):
            raise KananaQuantError(f"{where}:{n}: expected an object with non-empty 'query' and 'passage' strings")
        pairs.append(Pair(str(row.get("lang", "")), row["query"], row["passage"]))
    if len(pairs) < 2:
        raise KananaQuantError(f"{where}: needs at least 2 query/passage pairs, has {len(pairs)}")
    return pairs


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a with the same row of b."""
    return (unit(a) * unit(b)).sum(1)


def retrieval_scores(queries: np.ndarray, passages: np.ndarray) -> dict:
    """recall@1 and MRR of query i finding passage i among all passages (ties rank pessimistically)."""
    sims = unit(queries) @ unit(passages).T
    own = np.diag(sims)
    ranks = 1 + (sims > own[:, None]).sum(1) + ((sims == own[:, None]).sum(1) - 1)
    return {"recall@1": float(np.mean(ranks == 1)), "mrr": float(np.mean(1.0 / ranks)), "queries": len(ranks)}


def by_language(pairs: list[Pair], queries: np.ndarray, passages: np.ndarray) -> dict:
    """Retrieval scores over the whole set, and per language within it (passages of that language only)."""
    out = {"all": retrieval_scores(queries, passages)}
    for lang in sorted({p.lang for p in pairs if p.lang}):
        rows = np.array([p.lang == lang for p in pairs])
        out[lang] = retrieval_scores(queries[rows], passages[rows])
    return out


def embed_pairs(loaded, encoder, pairs: list[Pair], instruction: str = INSTRUCTION,
                batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings, passage embeddings) of a set, queries with the instruction prefix."""
    from kanana_quant.embed import embed

    run = dict(batch_size=batch_size, source=str(loaded.path))
    queries = embed(encoder, loaded.tokenizer, loaded.config, [p.query for p in pairs], instruction=instruction, **run)
    passages = embed(encoder, loaded.tokenizer, loaded.config, [p.passage for p in pairs], **run)
    return queries, passages


def evaluate(loaded, encoder, pairs: list[Pair], ref=None, instruction: str = INSTRUCTION) -> dict:
    """Retrieval scores of the model and, with ref = (loaded, encoder) of its float model, the cosine similarity
    of every query and passage embedding to the float model's (mean and minimum) and the float model's scores."""
    q, p = embed_pairs(loaded, encoder, pairs, instruction)
    result = {"pairs": len(pairs), "instruction": instruction, "retrieval": by_language(pairs, q, p)}
    if ref is not None:
        ref_loaded, ref_encoder = ref
        if ref_loaded.config.hidden_size != loaded.config.hidden_size:
            raise KananaQuantError(f"--ref {ref_loaded.path}: embeddings of size {ref_loaded.config.hidden_size}, "
                                   f"the model's are {loaded.config.hidden_size}; pass the float model it came from")
        rq, rp = embed_pairs(ref_loaded, ref_encoder, pairs, instruction)
        sims = np.concatenate([cosine_rows(q, rq), cosine_rows(p, rp)])
        result["cosine_to_ref"] = {"mean": float(sims.mean()), "min": float(sims.min()), "texts": len(sims)}
        result["ref_retrieval"] = by_language(pairs, rq, rp)
    return result
