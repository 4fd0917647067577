"""eval-embed: the retrieval metrics against hand-computed ranks, the built-in bilingual set, and the command."""

from __future__ import annotations

import json
import re
import zlib

import numpy as np
import pytest

from test_embed import tiny_embedding  # noqa: F401 - a fixture
from kanana_quant.errors import KananaQuantError
from kanana_quant.retrieval import by_language, cosine_rows, load_pairs, retrieval_scores


def test_recall_and_mrr_by_hand():
    passages = np.eye(3)
    queries = np.array([[1.0, 0.1, 0.0],     # own passage first: rank 1
                        [0.9, 0.5, 0.0],     # passage 0 beats its own: rank 2
                        [0.8, 0.7, 0.6]])    # passages 0 and 1 beat its own: rank 3
    scores = retrieval_scores(queries, passages)
    assert scores["recall@1"] == pytest.approx(1 / 3) and scores["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    tied = retrieval_scores(np.ones((2, 2)), np.eye(2))  # a tie counts against the query
    assert tied["recall@1"] == 0 and tied["mrr"] == pytest.approx(0.5)
    np.testing.assert_allclose(cosine_rows(queries, 2 * queries), 1.0)


def test_builtin_set_is_bilingual_and_solvable():
    pairs = load_pairs()
    langs = [p.lang for p in pairs]
    assert len(pairs) >= 200 and langs.count("ko") >= 100 and langs.count("en") >= 100
    assert len({p.query for p in pairs}) == len(pairs) and len({p.passage for p in pairs}) == len(pairs)
    hangul = re.compile("[가-힣]")
    assert all(bool(hangul.search(p.query + p.passage)) == (p.lang == "ko") for p in pairs)

    def bigrams(text: str) -> np.ndarray:  # a lexical encoder: hashed character bigrams
        v = np.zeros(8192)
        for i in range(len(text) - 1):
            v[zlib.crc32(text[i:i + 2].lower().encode()) % 8192] += 1
        return v

    scores = by_language(pairs, np.stack([bigrams(p.query) for p in pairs]),
                         np.stack([bigrams(p.passage) for p in pairs]))
    # far above chance (1/203): each query has one answer that shares its words; and not trivially 1
    assert 0.2 < scores["all"]["recall@1"] < 0.9 and scores["ko"]["queries"] + scores["en"]["queries"] == len(pairs)


def test_bad_pairs_file_is_one_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "q"}\n', encoding="utf-8")
    with pytest.raises(KananaQuantError, match=r"pairs.jsonl:1: expected an object with non-empty 'query' and 'passage'"):
        load_pairs(bad)


def test_eval_embed_command(tiny_embedding, tmp_path, run):  # noqa: F811
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"lang": "en", "query": f"What is item {i}?", "passage": f"Item {i} is a thing number {i}."} for i in range(6)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    code, out, _ = run("eval-embed", tiny_embedding, "--ref", tiny_embedding, "--pairs", pairs, "--json")
    result = json.loads(out)
    assert code == 0 and result["pairs"] == 6 and result["cosine_to_ref"]["texts"] == 12
    assert result["cosine_to_ref"]["min"] == pytest.approx(1.0, abs=1e-6)  # the same model
    assert result["retrieval"] == result["ref_retrieval"]
    code, out, _ = run("eval-embed", tiny_embedding, "--pairs", pairs)
    assert code == 0 and "model all: recall@1" in out and "cosine" not in out
