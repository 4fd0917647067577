"""An embedding model's GGUF in llama.cpp's embedding mode (llama-cpp-python, the oracle for GGUF): the file
declares bidirectional attention and mean pooling for llama.cpp's llama architecture; llama.cpp's own mean
pooling equals ours for documents, and for queries equals a mean that includes the instruction prefix, which
is why our llama.cpp engine pools per-token outputs itself."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
import llama_cpp  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from test_embed import DOCS, INSTRUCTION, QUERIES  # noqa: E402
from kanana_quant.embed import embed  # noqa: E402
from kanana_quant.gguf.writer import export_gguf  # noqa: E402
from kanana_quant.loader import open_model  # noqa: E402
from kanana_quant.runtimes.engines import open_encoder  # noqa: E402
from kanana_quant.runtimes.numpy_engine import NumpyEngine  # noqa: E402
from kanana_quant.synth import TINY, synth_model  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb-gguf")
    src = synth_model(root / "float", {**TINY["embedding"], "hidden_size": 256, "head_dim": 64,
                                       "intermediate_size": 512}, seed=4)
    gguf_path = export_gguf(open_model(str(src)), root / "model.gguf", "F32")
    return open_model(str(src)), gguf_path


def test_gguf_declares_llamacpp_embedding_mode(models):
    src, path = models
    fields = GGUFReader(path).fields
    value = lambda key: fields[key].parts[fields[key].data[0]][0]  # noqa: E731
    assert bool(value("llama.attention.causal")) is False
    assert int(value("llama.pooling_type")) == int(llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    assert "output.weight" not in {t.name for t in GGUFReader(path).tensors}
    back = open_model(str(path)).config
    assert back.embedding == src.config.embedding and back.architecture == "Kanana2VecModel"


def test_llamacpp_engine_equals_numpy(models):
    src, path = models
    ours = NumpyEngine(src.weights)
    loaded = open_model(str(path))
    engine = open_encoder(loaded, "llama.cpp")
    for texts, instruction in ((QUERIES, INSTRUCTION), (DOCS, None)):
        want = embed(ours, src.tokenizer, src.config, texts, instruction=instruction)
        got = embed(engine, loaded.tokenizer, loaded.config, texts, instruction=instruction)
        assert np.abs(got - want).max() <= 1e-4 and np.abs(want).max() > 0.5


def test_llamacpp_own_mean_pooling(models):
    """llama.cpp's LLAMA_POOLING_TYPE_MEAN (what llama-server --embeddings returns) on the same file."""
    src, path = models
    llm = llama_cpp.Llama(model_path=str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          n_ctx=512, n_batch=512, n_ubatch=512, verbose=False, type_k=0, type_v=0)
    engine = NumpyEngine(src.weights)
    docs = np.array(llm.embed(DOCS, normalize=False))
    assert np.abs(docs - embed(engine, src.tokenizer, src.config, DOCS)).max() <= 1e-4  # so: bidirectional
    queries = np.array(llm.embed([f"Instruct: {INSTRUCTION}\nQuery: {q}" for q in QUERIES], normalize=False))
    pooled_prefix = dataclasses.replace(src.config, embedding=dataclasses.replace(src.config.embedding,
                                                                                  pool_instruction=True))
    with_prefix = embed(engine, src.tokenizer, pooled_prefix, QUERIES, instruction=INSTRUCTION)
    without = embed(engine, src.tokenizer, src.config, QUERIES, instruction=INSTRUCTION)
    assert np.abs(queries - with_prefix).max() <= 1e-4  # llama.cpp's mean includes the instruction tokens
    assert np.abs(queries - without).max() > 1e-2  # which the model's own pooling leaves out
