"""Quantizing embedding models: the calibration forward is the bidirectional one (checked against
transformers' LlamaModel), there is no lm_head, and RTN/GPTQ/AWQ checkpoints embed close to the float model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_embed import DOCS, INSTRUCTION, QUERIES, hf_llama
from kanana_quant.embed import embed
from kanana_quant.errors import KananaQuantError
from kanana_quant.layers_torch import TorchLayer, rms_norm
from kanana_quant.loader import open_model
from kanana_quant.qcheckpoint import QuantFormat
from kanana_quant.quant.driver import quantize_model
from kanana_quant.quant.options import QuantOptions
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.synth import TINY, synth_model

WIDE = {"hidden_size": 128, "head_dim": 32, "intermediate_size": 256}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("enc") / "tiny", {**TINY["embedding"], **WIDE}, seed=11)


def test_calibration_layers_are_bidirectional(encoder_dir):
    """The layer stack quantization streams activations through equals transformers' LlamaModel run with no
    causal mask (and differs from the causal one)."""
    loaded = open_model(str(encoder_dir))
    cfg = loaded.config
    ids = loaded.tokenizer.encode(" ".join(DOCS), add_special_tokens=True)
    x = torch.from_numpy(loaded.weights.get("embed")[ids])[None]
    for i in range(cfg.num_layers):
        layer = TorchLayer(cfg, {r: torch.from_numpy(a) for r, a in loaded.weights.layer(i).items()}, len(ids))
        x = layer.forward(x)
    ours = rms_norm(x, torch.from_numpy(loaded.weights.get("norm")), cfg.rms_norm_eps)[0].numpy()
    hf = hf_llama(encoder_dir)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        both_ways = hf(input_ids=ids_t, attention_mask=torch.zeros(1, 1, len(ids), len(ids))).last_hidden_state[0]
        causal = hf(input_ids=ids_t).last_hidden_state[0]
    assert np.abs(ours - both_ways.numpy()).max() <= 1e-4
    assert np.abs(ours - causal.numpy()).max() > 1e-2


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantized_encoder_embeds_close_to_float(encoder_dir, tmp_path, method):
    opts = QuantOptions(QuantFormat(method, 4, 32, True), samples=8, seq_len=64)
    out = quantize_model(open_model(str(encoder_dir)), tmp_path / method, opts)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Kanana2VecModel"] and config["quantization_config"]["bits"] == 4
    quant, ref = open_model(str(out)), open_model(str(encoder_dir))
    assert "lm_head" not in quant.weights.names and quant.weights.is_quantized("layers.0.q")
    texts = QUERIES + DOCS
    got = embed(NumpyEngine(quant.weights), quant.tokenizer, quant.config, texts, instruction=INSTRUCTION)
    want = embed(NumpyEngine(ref.weights), ref.tokenizer, ref.config, texts, instruction=INSTRUCTION)
    sims = cosines(got, want)
    assert sims.min() > 0.95 and np.abs(got - want).max() > 1e-4  # quantized, and still the same embedding


def test_lm_head_bits_are_refused_for_encoders(encoder_dir, tmp_path):
    opts = QuantOptions(QuantFormat("rtn", 4, 32, True, lm_head=True, lm_head_bits=8), samples=8, seq_len=64)
    with pytest.raises(KananaQuantError, match="no lm_head to quantize"):
        quantize_model(open_model(str(encoder_dir)), tmp_path / "q", opts)
    assert not (tmp_path / "q").exists()


def test_encoder_calibration_includes_the_pairs():
    from kanana_quant.calib import builtin_documents

    decoder, encoder = builtin_documents(), builtin_documents(encoder=True)
    extra = encoder[len(decoder):]
    assert encoder[:len(decoder)] == decoder and len(extra) >= 40
    assert any(d.startswith("Instruct: ") and "\nQuery: " in d for d in extra)
    assert any("질문" in d for d in extra) and any("retrieve" in d for d in extra)
