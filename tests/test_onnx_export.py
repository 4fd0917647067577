"""ONNX export + onnxruntime engine against the numpy runtime (the oracle proved against transformers):
float and quantized (RTN/GPTQ/AWQ, 2–8 bits, sym/asym, g32/64/128/per-channel) logits, greedy text, KV-cache
decode vs prefill, MoE through QMoE, the MatMulNBits layout against onnxruntime itself, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLE_TEXT
from kanana_quant.errors import KananaQuantError
from kanana_quant.exporters import onnx_pack
from kanana_quant.exporters.onnx import export_onnx
from kanana_quant.loader import is_onnx_export, open_model
from kanana_quant.runtimes.generate import generate
from kanana_quant.runtimes.numpy_engine import FloatLinear, NumpyEngine
from kanana_quant.runtimes.onnx_engine import OnnxEngine
from kanana_quant.runtimes.sampling import SamplingParams

TOL = 1e-3
IDS = np.random.default_rng(7).integers(0, 1000, 24)


def _export(src, out, **kw):
    export_onnx(open_model(str(src)), out, **{"accuracy_level": 0, "lm_head": "float", **kw})
    return OnnxEngine(out, threads=1)


def _logits_diff(engine, oracle, ids=IDS) -> float:
    return float(np.abs(engine.forward(ids, all_logits=True) - oracle.forward(ids, all_logits=True)).max())


@pytest.fixture(scope="module")
def quantized(model_dirs, tmp_path_factory):
    """Quantized checkpoints made by our quantizers, once per module."""
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions

    root, made = tmp_path_factory.mktemp("q"), {}

    def get(variant, method, bits, group, sym):
        key = (variant, method, bits, group, sym)
        if key not in made:
            opts = QuantOptions(QuantFormat(method, bits, group, sym), samples=4, seq_len=32)
            made[key] = quantize_model(open_model(str(model_dirs(variant))), root / "-".join(map(str, key)), opts)
        return made[key]

    return get


def _session(node, inputs, outputs, inits):
    graph = helper.make_graph([node], "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits, group, sym", [(4, 32, True), (4, 64, False), (4, 128, False), (8, 32, False),
                                              (8, 128, True), (3, 32, False), (2, 64, True), (4, -1, False)])
def test_matmulnbits_layout_is_what_onnxruntime_reads(bits, group, sym):
    rng = np.random.default_rng(bits * 100 + group)
    n, k = 48, 256
    groups = 1 if group == -1 else k // group
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    zeros = (np.full((n, groups), 1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, (n, groups))).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, groups)).astype(np.float16).astype(np.float32)
    width = k if group == -1 else group
    weight = ((codes.reshape(n, groups, width).astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(n, k)
    nb = onnx_pack.from_codes(codes, scales, zeros, bits, group)
    np.testing.assert_array_equal(onnx_pack.dequantize(nb), weight)
    inits = [numpy_helper.from_array(nb.packed, "B"), numpy_helper.from_array(nb.scales, "S")]
    if nb.zeros is not None:
        inits.append(numpy_helper.from_array(nb.zeros, "Z"))
    node = helper.make_node("MatMulNBits", ["A", "B", "S"] + (["Z"] if nb.zeros is not None else []), ["Y"],
                            domain="com.microsoft", K=k, N=n, bits=nb.bits, block_size=nb.block, accuracy_level=0)
    sess = _session(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    x = rng.standard_normal((5, k)).astype(np.float32)
    y = sess.run(None, {"A": x})[0]
    np.testing.assert_allclose(y, x @ weight.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bits, k, block", [(8, 512, 256), (8, 96, 32), (4, 512, 32)])
def test_head_quantization_block_runs_in_onnxruntime(bits, k, block):
    """The lm_head we quantize ourselves: 8-bit in the widest block that divides the row (256 for Kanana's
    hidden sizes), 4-bit in blocks of 32; what onnxruntime computes from it is x · dequantize(codes)ᵀ."""
    rng = np.random.default_rng(k + bits)
    w = rng.standard_normal((40, k)).astype(np.float32)
    nb = onnx_pack.quantize_rtn(w, bits)
    assert nb.block == block and nb.zeros is None
    weight = onnx_pack.dequantize(nb)
    assert np.abs(weight - w).max() < (0.02 if bits == 8 else 0.5)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=40, bits=bits,
                            block_size=nb.block, accuracy_level=0)
    sess = _session(node, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 40])],
                    [numpy_helper.from_array(nb.packed, "B"), numpy_helper.from_array(nb.scales, "S")])
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"A": x})[0], x @ weight.T, atol=1e-4, rtol=1e-5)
    # a tied model's embedding gathers rows of the same codes (as exporters/onnx.py wires it)
    node = helper.make_node("GatherBlockQuantized", ["B", "I", "S3"], ["R"], domain="com.microsoft", bits=bits,
                            block_size=nb.block, quantize_axis=2, gather_axis=0)
    sess = _session(node, [helper.make_tensor_value_info("I", TensorProto.INT64, [None])],
                    [helper.make_tensor_value_info("R", TensorProto.FLOAT, None)],
                    [numpy_helper.from_array(nb.packed, "B"), numpy_helper.from_array(nb.scales[..., None], "S3")])
    rows = np.array([3, 0, 39], np.int64)
    np.testing.assert_array_equal(sess.run(None, {"I": rows})[0].reshape(3, k), weight[rows])


@pytest.mark.parametrize("variant", ["dense-tied", "dense-untied-yarn", "dense-llama3-rope", "moe-mixtral", "moe-qwen",
                                     "moe-qwen-no-renorm"])
def test_float_export_matches_numpy_runtime(model_dirs, tmp_path, variant):
    src = model_dirs(variant)
    engine = _export(src, tmp_path / "onnx")
    oracle = NumpyEngine(open_model(str(src)).weights)
    assert _logits_diff(engine, oracle) <= TOL
    # KV cache: rewind into the prompt, then decode token by token and in a chunk
    engine.pos = oracle.pos = 10
    for token in IDS[10:14]:
        assert np.abs(engine.forward([token]) - oracle.forward([token])).max() <= TOL
    chunk = engine.forward(IDS[14:20], all_logits=True) - oracle.forward(IDS[14:20], all_logits=True)
    assert np.abs(chunk).max() <= TOL
    ops = json.loads((tmp_path / "onnx" / "kanana_quant.json").read_text())["ops"]
    assert ("MoE" in ops) == variant.startswith("moe")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    assert len({i.name for i in graph.initializer}) == len(graph.initializer)  # no "Duplicate initializer"


@pytest.mark.parametrize("variant, method, bits, group, sym", [
    ("dense-tied", "rtn", 4, 32, True),
    ("dense-tied", "gptq", 3, 32, False),
    ("dense-tied", "awq", 4, 32, False),
    ("dense-tied", "rtn", 8, -1, False),
    ("dense-256", "gptq", 4, 128, False),
    ("dense-256", "awq", 4, 64, True),
    ("dense-untied-yarn", "rtn", 2, 32, False),
    ("moe-mixtral", "gptq", 4, 32, False),
    ("moe-mixtral", "rtn", 8, 32, True),
    ("moe-qwen-no-renorm", "rtn", 4, -1, False),
])
def test_quantized_export_matches_numpy_runtime_on_the_same_checkpoint(quantized, tmp_path, variant, method, bits,
                                                                      group, sym):
    src = quantized(variant, method, bits, group, sym)
    engine = _export(src, tmp_path / "onnx")
    oracle = NumpyEngine(open_model(str(src)).weights)
    assert _logits_diff(engine, oracle) <= TOL
    ours = json.loads((tmp_path / "onnx" / "kanana_quant.json").read_text())
    assert ours["ops"].get("MatMulNBits", 0) >= (4 if variant.startswith("moe") else 8)  # codes carried, not floats
    if variant.startswith("moe"):
        # 8-bit block-wise experts have only an int8-activation QMoE kernel; at accuracy level 0 they run in MoE
        assert ours["moe_op"] == ("MoE" if bits == 8 and group != -1 else "QMoE")


@pytest.mark.parametrize("variant", ["dense-tied", "moe-mixtral"])
def test_greedy_32_tokens_identical(model_dirs, quantized, tmp_path, variant):
    params = SamplingParams(temperature=0.0)
    prompt = open_model(str(model_dirs(variant))).tokenizer.encode(SAMPLE_TEXT[:40], add_special_tokens=True)
    for k, src in enumerate((model_dirs(variant), quantized(variant, "gptq", 4, 32, False))):
        engine = _export(src, tmp_path / f"onnx{k}")
        oracle = NumpyEngine(open_model(str(src)).weights)
        ours = list(generate(engine, prompt, 32, params))
        assert len(ours) == 32 and ours == list(generate(oracle, prompt, 32, params))


def test_kv_cache_decode_equals_full_prefill(model_dirs, tmp_path):
    engine = _export(model_dirs("moe-qwen"), tmp_path / "onnx")
    full = engine.forward(IDS, all_logits=True)
    engine.reset()
    engine.forward(IDS[:5])
    steps = [engine.forward([t]) for t in IDS[5:12]] + list(engine.forward(IDS[12:], all_logits=True))
    assert np.abs(np.stack(steps) - full[5:]).max() <= 1e-4
    # the cache grows past its first allocation without losing what it holds
    engine.reset()
    long_ids = np.resize(IDS, 300)
    assert np.abs(engine.forward(long_ids[:250])[None] - engine_full(engine, long_ids[:250])).max() <= 1e-4


def engine_full(engine, ids):
    engine.reset()
    for i in range(0, len(ids) - 1, 100):
        engine.forward(ids[i:min(i + 100, len(ids) - 1)])
    return engine.forward(ids[-1:])[None]


def test_accuracy_level_4_and_quantized_lm_head(quantized, tmp_path):
    src = quantized("dense-tied", "rtn", 4, 32, True)
    model = open_model(str(src))
    oracle = NumpyEngine(model.weights)
    want = oracle.forward(IDS, all_logits=True)
    export_onnx(model, tmp_path / "fast")  # defaults: accuracy level 4, lm_head 8-bit for a quantized source
    side = json.loads((tmp_path / "fast" / "kanana_quant.json").read_text())
    assert side["accuracy_level"] == 4 and side["lm_head"] == "q8"
    got = OnnxEngine(tmp_path / "fast", threads=1).forward(IDS, all_logits=True)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()  # int8 activations: close, not exact
    # q4 lm_head at accuracy 0 is exact to its own RTN codes
    export_onnx(model, tmp_path / "q4", accuracy_level=0, lm_head="q4")
    # tied: the embedding gathers the same 4-bit codes the lm_head multiplies by
    oracle.embed = onnx_pack.dequantize(onnx_pack.quantize_rtn(model.weights.get("embed"), 4))
    oracle.lm_head = FloatLinear(oracle.embed)
    oracle.reset()
    assert _logits_diff(OnnxEngine(tmp_path / "q4", threads=1), oracle) <= TOL
    # ...but from its own copy: onnxruntime keeps an initializer that another node still reads resident
    # beside the MatMulNBits repacking of it, so a shared table would sit in RAM twice.
    graph = onnx.load(str(tmp_path / "q4" / "model.onnx"), load_external_data=False).graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    heads = [n for n in graph.node if n.name.startswith("lm_head.") and n.op_type == "MatMulNBits"]
    assert len(heads) > 1  # row slices: onnxruntime holds one slice twice while repacking, not the whole head
    assert all(readers[head.input[1]] == ["MatMulNBits"] for head in heads)
    assert "GatherBlockQuantized" in {op for ops in readers.values() for op in ops}
    # q8 lm_head at accuracy 0: exact to its own RTN codes, in the widest block the row length allows
    export_onnx(model, tmp_path / "q8", accuracy_level=0, lm_head="q8")
    nb = onnx_pack.quantize_rtn(model.weights.get("embed"), 8)
    assert nb.block == onnx_pack.head_block(model.config.hidden_size, 8)
    assert [onnx_pack.head_block(k, 8) for k in (2048, 1792, 4096, 576)] == [256, 256, 256, 64]  # Kanana, SmolLM2
    graph = onnx.load(str(tmp_path / "q8" / "model.onnx"), load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.name.startswith("lm_head.") for a in n.attribute if a.name == "block_size"}
    assert blocks == {nb.block}
    oracle.embed = onnx_pack.dequantize(nb)
    oracle.lm_head = FloatLinear(oracle.embed)
    oracle.reset()
    assert _logits_diff(OnnxEngine(tmp_path / "q8", threads=1), oracle) <= TOL


def test_export_dir_opens_as_a_model_and_errors_are_one_line(tiny_dense, tmp_path):
    out = tmp_path / "onnx"
    _export(tiny_dense, out)
    assert is_onnx_export(out) and not is_onnx_export(tiny_dense)
    loaded = open_model(str(out))
    assert loaded.config.num_layers == 2
    assert loaded.tokenizer.encode("카나나") == open_model(str(tiny_dense)).tokenizer.encode("카나나")
    assert loaded.weights.nbytes() > 0 and loaded.weights.format is None
    with pytest.raises(KananaQuantError, match="already exists"):
        export_onnx(open_model(str(tiny_dense)), out)
    with pytest.raises(KananaQuantError, match="accuracy-level"):
        export_onnx(open_model(str(tiny_dense)), tmp_path / "x", accuracy_level=7)
    with pytest.raises(KananaQuantError, match="not an ONNX export"):
        OnnxEngine(tiny_dense)
    with pytest.raises(KananaQuantError, match="exceeds"):
        OnnxEngine(out, max_seq_len=16, threads=1).forward(np.resize(IDS, 17))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "kanana_quant.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_export_onnx_then_generate_and_eval(quantized, tmp_path):
    src = quantized("dense-tied", "gptq", 4, 32, False)
    out = tmp_path / "onnx"
    result = cli("export", "onnx", src, "-o", out, "--accuracy-level", 0, "--lm-head", "float")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and "MatMulNBits" in result.stderr
    prompt = "카나나는"
    result = cli("generate", out, "--prompt", prompt, "--max-tokens", 8, "--engine", "onnxruntime")
    assert result.returncode == 0, result.stderr
    tok = open_model(str(src)).tokenizer
    want = list(generate(NumpyEngine(open_model(str(src)).weights), tok.encode(prompt, add_special_tokens=True), 8,
                         SamplingParams(temperature=0.0), tok.eos_ids))
    assert result.stdout.rstrip("\n") == tok.decode(want)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    result = cli("eval", out, "--text", text, "--ctx", 32)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("perplexity: ")
    bad = cli("export", "onnx", src, "-o", tmp_path / "bad", "--accuracy-level", 9)
    assert bad.returncode == 2 and "accuracy-level" in bad.stderr and bad.stderr.count("\n") == 1


def test_chat_reuses_the_kv_cache_like_the_numpy_runtime(tiny_dense, tmp_path):
    from kanana_quant.runtimes.generate import ChatSession

    engine = _export(tiny_dense, tmp_path / "onnx")
    model = open_model(str(tiny_dense))
    params = SamplingParams(temperature=0.0)
    ours = ChatSession(engine, model.tokenizer, params, max_tokens=12, system="Be brief.")
    theirs = ChatSession(NumpyEngine(model.weights), model.tokenizer, params, max_tokens=12, system="Be brief.")
    for turn in ("안녕하세요!", "Tell me more about Kanana."):
        assert "".join(ours.reply(turn)) == "".join(theirs.reply(turn))
    assert ours.cached == theirs.cached and engine.pos == len(ours.cached) > 0
