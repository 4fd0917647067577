"""Perplexity against transformers' own loss on the same windows."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from conftest import SAMPLE_TEXT
from kanana_quant.errors import KananaQuantError
from kanana_quant.eval import perplexity
from kanana_quant.loader import open_model
from kanana_quant.runtimes.numpy_engine import NumpyEngine


@pytest.mark.parametrize("variant", ["dense-untied-yarn", "moe-qwen"])
def test_perplexity_matches_transformers_loss(model_dirs, variant):
    path = model_dirs(variant)
    loaded = open_model(str(path))
    ids = loaded.tokenizer.encode(SAMPLE_TEXT * 4)
    ctx = 48
    result = perplexity(NumpyEngine(loaded.weights), ids, ctx)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = len(ids) // ctx
    with torch.no_grad():  # HF's loss is the mean NLL over the N-1 shifted positions of a window
        losses = [hf(torch.tensor([ids[w * ctx:(w + 1) * ctx]]), labels=torch.tensor([ids[w * ctx:(w + 1) * ctx]])).loss
                  for w in range(windows)]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert result["windows"] == windows >= 3 and result["tokens"] == windows * (ctx - 1)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_too_short_text_is_a_clear_error(tiny_dense):
    loaded = open_model(str(tiny_dense))
    with pytest.raises(KananaQuantError, match="fewer than one window"):
        perplexity(NumpyEngine(loaded.weights), [1, 2, 3], 8)
