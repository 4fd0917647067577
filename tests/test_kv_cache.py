"""KV-cache storage types and the context-fits-in-RAM check made before an engine allocates anything."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLE_TEXT
from kanana_quant import resources
from kanana_quant.errors import KananaQuantError
from kanana_quant.exporters.onnx import export_onnx
from kanana_quant.gguf.writer import export_gguf
from kanana_quant.loader import open_model
from kanana_quant.runtimes.engines import kv_cache_bytes, open_engine


def test_f16_cache_in_numpy_stays_close_to_f32(tiny_dense):
    model = open_model(str(tiny_dense))
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    f32 = open_engine(model, "numpy", kv_type="f32")
    f16 = open_engine(model, "numpy", kv_type="f16")
    assert f16.k_cache is None or f16.k_cache.dtype == np.float16
    a, b = f32.forward(ids, all_logits=True), f16.forward(ids, all_logits=True)
    assert f16.k_cache.dtype == np.float16 and f16.k_cache.nbytes * 2 == f32.k_cache.nbytes
    assert 0 < np.max(np.abs(a - b)) < 2e-2 * np.abs(a).max()  # rounded, not broken


def test_f16_cache_in_onnxruntime_stays_close_to_f32(tiny_dense, tmp_path):
    """The export declares a float32 cache; opened with f16 the engine's buffers and the graph's cache tensors
    are float16 (a graph left float32 would refuse the float16 buffers). Prefill, then decode on the cache.
    (bench/long_context.py measures it; the CLI does not offer it.)"""
    from kanana_quant.runtimes.onnx_engine import OnnxEngine

    model = open_model(str(tiny_dense))
    onnx_dir = export_onnx(model, tmp_path / "onnx").path
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    runs = {}
    for kv in ("f32", "f16"):
        engine = OnnxEngine(onnx_dir, max_seq_len=128, threads=1, kv_type=kv)
        runs[kv] = np.concatenate([engine.forward(ids[:-3], all_logits=True), engine.forward(ids[-3:], all_logits=True)])
        assert engine._keys[0].dtype == np.dtype({"f32": np.float32, "f16": np.float16}[kv])
    diff = np.max(np.abs(runs["f32"] - runs["f16"]))
    assert 0 < diff < 2e-2 * np.abs(runs["f32"]).max()  # rounded, not broken
    # not offered through open_engine: onnxruntime converts such a cache to float32 on every step
    with pytest.raises(KananaQuantError, match="not available in onnxruntime"):
        open_engine(open_model(str(onnx_dir)), "onnxruntime", max_seq_len=128, threads=1, kv_type="f16")


def test_q8_0_cache_in_llamacpp_stays_close_to_f32(model_dirs, tmp_path):
    model = open_model(str(model_dirs("dense-256")))
    gguf = open_model(str(export_gguf(model, tmp_path / "m.gguf", "F32")))
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    logits = {kv: open_engine(gguf, "llama.cpp", max_seq_len=128, threads=1, kv_type=kv).forward(ids, True)
              for kv in ("f32", "q8_0")}
    diff = np.max(np.abs(logits["f32"] - logits["q8_0"]))
    assert 0 < diff < 5e-2 * np.abs(logits["f32"]).max()


def test_a_context_that_does_not_fit_is_refused_before_allocating(tiny_dense, monkeypatch):
    model = open_model(str(tiny_dense))
    per_token = kv_cache_bytes(model.config, 1, "f32")
    room = int((model.weights.nbytes() + 300 * per_token) / resources.RAM_HEADROOM)  # ~300 tokens fit
    monkeypatch.setattr(resources, "available_memory", lambda: room)
    with pytest.raises(KananaQuantError, match=r"context of 512 tokens needs [\d.]+ MiB .*at most (29\d|300) fit") as e:
        open_engine(model, "numpy", max_seq_len=512)
    assert "\n" not in str(e.value)
    assert open_engine(model, "numpy").max_seq_len in range(290, 301)  # not asked: cut to what fits
    assert open_engine(model, "numpy", max_seq_len=512, kv_type="f16").max_seq_len == 512  # half the bytes
    with pytest.raises(KananaQuantError, match="not available in numpy"):
        open_engine(model, "numpy", kv_type="q8_0")
