"""Our GGUF exports in real llama.cpp (llama-cpp-python, built from source by pip): the oracle for GGUF."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLE_TEXT
from ggml_activations import numpy_engine_like_llamacpp
from kanana_quant.gguf.writer import export_gguf
from kanana_quant.loader import open_model
from kanana_quant.runtimes.generate import generate
from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.runtimes.sampling import SamplingParams

TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q2_K", "Q3_K_M",
         "IQ4_NL", "IQ4_XS"]
# llama.cpp rounds activations before every quantized product (ggml_activations.py emulates it); what the
# emulation leaves out (rounding ties, Q8_1's fp16 block sums for Q4_1/Q5_1, the F16/BF16 kernels) depends on
# the random model, so every type is bounded by the size of the activation rounding itself. Byte equality
# with llama.cpp's own quantizer is checked separately (test_our_bytes_equal_llama_quantize).
KOREAN_ENGLISH = ["안녕하세요, 카나나입니다. Hello from Kanana!", "서울은 대한민국의 수도이다.\n\nThe capital is Seoul.",
                  "  multiple   spaces\tand\ttabs, 숫자 12345 그리고 emoji 🎉"]


def llamacpp(path, model, **kwargs) -> LlamaCppEngine:
    return LlamaCppEngine(path, model.config, max_seq_len=256, threads=1, kv_type="f32", **kwargs)


@pytest.mark.parametrize("variant", ["dense-tied", "dense-llama3-rope", "moe-mixtral", "dense-untied-yarn"])
def test_f32_export_logits_and_tokens_match_llamacpp(model_dirs, tmp_path, variant):
    model = open_model(str(model_dirs(variant)))
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    engine = llamacpp(path, model)
    assert engine.llm.tokenize(SAMPLE_TEXT.encode(), add_bos=True, special=False) == ids
    theirs = engine.forward(ids, all_logits=True)
    ours = NumpyEngine(model.weights).forward(ids, all_logits=True)
    assert ours.std() > 0.5
    assert np.max(np.abs(theirs - ours)) <= 1e-4


def test_yarn_metadata_read_back_by_llamacpp(model_dirs, tmp_path):
    model = open_model(str(model_dirs("dense-untied-yarn")))
    meta = llamacpp(export_gguf(model, tmp_path / "m.gguf", "F32"), model).llm.metadata
    s = model.config.rope_scaling
    assert meta["llama.rope.scaling.type"] == "yarn"
    assert float(meta["llama.rope.scaling.factor"]) == pytest.approx(s.factor)
    assert int(meta["llama.rope.scaling.original_context_length"]) == s.original_max_position_embeddings
    assert float(meta["llama.rope.scaling.yarn_beta_fast"]) == s.beta_fast
    assert float(meta["llama.rope.scaling.yarn_beta_slow"]) == s.beta_slow


def test_llamacpp_ignores_yarn_betas_in_the_file(model_dirs, tmp_path):
    """Why LlamaCppEngine passes the betas itself: with llama-cpp-python's defaults (32, 1) the llama
    architecture does not read them from the GGUF, and Kanana's 64/2 give different logits."""
    from llama_cpp import Llama

    model = open_model(str(model_dirs("dense-untied-yarn")))
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    plain = Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, type_k=0, type_v=0)
    plain.eval(ids)
    ours = NumpyEngine(model.weights).forward(ids, all_logits=True)
    assert np.max(np.abs(np.array(plain.scores[: len(ids)]) - ours)) > 0.1


@pytest.mark.parametrize("text", KOREAN_ENGLISH)
def test_llamacpp_tokenizes_like_tokenizers(model_dirs, tmp_path, text):
    model = open_model(str(model_dirs("dense-tied")))
    engine = llamacpp(export_gguf(model, tmp_path / "m.gguf", "Q8_0"), model)
    assert engine.llm.tokenize(text.encode(), add_bos=False, special=False) == model.tokenizer.encode(text)
    ids = model.tokenizer.encode(text)
    assert engine.llm.detokenize(ids).decode() == model.tokenizer.decode(ids)


@pytest.mark.parametrize("variant", ["dense-256", "moe-256"])
@pytest.mark.parametrize("file_type", TYPES)
def test_quantized_types_in_llamacpp_match_numpy_runtime(model_dirs, tmp_path, variant, file_type):
    model = open_model(str(model_dirs(variant)))
    gguf_model = open_model(str(export_gguf(model, tmp_path / "m.gguf", file_type)))
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)[:16]
    # Decoding one token at a time: llama.cpp's batched kernels round activations in yet other ways.
    engines = {"llama.cpp": llamacpp(gguf_model.path, gguf_model),
               "numpy": NumpyEngine(gguf_model.weights),
               "numpy+ggml rounding": numpy_engine_like_llamacpp(gguf_model.weights)}
    logits = {name: np.stack([e.forward([t]) for t in ids]) for name, e in engines.items()}
    theirs, emulated = logits["llama.cpp"], logits["numpy+ggml rounding"]
    assert emulated.std() > 0.5
    rounding_effect = np.max(np.abs(logits["numpy"] - emulated))
    assert np.max(np.abs(theirs - emulated)) <= max(2 * rounding_effect, 1e-3)


# Quantized MoE is left out: on random tiny models the top tokens and the routed experts are near ties,
# so ggml's activation rounding flips one within 32 tokens for most seeds (measured: 7 of 15 seed × type
# pairs diverged, even with the rounding emulated); its logits are bounded in the test above instead.
@pytest.mark.parametrize("variant, file_type", [("dense-256", "Q8_0"), ("dense-256", "Q4_0"),
                                                ("dense-256", "Q4_K_M"), ("dense-256", "F32"),
                                                ("moe-256", "F32"), ("moe-mixtral", "F16")])
def test_greedy_text_identical_in_llamacpp(model_dirs, tmp_path, variant, file_type):
    model = open_model(str(model_dirs(variant)))
    gguf_model = open_model(str(export_gguf(model, tmp_path / "m.gguf", file_type)))
    prompt = model.tokenizer.encode("카나나는 Kanana, a model that", add_special_tokens=True)
    greedy = SamplingParams(temperature=0.0)
    theirs = list(generate(llamacpp(gguf_model.path, gguf_model), prompt, 32, greedy))
    ours = list(generate(numpy_engine_like_llamacpp(gguf_model.weights), prompt, 32, greedy))
    assert len(theirs) == 32 and theirs == ours


def test_llamacpp_engine_rewinds_like_numpy(model_dirs, tmp_path):
    """Chat reuses the KV cache by lowering `pos`; llama.cpp must then forget the tokens past it."""
    model = open_model(str(model_dirs("dense-tied")))
    engine = llamacpp(export_gguf(model, tmp_path / "m.gguf", "F32"), model)
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    fresh = engine.forward(ids[:12])
    engine.forward(ids[12:20])
    engine.pos = 8
    rewound = engine.forward(ids[8:12])
    assert np.max(np.abs(rewound - fresh)) <= 1e-5


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                                       "IQ4_NL", "IQ4_XS", "Q4_K_M"])
def test_our_bytes_equal_llama_quantize(model_dirs, tmp_path, file_type):
    """llama.cpp's own llama_model_quantize of our F32 file gives every tensor the type our mix gives it
    (256-wide rows, 8 layers: the per-layer rules apply) and writes the same bytes as our direct export."""
    import ctypes

    import llama_cpp
    from gguf import GGUFReader

    model = open_model(str(model_dirs("dense-256-deep")))
    f32 = export_gguf(model, tmp_path / "f32.gguf", "F32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = 1
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours = export_gguf(model, tmp_path / "ours.gguf", file_type)
    tensors = {t.name: t for t in GGUFReader(ours).tensors}
    compared = 0
    for t in GGUFReader(theirs).tensors:
        mine = tensors[t.name]
        assert mine.tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(mine.data), np.asarray(t.data)), t.name
        compared += t.tensor_type.name not in ("F32", "F16")
    assert compared >= 7 * model.config.num_layers
