"""The embedding model's ONNX export in onnxruntime against the numpy runtime (itself proved against
transformers in test_embed.py): bidirectional attention and pooling inside the graph, float and MatMulNBits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from test_embed import DOCS, INSTRUCTION, QUERIES
from kanana_quant.embed import embed
from kanana_quant.exporters.onnx import export_onnx
from kanana_quant.exporters import onnx_sidecar as sc
from kanana_quant.loader import open_model
from kanana_quant.qcheckpoint import QuantFormat
from kanana_quant.quant.driver import quantize_model
from kanana_quant.quant.options import QuantOptions
from kanana_quant.runtimes.engines import open_encoder
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.synth import TINY, synth_model

TEXTS = QUERIES + DOCS + ["짧은 문장", "A somewhat longer English sentence about glaciers, rivers and the sea."]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb-onnx")
    float_dir = synth_model(root / "float", {**TINY["embedding"], "hidden_size": 128, "intermediate_size": 256},
                            seed=5)
    opts = QuantOptions(QuantFormat("gptq", 4, 32, True), samples=8, seq_len=64)
    gptq_dir = quantize_model(open_model(str(float_dir)), root / "gptq", opts)
    return {"float": float_dir, "gptq": gptq_dir}


@pytest.mark.parametrize("kind", ["float", "gptq"])
def test_onnxruntime_equals_numpy(sources, tmp_path, kind):
    src = open_model(str(sources[kind]))
    out = export_onnx(src, tmp_path / "onnx", accuracy_level=0).path
    graph = onnx.load(str(out / sc.MODEL_FILE), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert ("MatMulNBits" in ops) == (kind == "gptq") and "GroupQueryAttention" not in ops
    # a name given twice is a graph input to onnxruntime ("Duplicate initializer"): no constant folding
    assert len({i.name for i in graph.initializer}) == len(graph.initializer)
    assert not (out / sc.SIDECAR).exists()  # onnxruntime-genai runs no encoders
    assert json.loads((out / sc.METADATA).read_text())["kind"] == "encoder"
    exported = open_model(str(out))
    ort_encoder = open_encoder(exported, "onnxruntime")
    for instruction in (INSTRUCTION, None):
        ours = embed(NumpyEngine(src.weights), src.tokenizer, src.config, TEXTS, instruction=instruction)
        # batches of 4 rows of different lengths: padding and the pool mask go through the graph
        got = embed(ort_encoder, exported.tokenizer, exported.config, TEXTS, instruction=instruction, batch_size=4)
        assert np.abs(got - ours).max() <= 1e-4
        assert np.abs(ours).max() > 0.5


def test_int8_activations_stay_close(sources, tmp_path):
    """The default export (accuracy level 4: int8 activations in MatMulNBits) embeds near the numpy runtime."""
    src = open_model(str(sources["gptq"]))
    exported = open_model(str(export_onnx(src, tmp_path / "onnx").path))
    got = embed(open_encoder(exported, "onnxruntime"), exported.tokenizer, exported.config, TEXTS)
    ours = embed(NumpyEngine(src.weights), src.tokenizer, src.config, TEXTS)
    cos = (got * ours).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.99


def test_a_crashed_encoder_is_one_error(sources, tmp_path):
    """onnxruntime runs in a child process for embeddings too: its death is EngineCrashed, not ours."""
    import os
    import signal

    from kanana_quant.embed import Encoded, batch_arrays
    from kanana_quant.errors import EngineCrashed

    exported = open_model(str(export_onnx(open_model(str(sources["float"])), tmp_path / "onnx").path))
    encoder = open_encoder(exported, "onnxruntime")
    batch = batch_arrays([Encoded([1, 2, 3], 0)], 0)
    assert encoder.encode(*batch).shape == (1, 128)
    os.kill(encoder._child.pid, signal.SIGKILL)
    encoder._child.wait()
    with pytest.raises(EngineCrashed, match=r"onnxruntime crashed \(signal SIGKILL\)"):
        encoder.encode(*batch)
