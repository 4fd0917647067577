"""End-to-end quantization: checkpoints in the published layouts, the quantized numpy runtime, MoE experts,
resume, and argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from safetensors.numpy import load_file

from conftest import SAMPLE_TEXT
from packing_oracles import autoawq_dequant, autogptq_dequant
from kanana_quant import names
from kanana_quant.loader import open_model
from kanana_quant.qcheckpoint import QuantFormat, QuantizedCheckpoint
from kanana_quant.quant.driver import quantize_model
from kanana_quant.quant.options import QuantOptions
from kanana_quant.runtimes.numpy_engine import FloatLinear, NumpyEngine

FAST = dict(samples=8, seq_len=64)


def quantize(src, out, method, bits=4, group_size=32, sym=True, **kw):
    opts = QuantOptions(QuantFormat(method, bits, group_size, sym), **(FAST | kw))
    return quantize_model(open_model(str(src)), out, opts)


class Dequantized:
    """The oracle side: a float model whose linears are the checkpoint's packed tensors, read by the
    `safetensors` package and dequantized by AutoGPTQ's / AutoAWQ's own readers (tests/packing_oracles.py),
    not by kanana_quant's unpackers."""

    def __init__(self, ckpt):
        self.ckpt, self.config = ckpt, ckpt.config
        self.hf = names.hf_name_map(ckpt.config, ckpt.moe_layout)
        self.tensors = {}
        for file in sorted(ckpt.dir.glob("*.safetensors")):
            self.tensors.update(load_file(file))

    def get(self, name, dtype=np.float32):
        if not self.ckpt.is_quantized(name):
            return self.ckpt.get(name, dtype)
        fmt, base = self.ckpt.format, self.hf[name].removesuffix(".weight")
        qweight, qzeros = self.tensors[base + ".qweight"], self.tensors[base + ".qzeros"]
        scales = self.tensors[base + ".scales"].astype(np.float32)
        if fmt.layout == "awq":
            weight = autoawq_dequant(qweight, qzeros, scales, fmt.group_size)
        else:
            weight = autogptq_dequant(qweight, qzeros, scales, fmt.bits_for(name), fmt.group_size)
        return weight.T.numpy().astype(dtype)  # the readers give [in, out]

    def linear(self, name, bias=None):
        return FloatLinear(self.get(name), None if bias is None else self.get(bias))


@pytest.mark.parametrize("method, bits, sym", [("rtn", 4, True), ("gptq", 3, False), ("awq", 4, False),
                                               ("gptq", 8, True), ("rtn", 2, False), ("awq-gptq", 4, True)])
def test_quantized_runtime_equals_dequantized_float_forward(tiny_dense, tmp_path, method, bits, sym):
    out = quantize(tiny_dense, tmp_path / "q", method, bits, sym=sym)
    ckpt = QuantizedCheckpoint(out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == bits and config["quant_method"] == ("awq" if method == "awq" and bits == 4 else "gptq")
    assert config["kanana_quant"]["method"] == method
    ids = open_model(str(out)).tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    quantized = NumpyEngine(ckpt).forward(ids, all_logits=True)
    reference = NumpyEngine(ckpt, source=Dequantized(ckpt)).forward(ids, all_logits=True)
    assert np.max(np.abs(quantized - reference)) <= 1e-4
    # The weights really are on a `bits`-bit grid, and the float model is not identical to the quantized one.
    q = ckpt.qtensor("layers.1.down")
    assert q.codes.max() <= 2 ** bits - 1 and len(np.unique(q.codes)) > 2 ** bits // 2
    original = open_model(str(tiny_dense)).weights.get("layers.1.down")
    error = np.abs(ckpt.get("layers.1.down") - original).mean() / np.abs(original).mean()
    assert 0 < error < {2: 0.6, 3: 0.25, 4: 0.15, 8: 0.01}[bits]


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_lm_head_bits(tiny_dense, tmp_path, method):
    """--lm-head-bits 8 on a tied model: lm_head becomes its own 8-bit tensor (embedding stays float), the
    config says so in our block and GPTQModel's `dynamic`, and the runtime uses the packed codes."""
    opts = QuantOptions(QuantFormat(method, 4, 32, True, lm_head=True, lm_head_bits=8), **FAST)
    out = quantize_model(open_model(str(tiny_dense)), tmp_path / "q", opts)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["dynamic"] == {"lm_head": {"bits": 8}}
    ckpt = QuantizedCheckpoint(out)
    q = ckpt.qtensor("lm_head")
    assert q.bits == 8 and ckpt.qtensor("layers.0.q").bits == 4 and len(np.unique(q.codes)) > 64
    embed = open_model(str(tiny_dense)).weights.get("embed")
    assert np.array_equal(ckpt.get("embed"), embed)
    assert 0 < np.abs(ckpt.get("lm_head") - embed).max() < 0.01 * np.abs(embed).max()
    ids = open_model(str(out)).tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    quantized = NumpyEngine(ckpt).forward(ids, all_logits=True)
    reference = NumpyEngine(ckpt, source=Dequantized(ckpt)).forward(ids, all_logits=True)
    assert np.max(np.abs(quantized - reference)) <= 1e-4


@pytest.mark.parametrize("variant", ["moe-mixtral", "moe-qwen"])
def test_moe_quantization_touches_every_expert(model_dirs, tmp_path, variant):
    src = model_dirs(variant)
    out = quantize(src, tmp_path / "q", "gptq")
    report = json.loads((out / "quantize_report.json").read_text())
    cfg = open_model(str(src)).config
    assert len(report) == cfg.num_layers
    for layer in report:
        counts = layer["expert_tokens"]
        assert len(counts) == cfg.moe.num_experts and sum(counts) == FAST["samples"] * FAST["seq_len"] * cfg.moe.top_k
    ckpt, rtn = QuantizedCheckpoint(out), QuantizedCheckpoint(quantize(src, tmp_path / "rtn", "rtn"))
    float_ckpt = open_model(str(src)).weights
    for i in range(cfg.num_layers):
        for e in range(cfg.moe.num_experts):
            for p in ("gate", "up", "down"):
                name = f"layers.{i}.experts.{e}.{p}"
                w = ckpt.get(name)
                assert np.isfinite(w).all()
                assert np.abs(w - float_ckpt.get(name)).mean() < 0.2 * np.abs(float_ckpt.get(name)).mean()
                # GPTQ's error feedback moved codes away from plain rounding: the expert was calibrated.
                assert not np.array_equal(ckpt.qtensor(name).codes, rtn.qtensor(name).codes)
        np.testing.assert_array_equal(ckpt.get(f"layers.{i}.router"), float_ckpt.get(f"layers.{i}.router"))
    # written in the layout GPTQModel loads (mlp.gate, mlp.experts.E.{gate,up,down}_proj), whatever the source's
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.0.mlp.gate.weight" in tensors and "model.layers.0.mlp.experts.7.up_proj.qweight" in tensors
    assert not any("block_sparse_moe" in k for k in tensors)


def test_moe_checkpoint_in_the_source_layout_still_reads(model_dirs, tmp_path):
    """Checkpoints written before the layout change (Mixtral's block_sparse_moe.experts.E.w1/w2/w3 names) read
    back to the same weights."""
    import re
    import shutil

    from safetensors.numpy import save_file

    out = quantize(model_dirs("moe-mixtral"), tmp_path / "q", "rtn")
    old = tmp_path / "old"
    shutil.copytree(out, old)
    renames = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    tensors = {re.sub(r"mlp\.experts\.(\d+)\.(\w+_proj)", lambda m: f"block_sparse_moe.experts.{m[1]}.{renames[m[2]]}",
                      k).replace("mlp.gate.", "block_sparse_moe.gate."): v
               for k, v in load_file(out / "model.safetensors").items()}
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in tensors
    save_file(tensors, old / "model.safetensors")
    new_ckpt, old_ckpt = QuantizedCheckpoint(out), QuantizedCheckpoint(old)
    assert (new_ckpt.moe_layout, old_ckpt.moe_layout) == ("mlp", "block_sparse_moe")
    for name in ("layers.1.experts.3.down", "layers.0.experts.0.gate", "layers.1.router"):
        np.testing.assert_array_equal(new_ckpt.get(name), old_ckpt.get(name))


def test_resume_yields_identical_checkpoint(tiny_dense, tmp_path):
    full = quantize(tiny_dense, tmp_path / "full", "gptq")
    opts = QuantOptions(QuantFormat("gptq", 4, 32, True), **FAST)
    starts = []

    def die_after_layer_0(report) -> None:
        raise KeyboardInterrupt  # as if the process died once layer 0 was saved

    with pytest.raises(KeyboardInterrupt):
        quantize_model(open_model(str(tiny_dense)), tmp_path / "resumed", opts, on_start=starts.append,
                       on_layer=die_after_layer_0)
    resumed = quantize_model(open_model(str(tiny_dense)), tmp_path / "resumed", opts, resume=True,
                             on_start=starts.append)
    assert starts == [0, 1]
    assert (resumed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert not (tmp_path / ".resumed.work").exists()


def test_group_size_must_divide_rows_before_any_work(tiny_dense, tmp_path):
    from kanana_quant.errors import KananaQuantError

    with pytest.raises(KananaQuantError, match="does not divide the 96 input columns"):
        quantize(tiny_dense, tmp_path / "q", "gptq", group_size=128)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "--bits 5 is not supported"),
    (["--group-size", "100"], "--group-size 100 is not supported"),
    (["--group-size", "128"], "does not divide"),
    (["--method", "squeezellm"], "--method 'squeezellm'"),
    (["--samples", "0"], "--samples"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--resume"], "nothing to resume"),
    (["--lm-head-bits", "6"], "--lm-head-bits 6 is not supported"),
    (["--lm-head-bits", "8", "--method", "awq"], "--lm-head-bits must equal --bits"),
])
def test_bad_quantize_arguments_fail_with_one_line(tiny_dense, tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "kanana_quant.cli", "quantize", str(tiny_dense), "-o",
                             str(tmp_path / "q"), "--group-size", "32", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_cli_quantize_then_generate_and_eval_with_ref(tiny_dense, tmp_path):
    out = tmp_path / "q"
    run = [sys.executable, "-m", "kanana_quant.cli"]
    quant = subprocess.run(run + ["quantize", str(tiny_dense), "-o", str(out), "--method", "gptq", "--group-size",
                                  "32", "--samples", "4", "--seq-len", "32"], capture_output=True, text=True)
    assert quant.returncode == 0, quant.stderr
    assert "layer 1" in quant.stderr
    gen = subprocess.run(run + ["generate", str(out), "--prompt", "hi", "--max-tokens", "4"], capture_output=True,
                         text=True)
    assert gen.returncode == 0 and gen.stdout.strip()
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 3)
    ev = subprocess.run(run + ["eval", str(out), "--text", str(text), "--ctx", "32", "--ref", str(tiny_dense),
                               "--json"], capture_output=True, text=True)
    result = json.loads(ev.stdout)
    assert 0 < result["kl_divergence"] < 1 and result["ref_perplexity"] != result["perplexity"]


def test_quantize_from_a_gguf_source(tiny_dense, tmp_path):
    """GGUF files are sources too: the checkpoint gets tokenizer files rebuilt from GGUF metadata."""
    from kanana_quant.gguf.writer import export_gguf

    gguf_path = export_gguf(open_model(str(tiny_dense)), tmp_path / "tiny.gguf", "Q8_0")
    out = quantize(gguf_path, tmp_path / "q", "gptq")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    from_gguf, from_hf = open_model(str(out)), open_model(str(tiny_dense))
    assert from_gguf.tokenizer.encode(SAMPLE_TEXT) == from_hf.tokenizer.encode(SAMPLE_TEXT)
    assert ("embed" in from_gguf.weights.names and from_gguf.weights.dtype("embed") == "F16")
    reference = open_model(str(gguf_path)).weights.get("layers.0.q")
    assert np.abs(from_gguf.weights.get("layers.0.q") - reference).mean() < 0.15 * np.abs(reference).mean()


@pytest.mark.parametrize("method, bits, sym", [("gptq", 3, False), ("awq", 4, False), ("gptq", 8, True),
                                               ("rtn", 2, False), ("rtn", 4, True)])
def test_row_blocks_unpack_straight_from_the_file(tiny_dense, tmp_path, method, bits, sym):
    """The numpy runtime unpacks blocks of output rows from the memory-mapped packed tensors; each block is
    exactly those rows of the whole tensor, in GPTQ and AWQ layouts (3-bit words span 32 rows)."""
    ckpt = QuantizedCheckpoint(quantize(tiny_dense, tmp_path / "q", method, bits, sym=sym))
    for name in ("layers.0.gate", "layers.1.down", "layers.0.k"):
        whole = ckpt.qtensor(name)
        out = whole.shape[0]
        for rows in (slice(0, 32), slice(32, out), slice(64, 96)):
            block = ckpt.qtensor(name, rows)
            np.testing.assert_array_equal(block.codes, whole.codes[rows])
            np.testing.assert_array_equal(block.zeros, whole.zeros[rows])
            np.testing.assert_array_equal(block.scales, whole.scales[rows])
    with pytest.raises(ValueError):
        ckpt.qtensor("layers.0.gate", slice(8, 40))
