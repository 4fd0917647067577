"""Embedding models: our numpy encoder against transformers' LlamaModel run bidirectionally (the oracle), the
config rules, and what `embed` does with instructions, batches and Matryoshka sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from conftest import SAMPLE_TEXT
from kanana_quant.config import ModelConfig
from kanana_quant.embed import embed
from kanana_quant.errors import KananaQuantError
from kanana_quant.loader import open_model
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.synth import TINY, synth_model

INSTRUCTION = "Given a question, retrieve passages that answer it"
QUERIES = ["카나나는 어떤 모델인가요?", "How do glaciers move downhill?"]
DOCS = [SAMPLE_TEXT, "빙하는 자체 무게로 천천히 흘러내립니다.", "Glaciers flow like a very stiff fluid under pressure."]


@pytest.fixture(scope="module")
def tiny_embedding(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("emb") / "tiny", TINY["embedding"], seed=7)


def hf_llama(path) -> transformers.LlamaModel:
    """The backbone as transformers' own LlamaModel (no remote code), loaded from our safetensors."""
    raw = json.loads((path / "config.json").read_text())
    config = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "eager"
    model = transformers.LlamaModel(config).eval()
    state = {k.removeprefix("model."): torch.from_numpy(v) for k, v in load_file(path / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    return model


def hf_embeddings(model, tok, texts, instruction=None, causal=False, pool_prefix=False) -> np.ndarray:
    """Upstream's recipe, written here from its description: prefix + " " + text, right-padded with EOS, a 4D
    mask that hides only padding (unless `causal`), mean over a pool mask that zeroes the prefix's tokens."""
    prefix = f"Instruct: {instruction}\nQuery:" if instruction else ""
    full = [f"{prefix} {t.strip()}" if prefix else t.strip() for t in texts]
    rows = [tok.encode(t) for t in full]
    skip = len(tok.encode(prefix)) if prefix and not pool_prefix else 0
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.convert_tokens_to_ids("<|end_of_text|>"))
    mask = torch.zeros((len(rows), width))
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    allowed = mask[:, None, None, :].expand(-1, 1, width, -1).clone()
    if causal:
        allowed = allowed * torch.tril(torch.ones(width, width))
    mask4d = torch.where(allowed > 0, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask4d).last_hidden_state
    pool = mask.clone()
    pool[:, :skip] = 0
    return ((hidden * pool[..., None]).sum(1) / pool.sum(1, keepdim=True)).numpy()


@pytest.fixture(scope="module")
def oracle(tiny_embedding):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_embedding / "tokenizer.json"))
    return hf_llama(tiny_embedding), tok


def test_numpy_embeddings_equal_bidirectional_llama(tiny_embedding, oracle):
    loaded = open_model(str(tiny_embedding))
    engine = NumpyEngine(loaded.weights)
    hf, tok = oracle
    for texts, instruction in ((QUERIES, INSTRUCTION), (DOCS, None)):
        ours = embed(engine, loaded.tokenizer, loaded.config, texts, instruction=instruction, batch_size=2)
        ref = hf_embeddings(hf, tok, texts, instruction)
        assert ours.shape == (len(texts), loaded.config.hidden_size)
        assert np.abs(ours - ref).max() <= 1e-5
        # the oracle is sensitive to both rules: causal attention, or pooling the prefix, is far away
        assert np.abs(ref - hf_embeddings(hf, tok, texts, instruction, causal=True)).max() > 1e-2
        if instruction:
            assert np.abs(ref - hf_embeddings(hf, tok, texts, instruction, pool_prefix=True)).max() > 1e-2


def test_batching_and_order_do_not_change_embeddings(tiny_embedding):
    loaded = open_model(str(tiny_embedding))
    engine = NumpyEngine(loaded.weights)
    texts = DOCS + QUERIES
    together = embed(engine, loaded.tokenizer, loaded.config, texts, batch_size=16)
    alone = np.concatenate([embed(engine, loaded.tokenizer, loaded.config, [t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    engine.ENCODE_TOKENS = 24  # a batch split into stacks of a few rows each changes nothing either
    np.testing.assert_allclose(embed(engine, loaded.tokenizer, loaded.config, texts, batch_size=16), alone, atol=1e-6)
    unit = embed(engine, loaded.tokenizer, loaded.config, texts, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def embedding_config(**extra) -> dict:
    base = {k: v for k, v in TINY["embedding"].items()}
    return {**base, **extra}


@pytest.mark.parametrize("extra, message", [
    ({"pooling": "cls"}, "pooling 'cls' is not supported"),
    ({"is_causal": True}, "is_causal=True is not supported"),
    ({"is_causal": "sometimes"}, "is_causal='sometimes' is not supported"),
    ({"architectures": ["LlamaModel"]}, "needs 'pooling': 'mean' and 'is_causal': false"),
    ({"architectures": ["LlamaModel"], "pooling": "mean"}, "is_causal=missing is not supported"),
    ({"matryoshka_dimensions": [64, 4096]}, "exceed hidden_size 96"),
    ({"query_prefix": "Query:"}, "'query_prefix' must be a string containing {instruction}"),
])
def test_unknown_pooling_or_attention_fails_in_one_line(extra, message):
    with pytest.raises(KananaQuantError) as e:
        ModelConfig.from_hf(embedding_config(**extra), "config.json")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_declared_llama_encoder_with_matryoshka_sizes(tmp_path):
    """A Llama-backbone encoder saved as a bare LlamaModel (no "model." prefix) with Matryoshka sizes runs
    without code changes; --dim takes only the declared sizes."""
    raw = embedding_config(architectures=["LlamaModel"], model_type="llama", pooling="mean", is_causal=False,
                           matryoshka_dimensions=[32, 64])
    path = synth_model(tmp_path / "m", raw, seed=3)
    tensors = load_file(path / "model.safetensors")
    from safetensors.numpy import save_file
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, path / "model.safetensors")
    loaded = open_model(str(path))
    assert loaded.config.embedding.dimensions == (32, 64, 96)
    engine = NumpyEngine(loaded.weights)
    full = embed(engine, loaded.tokenizer, loaded.config, DOCS)
    cut = embed(engine, loaded.tokenizer, loaded.config, DOCS, dim=32)
    np.testing.assert_array_equal(cut, full[:, :32])
    with pytest.raises(KananaQuantError, match="--dim 48: .* size 32, 64, 96"):
        embed(engine, loaded.tokenizer, loaded.config, DOCS, dim=48)


def test_causal_models_are_refused_by_embed(tiny_dense):
    loaded = open_model(str(tiny_dense))
    with pytest.raises(KananaQuantError, match="is not an embedding model"):
        embed(NumpyEngine(loaded.weights), loaded.tokenizer, loaded.config, DOCS)


def test_preset_is_kanana_nano_shaped():
    cfg = ModelConfig.preset("kanana-nano-2.1b-embedding")
    assert cfg.embedding.dimensions == (1792,) and cfg.embedding.max_length == 512 and not cfg.causal
    assert cfg.num_layers == 32 and not cfg.has_lm_head


def test_embed_cli_writes_npy_and_jsonl(tiny_embedding, tmp_path, run):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(QUERIES) + "\n\n", encoding="utf-8")
    code, _, _ = run("embed", tiny_embedding, "--file", texts, "--instruction", INSTRUCTION, "-o", tmp_path / "q.npy")
    assert code == 0
    loaded = open_model(str(tiny_embedding))
    expected = embed(NumpyEngine(loaded.weights), loaded.tokenizer, loaded.config, QUERIES, instruction=INSTRUCTION)
    got = np.load(tmp_path / "q.npy")
    assert got.dtype == np.float32 and got.shape == (2, 96)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    code, _, _ = run("embed", tiny_embedding, "--text", DOCS[1], "--normalize", "-o", tmp_path / "d.jsonl")
    row = json.loads((tmp_path / "d.jsonl").read_text(encoding="utf-8"))
    assert code == 0 and row["text"] == DOCS[1] and abs(np.linalg.norm(row["embedding"]) - 1) < 1e-5
    code, out, _ = run("embed", tiny_embedding, "--text", "a", "--text", "b")
    assert code == 0 and [json.loads(line)["index"] for line in out.splitlines()] == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["--text", "x", "--dim", "12"], "--dim 12"),
    (["--text", "x", "-o", "{tmp}/out.csv"], "write a .npy or .jsonl file"),
    ([], "give the texts with --text"),
    (["--file", "{tmp}/missing.txt"], "no such file"),
    (["--text", "   ", "-o", "{tmp}/out.npy"], "text 1: empty"),
])
def test_embed_cli_errors_are_one_line_and_write_nothing(tiny_embedding, tmp_path, run, args, message):
    code, _, err = run("embed", tiny_embedding, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_an_embedding_model(tiny_embedding, run):
    code, _, err = run("generate", tiny_embedding, "--prompt", "hi")
    assert code == 2 and "run it with `kanana-quant embed`" in err
