"""GGUF export, checked against oracles that do not share its code:

- our GGUF reader (and gguf-py's GGUFReader / dequantizers) must give back the source model's tensors, config,
  tokenizer and logits;
- llama-quantize's type mix, restated here as explicit tables for small models;
- quantized checkpoints carried into Q4_0 / Q5_0 / Q8_0 must dequantize to the checkpoint's weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import SAMPLE_TEXT
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf.mix import FILE_TYPES, carrier_file_type, tensor_type
from kanana_quant.gguf.writer import export_gguf
from kanana_quant.gguf.header import read_gguf_header
from kanana_quant.gguf.reader import GGUFCheckpoint
from kanana_quant.gguf.vocab import read_tokenizer
from kanana_quant.loader import open_model
from kanana_quant.qcheckpoint import QuantFormat, QuantizedCheckpoint
from kanana_quant.quant.driver import quantize_model
from kanana_quant.quant.options import QuantOptions
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.synth import TINY, synth_model
from kanana_quant.tokenizer import Tokenizer

T = gguf.GGMLQuantizationType
CHAT = [{"role": "user", "content": "안녕! Can you help? 🙂"}]
TEXTS = [SAMPLE_TEXT, "대한민국의 수도는 서울입니다. 🇰🇷🚀 I'm sure they'll've 12345 tokens\n\n\tok",
         "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕<|eot_id|>"]
# 256-wide dense model: every matrix row is whole 256-blocks, so the K-quant mix applies without fallback.
WIDE = {**TINY["dense"], "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "num_hidden_layers": 4}


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (torch ops spelled in numpy)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_fields(cfg: ModelConfig) -> dict:
    # GGUF holds one eos (+ eot/eom) id and no dtype; everything else must survive.
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("raw", "eos_token_ids", "torch_dtype")}


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def stored_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    """variant -> (model dir, F32 GGUF), exported once per module."""
    root = tmp_path_factory.mktemp("gguf-export")
    made = {}

    def get(variant: str):
        if variant not in made:
            src = model_dirs(variant)
            made[variant] = (src, export_gguf(open_model(str(src)), root / f"{variant}.gguf", "F32"))
        return made[variant]

    return get


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("wide") / "wide", WIDE, seed=7)


# ---------------------------------------------------------------------------------------------------------
# Round trip through our reader


@pytest.mark.parametrize("variant", ["dense-tied", "dense-untied-yarn", "dense-llama3-rope", "moe-mixtral"])
def test_f32_export_reads_back_as_the_source_model(exported, variant):
    src, path = exported(variant)
    hf, ck = open_model(str(src)).weights, GGUFCheckpoint(path)
    assert config_fields(ck.config) == config_fields(hf.config)
    eom = Tokenizer.from_dir(src).token_id("<|eom_id|>")
    assert set(ck.config.eos_token_ids) <= set(hf.config.eos_token_ids) | {eom}
    assert ck.names == hf.names
    for name in hf.names:
        np.testing.assert_array_equal(ck.get(name), hf.get(name), err_msg=name)
    tensors = read_gguf_header(path).tensors
    assert ("output.weight" in tensors) == (not hf.config.tie_word_embeddings)
    assert ("rope_freqs.weight" in tensors) == (variant == "dense-llama3-rope")
    if hf.config.moe:
        cfg = hf.config
        assert tensors["blk.0.ffn_down_exps.weight"].shape == (cfg.moe.num_experts, cfg.hidden_size,
                                                               cfg.moe.expert_intermediate_size)
        assert tensors["blk.1.ffn_gate_inp.weight"].shape == (cfg.moe.num_experts, cfg.hidden_size)


def test_q_and_k_rows_are_stored_as_the_converter_permutes_them(exported):
    src, path = exported("dense-untied-yarn")
    hf = open_model(str(src)).weights
    cfg = hf.config
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    for role, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
        w = hf.get(f"layers.1.{role}")
        got = stored[f"blk.1.attn_{role}.weight"]
        np.testing.assert_array_equal(got, converter_permute(w, heads))
        assert not np.array_equal(got, w)
    np.testing.assert_array_equal(stored["blk.1.attn_v.weight"], hf.get("layers.1.v"))


def test_tokenizer_from_gguf_encodes_like_the_hf_tokenizer(exported):
    src, path = exported("dense-tied")
    ours, ref = read_tokenizer(path), Tokenizer.from_dir(src)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True), text
    assert ours.encode_chat(CHAT) == ref.encode_chat(CHAT)
    assert (ours.bos_id, ours.vocab_size, ours.chat_template) == (ref.bos_id, ref.vocab_size, ref.chat_template)
    assert set(ours.eos_ids) <= set(ref.eos_ids) and ref.token_id("<|eot_id|>") in ours.eos_ids


def test_token_types(tmp_path):
    # a vocabulary padded past the trained BPE, as Kanana's 128,256 rows are: placeholders are UNUSED
    padded = {**TINY["dense"], "vocab_size": 1400, "bos_token_id": 1144, "eos_token_id": [1145, 1153]}
    src = synth_model(tmp_path / "padded", padded, seed=5)
    meta = metadata(export_gguf(open_model(str(src)), tmp_path / "padded.gguf", "F16"))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 1400
    kind = dict(zip(tokens, types))
    assert kind["<|begin_of_text|>"] == kind["<|reserved_special_token_0|>"] == gguf.TokenType.CONTROL
    assert tokens[1144] == "<|begin_of_text|>" and meta["tokenizer.ggml.bos_token_id"] == 1144
    assert meta["tokenizer.ggml.eot_token_id"] == 1153
    assert types[300] == gguf.TokenType.NORMAL and not tokens[300].startswith("<|")
    unused = [t for t, k in zip(tokens, types) if k == gguf.TokenType.UNUSED]
    assert unused == [f"<|kq_unused_{i}|>" for i in range(1024, 1144)]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(meta["tokenizer.ggml.merges"]) > 700


def test_a_gguf_source_exports_to_the_same_model(exported, tmp_path):
    src, path = exported("dense-untied-yarn")
    again = export_gguf(open_model(str(path)), tmp_path / "again.gguf", "F32")
    first, second = GGUFCheckpoint(path), GGUFCheckpoint(again)
    assert config_fields(second.config) == config_fields(first.config)
    for name in first.names:
        np.testing.assert_array_equal(second.get(name), first.get(name), err_msg=name)
    ref = Tokenizer.from_dir(src)
    for text in TEXTS:
        assert read_tokenizer(again).encode(text, True) == ref.encode(text, True), text


@pytest.mark.parametrize("variant", ["dense-tied", "dense-untied-yarn", "dense-llama3-rope", "moe-mixtral"])
def test_numpy_logits_on_gguf_equal_logits_on_hf(exported, variant):
    src, path = exported(variant)
    hf_model, gguf_model = open_model(str(src)), open_model(str(path))
    ids = hf_model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)
    assert gguf_model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True) == ids
    want = NumpyEngine(hf_model.weights).forward(ids, all_logits=True)
    got = NumpyEngine(gguf_model.weights).forward(ids, all_logits=True)
    assert np.max(np.abs(got - want)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# Metadata llama.cpp reads


def llama_keys(*groups: str) -> list[str]:
    K, arch = gguf.Keys, "llama"
    keys = [K.General.ARCHITECTURE, K.General.FILE_TYPE, K.General.QUANTIZATION_VERSION,
            K.LLM.VOCAB_SIZE, K.LLM.CONTEXT_LENGTH, K.LLM.EMBEDDING_LENGTH, K.LLM.FEED_FORWARD_LENGTH,
            K.LLM.BLOCK_COUNT, K.Attention.HEAD_COUNT, K.Attention.HEAD_COUNT_KV, K.Attention.KEY_LENGTH,
            K.Attention.VALUE_LENGTH, K.Attention.LAYERNORM_RMS_EPS, K.Rope.DIMENSION_COUNT, K.Rope.FREQ_BASE,
            K.Tokenizer.MODEL, K.Tokenizer.PRE, K.Tokenizer.LIST, K.Tokenizer.TOKEN_TYPE, K.Tokenizer.MERGES,
            K.Tokenizer.BOS_ID, K.Tokenizer.EOS_ID, K.Tokenizer.EOT_ID, K.Tokenizer.ADD_BOS,
            K.Tokenizer.CHAT_TEMPLATE]
    if "yarn" in groups:
        keys += [K.Rope.SCALING_TYPE, K.Rope.SCALING_FACTOR, K.Rope.SCALING_ORIG_CTX_LEN,
                 K.Rope.SCALING_YARN_BETA_FAST, K.Rope.SCALING_YARN_BETA_SLOW]
    if "moe" in groups:
        keys += [K.LLM.EXPERT_COUNT, K.LLM.EXPERT_USED_COUNT]
    return [k.format(arch=arch) for k in keys]


@pytest.mark.parametrize("variant, groups", [("dense-untied-yarn", ("yarn",)), ("moe-mixtral", ("moe",))])
def test_metadata_has_every_key_llama_cpp_reads(exported, variant, groups):
    src, path = exported(variant)
    cfg = open_model(str(src)).config
    meta = metadata(path)
    missing = [k for k in llama_keys(*groups) if k not in meta]
    assert not missing
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert meta["llama.attention.key_length"] == meta["llama.rope.dimension_count"] == cfg.head_dim == 32
    assert meta["llama.block_count"] == cfg.num_layers
    assert meta["llama.attention.head_count_kv"] == cfg.num_kv_heads
    assert meta["tokenizer.ggml.add_bos_token"] is True
    if "yarn" in groups:
        assert meta["llama.rope.scaling.type"] == "yarn"
        assert (meta["llama.rope.scaling.yarn_beta_fast"], meta["llama.rope.scaling.yarn_beta_slow"]) == (64.0, 2.0)
        assert meta["llama.rope.scaling.original_context_length"] == 128
        assert meta["llama.rope.scaling.factor"] == pytest.approx(4.4)
    if "moe" in groups:
        assert (meta["llama.expert_count"], meta["llama.expert_used_count"]) == (8, 2)
        assert meta["llama.feed_forward_length"] == cfg.moe.expert_intermediate_size


# ---------------------------------------------------------------------------------------------------------
# Type mixes


def _expected_k_mix(base: str, tied: bool) -> dict[str, str]:
    """llama-quantize Q4_K_M / Q5_K_M on a 4-layer model with 256-block rows: attn_v and ffn_down get Q6_K on
    layers 2 and 3 (use_more_bits for n = 4), the tied embedding (the output matrix) Q6_K, 1-D tensors F32."""
    want = {"token_embd.weight": "Q6_K" if tied else base, "output_norm.weight": "F32"}
    for i in range(4):
        more = "Q6_K" if i in (2, 3) else base
        want |= {f"blk.{i}.attn_norm.weight": "F32", f"blk.{i}.ffn_norm.weight": "F32",
                 f"blk.{i}.attn_q.weight": base, f"blk.{i}.attn_k.weight": base, f"blk.{i}.attn_v.weight": more,
                 f"blk.{i}.attn_output.weight": base, f"blk.{i}.ffn_gate.weight": base,
                 f"blk.{i}.ffn_up.weight": base, f"blk.{i}.ffn_down.weight": more}
    return want


@pytest.mark.parametrize("file_type, base", [("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K")])
def test_k_mix_on_256_wide_rows(wide_model, tmp_path, file_type, base):
    model = open_model(str(wide_model))
    path = export_gguf(model, tmp_path / "wide.gguf", file_type)
    assert stored_types(path) == _expected_k_mix(base, tied=True)
    assert metadata(path)["general.file_type"] == FILE_TYPES[file_type][1]
    ck = GGUFCheckpoint(path)
    for name in ("layers.0.q", "layers.3.down", "embed"):
        w = model.weights.get(name)
        rel = np.linalg.norm(ck.get(name) - w) / np.linalg.norm(w)
        assert 0.002 < rel < 0.08, (name, rel)


def test_fallback_when_rows_are_not_whole_256_blocks(tmp_path, tiny_dense):
    """hidden 96, q 128, ffn 192 columns: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; 2 layers: layer 1 is the
    use_more_bits layer; the tied embedding's Q6_K falls to Q8_0."""
    model = open_model(str(tiny_dense))
    for file_type, base in (("Q4_K_M", "Q5_0"), ("Q5_K_M", "Q5_1")):
        types = stored_types(export_gguf(model, tmp_path / f"{file_type}.gguf", file_type))
        assert types["token_embd.weight"] == "Q8_0"
        assert types["blk.0.attn_q.weight"] == types["blk.0.attn_output.weight"] == base
        assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == base
        assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
        assert types["blk.1.attn_norm.weight"] == "F32"


def test_tensor_type_rules_for_moe_legacy_widths_and_imatrix():
    moe = ModelConfig.from_hf({**TINY["moe"], "hidden_size": 256, "head_dim": 64, "intermediate_size": 256,
                               "num_hidden_layers": 8})
    assert tensor_type(moe, "layers.4.v", "Q4_0") == T.Q8_0  # 8 experts: V and K to Q8_0 in every mix
    assert tensor_type(moe, "layers.4.k", "Q4_K_M") == T.Q8_0
    assert tensor_type(moe, "layers.4.o", "Q4_K_M") == T.Q5_K
    assert tensor_type(moe, "layers.4.o", "Q5_K_M") == T.Q5_K
    assert tensor_type(moe, "layers.3.experts.5.down", "Q4_K_M") == T.Q6_K  # use_more_bits(3, 8)
    assert tensor_type(moe, "layers.4.experts.5.down", "Q4_K_M") == T.Q4_K
    assert tensor_type(moe, "layers.4.router", "Q4_K_M") == T.F32
    assert tensor_type(moe, "lm_head", "Q4_0") == T.Q6_K
    assert tensor_type(moe, "lm_head", "Q8_0") == T.Q8_0
    assert tensor_type(moe, "embed", "Q4_0") == T.Q4_0  # untied: the embedding follows the mix
    odd = ModelConfig.from_hf({**TINY["dense"], "hidden_size": 80, "num_attention_heads": 2,
                               "num_key_value_heads": 1, "head_dim": 40})
    assert tensor_type(odd, "layers.0.q", "Q4_0") == T.F16  # 80 columns: no 32-blocks at all
    assert tensor_type(odd, "layers.0.q", "Q4_K_M") == T.F16
    assert tensor_type(odd, "layers.0.down", "Q4_0") == T.Q4_0  # 192 columns
    assert tensor_type(moe, "layers.0.experts.0.down", "Q4_0", has_imatrix=True) == T.Q4_1
    assert tensor_type(moe, "layers.1.experts.0.down", "Q5_0", has_imatrix=True) == T.Q5_0
    assert tensor_type(moe, "layers.0.experts.0.down", "Q5_0", has_imatrix=True) == T.Q5_1
    assert tensor_type(moe, "layers.0.experts.0.down", "F16") == T.F16
    assert tensor_type(moe, "layers.0.attn_norm", "F16") == T.F32


# ---------------------------------------------------------------------------------------------------------
# Every file type


# (type of a main matrix on 96-wide rows, bound on any tensor's relative error)
FILE_TYPE_EXPECTATIONS = {
    "F32": ("F32", 0.0), "F16": ("F16", 5e-4), "BF16": ("BF16", 4e-3), "Q8_0": ("Q8_0", 0.01),
    "Q6_K": ("Q8_0", 0.01), "Q5_0": ("Q5_0", 0.06), "Q4_K_M": ("Q5_0", 0.06), "Q5_K_M": ("Q5_1", 0.06),
    "Q4_1": ("Q4_1", 0.1), "Q4_0": ("Q4_0", 0.12), "Q5_1": ("Q5_1", 0.06),
    # 96-wide rows: Q2_K/Q3_K fall back to Q4_0 and IQ4_XS to IQ4_NL, as in llama-quantize
    "Q2_K": ("Q4_0", 0.12), "Q3_K_S": ("Q4_0", 0.12), "Q3_K_M": ("Q4_0", 0.12), "Q3_K_L": ("Q4_0", 0.12),
    "IQ4_NL": ("IQ4_NL", 0.12), "IQ4_XS": ("IQ4_NL", 0.12),
}


def test_every_file_type_writes_and_dequantizes_within_its_bound(tiny_dense, tmp_path):
    assert set(FILE_TYPE_EXPECTATIONS) == set(FILE_TYPES)
    model = open_model(str(tiny_dense))
    for file_type, (main, bound) in FILE_TYPE_EXPECTATIONS.items():
        path = export_gguf(model, tmp_path / f"{file_type}.gguf", file_type)
        assert metadata(path)["general.file_type"] == FILE_TYPES[file_type][1]
        assert stored_types(path)["blk.0.ffn_up.weight"] == main, file_type
        ck = GGUFCheckpoint(path)
        worst = 0.0
        for name in ck.names:
            w = model.weights.get(name)
            worst = max(worst, float(np.linalg.norm(ck.get(name) - w) / np.linalg.norm(w)))
        assert worst <= bound, (file_type, worst)
        assert worst >= bound / 20, (file_type, worst)  # really stored at that precision


def test_importance_reaches_the_k_quant_search(wide_model, tmp_path):
    model = open_model(str(wide_model))
    rng = np.random.default_rng(0)
    imp = {"layers.0.q": rng.gamma(0.3, size=256).astype(np.float32)}
    plain = GGUFCheckpoint(export_gguf(model, tmp_path / "plain.gguf", "Q6_K"))
    weighted = GGUFCheckpoint(export_gguf(model, tmp_path / "imp.gguf", "Q6_K", importance=imp))
    w = model.weights.get("layers.0.q")

    def weighted_error(ck):
        return float(((ck.get("layers.0.q") - w) ** 2 * imp["layers.0.q"]).sum())

    assert weighted_error(weighted) < weighted_error(plain)
    np.testing.assert_array_equal(weighted.get("layers.0.k"), plain.get("layers.0.k"))
    with pytest.raises(KananaQuantError, match="layers.9.q"):
        export_gguf(model, tmp_path / "bad.gguf", "Q6_K", importance={"layers.9.q": imp["layers.0.q"]})


# ---------------------------------------------------------------------------------------------------------
# Exact carriers of quantized checkpoints


@pytest.mark.parametrize("bits, sym, file_type", [(4, True, "Q4_0"), (4, False, "Q5_0"), (8, True, "Q8_0"),
                                                  (4, True, "Q4_1")])
def test_quantized_checkpoint_is_carried_bit_for_bit(model_dirs, tmp_path, bits, sym, file_type):
    fmt = QuantFormat("rtn", bits, 32, sym)
    assert carrier_file_type(fmt) == {"Q4_1": "Q4_0"}.get(file_type, file_type)
    src = model_dirs("dense-untied-yarn")
    qdir = quantize_model(open_model(str(src)), tmp_path / "q", QuantOptions(fmt, samples=8, seq_len=64))
    ckpt = QuantizedCheckpoint(qdir)
    reports = []
    path = export_gguf(open_model(str(qdir)), tmp_path / "carried.gguf", file_type, on_tensor=reports.append)
    by_name = {r.name: r for r in reports}
    out = GGUFCheckpoint(path)
    quantized = [n for n in ckpt.names if ckpt.is_quantized(n)]
    assert quantized
    for name in quantized:
        np.testing.assert_array_equal(out.get(name), ckpt.get(name), err_msg=name)
    exact = [r for r in reports if r.exact is not None]
    assert len(exact) == len(quantized) and all(r.exact for r in exact)
    assert by_name["blk.0.attn_q.weight"].ggml_type == file_type
    if bits == 8:  # the grid's lowest level is used, so the full int8 range is exercised
        assert any(ckpt.qtensor(n).codes.min() == 0 for n in quantized)


def test_tensors_that_cannot_be_carried_are_requantized(model_dirs, tmp_path):
    fmt = QuantFormat("rtn", 4, 32, False)  # asymmetric offsets reach past Q4_0's [-8, 7]
    src = model_dirs("dense-tied")
    qdir = quantize_model(open_model(str(src)), tmp_path / "q", QuantOptions(fmt, samples=8, seq_len=64))
    ckpt = QuantizedCheckpoint(qdir)
    reports = []
    path = export_gguf(open_model(str(qdir)), tmp_path / "q4_0.gguf", "Q4_0", on_tensor=reports.append)
    assert any(r.exact is False for r in reports)
    out = GGUFCheckpoint(path)
    w = ckpt.get("layers.0.gate")
    rel = np.linalg.norm(out.get("layers.0.gate") - w) / np.linalg.norm(w)
    assert 0 < rel < 0.15


# ---------------------------------------------------------------------------------------------------------
# Errors and atomicity


def test_user_errors_are_one_line(tiny_dense, model_dirs, tmp_path):
    model = open_model(str(tiny_dense))
    for bad, match in (("IQ2_XXS", "unknown GGUF type"), ("q4", "unknown GGUF type")):
        with pytest.raises(KananaQuantError, match=match):
            export_gguf(model, tmp_path / "x.gguf", bad)
    with pytest.raises(KananaQuantError, match="does not exist"):
        export_gguf(model, tmp_path / "missing" / "x.gguf", "F16")
    with pytest.raises(KananaQuantError, match="llama-architecture"):
        export_gguf(open_model(str(model_dirs("moe-qwen"))), tmp_path / "qwen.gguf", "F16")
    assert export_gguf(model, tmp_path / "lower.gguf", "q8_0").is_file()


def test_failure_mid_write_leaves_no_file(tiny_dense, tmp_path):
    model = open_model(str(tiny_dense))
    out = tmp_path / "model.gguf"
    seen = []

    def boom(report):
        seen.append(report.name)
        if len(seen) == 3:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(model, out, "Q8_0", on_tensor=boom)
    assert len(seen) == 3 and os.listdir(tmp_path) == []
    out.write_bytes(b"previous")
    seen.clear()
    with pytest.raises(RuntimeError):
        export_gguf(model, out, "Q8_0", on_tensor=boom)
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.gguf"]
