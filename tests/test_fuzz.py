"""Fuzzing every reader of files a stranger can hand us: GGUF, safetensors (+ index), config.json, tokenizer
files and our quantized checkpoints.

Inputs are valid small files mutated by hypothesis (bit flips, truncation, spliced bytes, and header fields
overwritten with huge or boundary values, found by an independent walk of the header), plus structurally
generated headers and JSON values. The one outcome allowed besides success is a KananaQuantError whose
message is one line; anything else (a traceback, a hang, a large allocation) fails the test.

The suite runs a few hundred inputs per target (KQ_FUZZ_EXAMPLES, default below, deterministic);
`python bench/fuzz.py` runs many more with random seeds and prints how many were tried.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kanana_quant.errors import KananaQuantError
from kanana_quant.synth import TINY, synth_model

EXAMPLES = int(os.environ.get("KQ_FUZZ_EXAMPLES", "120"))
RANDOM = os.environ.get("KQ_FUZZ_RANDOM") == "1"  # bench/fuzz.py: fresh random inputs on every run
TRIED: Counter = Counter()  # inputs tried per target, reported by bench/fuzz.py
OUTCOMES: Counter = Counter()
MAX_SECONDS_PER_INPUT = 3.0
MAX_RSS_GROWTH = 512 << 20

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
                suppress_health_check=list(HealthCheck), print_blob=True)

# A 1-layer model, 32 wide: small files, so mutations land in headers and every input is cheap.
SMALL = {**TINY["dense"], "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
         "intermediate_size": 64, "num_hidden_layers": 1}


# ---------------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------------

def build_seeds(root: Path) -> dict[str, Path]:
    """Valid inputs: a float HF directory, a sharded copy, a GGUF, a small mixed-dtype safetensors file and
    an RTN-quantized checkpoint (every one of them loads)."""
    from kanana_quant.checkpoint import HFCheckpoint, save_checkpoint
    from kanana_quant.gguf.writer import export_gguf
    from kanana_quant.loader import open_model
    from kanana_quant.names import hf_name_map
    from kanana_quant.safetensors_io import TensorSpec, write_safetensors

    root.mkdir(parents=True, exist_ok=True)
    seeds = {"hf": synth_model(root / "hf", SMALL, seed=5)}
    model = open_model(str(seeds["hf"]))
    seeds["gguf"] = export_gguf(model, root / "m.gguf", "Q8_0")
    seeds["gguf_k"] = export_gguf(model, root / "k.gguf", "Q4_K_M")
    ckpt = HFCheckpoint(seeds["hf"])
    to_name = {hf: n for n, hf in hf_name_map(ckpt.config).items()}
    specs = [TensorSpec(hf, "F16", ckpt.get(n).shape) for n, hf in hf_name_map(ckpt.config).items()]
    files = {f.name: f.read_text() for f in seeds["hf"].iterdir() if f.suffix == ".json"}
    seeds["sharded"] = save_checkpoint(root / "sharded", specs, lambda s: ckpt.get(to_name[s.name]), files,
                                       max_shard_bytes=12_000)
    rng = np.random.default_rng(0)
    small = {"a": ("F32", rng.standard_normal((3, 4))), "b": ("BF16", rng.standard_normal(5)),
             "c": ("I32", np.arange(6).reshape(2, 3)), "d": ("F16", np.zeros((0, 2))), "e": ("U8", np.arange(3))}
    write_safetensors(root / "small.safetensors", [TensorSpec(k, d, v.shape) for k, (d, v) in small.items()],
                      lambda s: small[s.name][1], {"format": "pt"})
    seeds["safetensors"] = root / "small.safetensors"
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions

    seeds["quantized"] = quantize_model(model, root / "q", QuantOptions(QuantFormat("rtn", 4, 32, True)))
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return build_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


# ---------------------------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------------------------

def expect_clean(target: str, fn, *args) -> None:
    """Run a reader on one input: success or a one-line KananaQuantError, quickly."""
    TRIED[target] += 1
    start = time.perf_counter()
    try:
        fn(*args)
        OUTCOMES[target, "ok"] += 1
    except KananaQuantError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 2000, message[:500]
        OUTCOMES[target, "error"] += 1
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS_PER_INPUT, f"{target}: one input took {elapsed:.1f} s"


@pytest.fixture(autouse=True)
def bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
    assert grown < MAX_RSS_GROWTH, f"peak memory grew by {grown >> 20} MiB while fuzzing"


def read_gguf(path: Path) -> None:
    from kanana_quant.gguf.reader import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path)
    for name in ckpt.names:
        ckpt.get(name)
    ckpt.config.num_parameters()
    tok = ckpt.tokenizer()
    tok.decode(tok.encode("Kanana 카나나 <|eot_id|> 123", add_special_tokens=True))
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


def read_safetensors(path: Path) -> None:
    from kanana_quant.safetensors_io import FLOAT_DTYPES, SafetensorsFile

    file = SafetensorsFile(path)
    for name, info in file.tensors.items():
        file.raw(name)
        if info.dtype in FLOAT_DTYPES:
            file.get(name)


def read_model(path: Path) -> None:
    """What `info`, `generate` and `quantize` read from a model directory: config, every tensor, tokenizer."""
    from kanana_quant.loader import open_model

    model = open_model(str(path))
    for name in model.weights.names:
        model.weights.get(name)
    model.tokenizer.decode(model.tokenizer.encode("Kanana 카나나 <|eot_id|>", add_special_tokens=True))
    model.tokenizer.encode_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------------------
# Byte mutations
# ---------------------------------------------------------------------------------------------------------

BOUNDARY = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 30, 31, 32, 255, 256, (1 << 16) - 1, (1 << 31) - 1, 1 << 31,
            (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 48, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def gguf_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every integer field of a GGUF header (counts, lengths, types, dims, offsets),
    walked independently of the reader under test."""
    fields, pos = [(4, 4), (8, 8), (16, 8)], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string():
        nonlocal pos
        fields.append((pos, 8))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            fields.extend([(pos, 4), (pos + 4, 8)])
            itype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if itype == 8:
                for _ in range(count):
                    string()
            else:
                pos += count * scalar[itype]
        else:
            if scalar[vtype] in (4, 8):
                fields.append((pos, scalar[vtype]))
            pos += scalar[vtype]

    for _ in range(n_kv):
        string()
        fields.append((pos, 4))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        value(vtype)
    for _ in range(n_tensors):
        string()
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append((pos, 4))
        pos += 4
        fields.extend((pos + 8 * i, 8) for i in range(n_dims))
        pos += 8 * n_dims
        fields.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
    return fields


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 32), st.integers(0, 7)),
    st.tuples(st.just("field"), st.integers(0, 1 << 32), st.sampled_from(BOUNDARY + ["size", "size-1"])),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 32)),
    st.tuples(st.just("splice"), st.integers(0, 1 << 32), st.binary(max_size=16)),
)


def mutate(data: bytes, ops, fields: list[tuple[int, int]], hot: int) -> bytes:
    """Apply mutations; positions fall in the first `hot` bytes (the header) nine times out of ten."""
    out = bytearray(data)
    for op in ops:
        if not out:
            break
        kind, where = op[0], op[1]
        span = hot if where % 10 else len(out)
        pos = (where // 10) % max(1, min(span, len(out)))
        if kind == "flip":
            out[pos] ^= 1 << op[2]
        elif kind == "field" and fields:
            offset, size = fields[(where // 10) % len(fields)]
            value = {"size": len(out), "size-1": len(out) - 1}.get(op[2], op[2])
            if offset + size <= len(out):
                out[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        elif kind == "truncate":
            del out[pos:]
        elif kind == "splice":
            out[pos:pos + len(op[2])] = op[2]
    return bytes(out)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@FUZZ
@given(ops=st.lists(MUTATION, min_size=1, max_size=4), which=st.sampled_from(["gguf", "gguf_k"]))
def test_mutated_gguf(seeds, tmp_path_factory, ops, which):
    data = seeds[which].read_bytes()
    fields = gguf_fields(data)
    hot = fields[-1][0] + 8
    path = _write(tmp_path_factory.getbasetemp() / "mutated.gguf", mutate(data, ops, fields, hot))
    expect_clean("gguf bytes", read_gguf, path)


def safetensors_fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """The 8-byte header length is the one binary field; numbers inside the JSON are mutated as text."""
    return [(0, 8)], 8 + struct.unpack_from("<Q", data)[0]


@FUZZ
@given(ops=st.lists(MUTATION, min_size=1, max_size=4), which=st.sampled_from(["small", "model"]))
def test_mutated_safetensors(seeds, tmp_path_factory, ops, which):
    source = seeds["safetensors"] if which == "small" else seeds["hf"] / "model.safetensors"
    data = source.read_bytes()
    fields, hot = safetensors_fields(data)
    path = _write(tmp_path_factory.getbasetemp() / "mutated.safetensors", mutate(data, ops, fields, hot))
    expect_clean("safetensors bytes", read_safetensors, path)


# ---------------------------------------------------------------------------------------------------------
# Structured inputs
# ---------------------------------------------------------------------------------------------------------

HUGE_INT = st.sampled_from([-1, 0, 1, 2, 1 << 31, 1 << 40, 1 << 63, 1 << 64, 10 ** 30])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), HUGE_INT,
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         st.sampled_from(["F32", "BF16", "I32", "llama3", "yarn", "default", "gptq", "awq",
                                          "LlamaForCausalLM", "../x.safetensors", "/etc/passwd", "\0", "silu"]))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
# Raw JSON texts no dict can produce: nesting past the recursion limit, integers past int-str limits, NaN.
HOSTILE_JSON_TEXT = st.sampled_from(["[" * 100_000 + "]" * 100_000, "9" * 5000, '{"a": NaN}', '{"a": 1e999}',
                                     '"\\ud800"', "\xff\xfe", "", "null", '{"a": {"b": ' * 3000 + "1" + "}}" * 3000])

SAFETENSORS_ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "Q4", ""]), JSON),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 8), HUGE_INT), max_size=9), JSON),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-2, 64), HUGE_INT), min_size=0, max_size=3), JSON),
})


@FUZZ
@example(entries={"t": {"dtype": [1], "shape": [1], "data_offsets": [0, 4]}}, metadata=None, data_size=4,
         declared=None)  # found: an unhashable dtype raised TypeError
@example(entries={}, metadata={"k": [[1]]}, data_size=0, declared=None)
@given(entries=st.dictionaries(st.text(max_size=10), st.one_of(SAFETENSORS_ENTRY, JSON), max_size=5),
       metadata=st.one_of(st.none(), JSON), data_size=st.integers(0, 96),
       declared=st.one_of(st.none(), st.sampled_from([0, 1, 7, (1 << 64) - 1, 100 << 20, (100 << 20) + 1])))
def test_generated_safetensors_headers(tmp_path_factory, entries, metadata, data_size, declared):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    length = len(blob) if declared is None else declared
    data = struct.pack("<Q", length) + blob + bytes(range(256))[:data_size]
    path = _write(tmp_path_factory.getbasetemp() / "generated.safetensors", data)
    expect_clean("safetensors header", read_safetensors, path)


@FUZZ
@given(text=HOSTILE_JSON_TEXT)
def test_hostile_json_in_safetensors_header(tmp_path_factory, text):
    blob = text.encode("utf-8", "surrogatepass")
    path = _write(tmp_path_factory.getbasetemp() / "json.safetensors", struct.pack("<Q", len(blob)) + blob)
    expect_clean("safetensors header", read_safetensors, path)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _edit(obj, path: list, value, delete: bool):
    """Set (or delete) obj[path...]; missing intermediate objects are created."""
    *parents, last = path
    for key in parents:
        if not isinstance(obj.get(key), dict):
            obj[key] = {}
        obj = obj[key]
    if delete:
        obj.pop(last, None)
    else:
        obj[last] = value


CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
               "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype", "hidden_act",
               "num_local_experts", "num_experts_per_tok", "model_type", ["rope_scaling"],
               ["rope_scaling", "rope_type"], ["rope_scaling", "factor"], ["rope_scaling", "beta_fast"],
               ["rope_scaling", "original_max_position_embeddings"], ["rope_scaling", "low_freq_factor"],
               ["rope_scaling", "high_freq_factor"], ["rope_scaling", "attention_factor"], ["rope_scaling", "mscale"]]
TOKENIZER_CONFIG_KEYS = ["bos_token", "eos_token", "chat_template", ["bos_token", "content"], "added_tokens_decoder"]
INDEX_KEYS = ["weight_map", ["weight_map", "model.embed_tokens.weight"], ["weight_map", "model.norm.weight"],
              "metadata"]
JSON_FILES = {"config.json": CONFIG_KEYS, "tokenizer_config.json": TOKENIZER_CONFIG_KEYS,
              "model.safetensors.index.json": INDEX_KEYS}
EDIT = st.tuples(st.sampled_from(sorted(JSON_FILES)), st.integers(0, 1000), JSON, st.booleans())


def _apply_json_edits(model_dir: Path, edits, replace_text=None) -> None:
    for fname, k, value, delete in edits:
        path = model_dir / fname
        if not path.is_file():
            continue
        keys = JSON_FILES[fname][k % len(JSON_FILES[fname])]
        data = json.loads(path.read_text())
        _edit(data, keys if isinstance(keys, list) else [keys], value, delete and k % 3 == 0)
        path.write_text(json.dumps(data))
    if replace_text is not None:
        fname, text = replace_text
        if (model_dir / fname).is_file():
            (model_dir / fname).write_text(text, encoding="utf-8", errors="surrogatepass")


@FUZZ
@example(edits=[("config.json", 0, [{}], False)], sharded=False)  # found: unhashable architecture, TypeError
@example(edits=[("config.json", 6, "32", False)], sharded=False)  # found: int("abc")-style ValueError
@example(edits=[("config.json", 3, 10 ** 9, False)], sharded=True)  # found: 10^9 tensor names, out of memory
@example(edits=[("model.safetensors.index.json", 1, "\0.safetensors", False)], sharded=True)  # found: ValueError
@given(edits=st.lists(EDIT, min_size=1, max_size=3), sharded=st.booleans())
def test_generated_model_metadata(seeds, tmp_path_factory, edits, sharded):
    model_dir = _copy_model(seeds["sharded" if sharded else "hf"], tmp_path_factory.getbasetemp() / "edited")
    _apply_json_edits(model_dir, edits)
    expect_clean("model json", read_model, model_dir)


@FUZZ
@given(fname=st.sampled_from(sorted(JSON_FILES) + ["tokenizer.json"]), text=HOSTILE_JSON_TEXT)
def test_hostile_json_in_model_files(seeds, tmp_path_factory, fname, text):
    model_dir = _copy_model(seeds["sharded"], tmp_path_factory.getbasetemp() / "hostile")
    _apply_json_edits(model_dir, [], (fname, text))
    expect_clean("model json", read_model, model_dir)


@FUZZ
@given(ops=st.lists(MUTATION, min_size=1, max_size=3),
       fname=st.sampled_from(["tokenizer.json", "config.json", "model.safetensors"]))
def test_mutated_model_files(seeds, tmp_path_factory, ops, fname):
    model_dir = _copy_model(seeds["hf"], tmp_path_factory.getbasetemp() / "bytes")
    data = (model_dir / fname).read_bytes()
    fields, hot = safetensors_fields(data) if fname.endswith(".safetensors") else ([], len(data))
    (model_dir / fname).write_bytes(mutate(data, ops, fields, hot))
    expect_clean("model bytes", read_model, model_dir)


QUANT_KEYS = [["quantization_config", k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act",
                                                    "version", "zero_point", "lm_head", "kanana_quant")]
QUANT_KEYS += [["quantization_config", "kanana_quant", k] for k in ("method", "sym", "lm_head")]


@FUZZ
@example(edits=[(8, 1, False)], ops=[])  # found: "kanana_quant": 1 raised AttributeError
@example(edits=[(2, 0, False)], ops=[])  # group_size 0: a division by zero waiting to happen
@given(edits=st.lists(st.tuples(st.integers(0, 1000), JSON, st.booleans()), min_size=1, max_size=3),
       ops=st.lists(MUTATION, max_size=2))
def test_generated_quantized_checkpoints(seeds, tmp_path_factory, edits, ops):
    model_dir = _copy_model(seeds["quantized"], tmp_path_factory.getbasetemp() / "quantized")
    config = json.loads((model_dir / "config.json").read_text())
    for k, value, delete in edits:
        _edit(config, QUANT_KEYS[k % len(QUANT_KEYS)], value, delete and k % 3 == 0)
    (model_dir / "config.json").write_text(json.dumps(config))
    data = (model_dir / "model.safetensors").read_bytes()
    fields, hot = safetensors_fields(data)
    (model_dir / "model.safetensors").write_bytes(mutate(data, ops, fields, hot))
    expect_clean("quantized checkpoint", read_model, model_dir)


# GGUF metadata values of every type, swapped into a valid file's metadata: where the byte-level mutations
# rarely reach (a string where an id belongs, an array where a number belongs, an empty vocabulary).
GGUF_VALUE = st.one_of(
    st.tuples(st.just(4), st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just(5), st.integers(-(1 << 31), (1 << 31) - 1)),
    st.tuples(st.just(10), st.sampled_from(BOUNDARY)),
    st.tuples(st.just(6), st.floats(width=32, allow_nan=True)),
    st.tuples(st.just(7), st.booleans()),
    st.tuples(st.just(8), st.sampled_from(["", "gpt2", "llama", "yarn", "linear", "none", "default", "llama3",
                                           "a b", "<|x|>", "🙂", "\0"])),
    st.tuples(st.just(9), st.tuples(st.just(8), st.lists(st.sampled_from(["a", "b", "a b", "", " ", "<|eot_id|>"]),
                                                         max_size=4))),
    st.tuples(st.just(9), st.tuples(st.sampled_from([4, 5, 6, 10]), st.lists(st.integers(0, 4), max_size=4))),
)
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
               12: "<d"}


def _gstr(text) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def encode_gguf_value(vtype: int, value) -> bytes:
    if vtype == 8:
        return _gstr(value)
    if vtype == 9:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(
            _gstr(x) if itype == 8 else struct.pack(_SCALAR_FMT[itype], x) for x in items)
    return struct.pack(_SCALAR_FMT[vtype], value)


def split_gguf(data: bytes) -> tuple[list[tuple[str, bytes]], bytes, int]:
    """A valid GGUF (default alignment) as [(key, encoded type + value)], its tensor-info bytes and the
    offset of its data section."""
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos, kvs = 24, []
    for _ in range(n_kv):
        end = _skip_kv(data, pos)
        key_len = struct.unpack_from("<Q", data, pos)[0]
        kvs.append((data[pos + 8:pos + 8 + key_len].decode(), data[pos + 8 + key_len:end]))
        pos = end
    header_end = gguf_fields(data)[-1][0] + 8
    return kvs, data[pos:header_end], header_end + (-header_end % 32)


def _skip_kv(data: bytes, pos: int) -> int:
    pos += 8 + struct.unpack_from("<Q", data, pos)[0]
    vtype = struct.unpack_from("<I", data, pos)[0]
    pos += 4
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
    if vtype == 9:
        itype, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if itype != 8:
            return pos + count * struct.calcsize(_SCALAR_FMT[itype])
        for _ in range(count):
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        return pos
    return pos + struct.calcsize(_SCALAR_FMT[vtype])


def join_gguf(kvs, tensor_infos: bytes, n_tensors: int, tensor_data: bytes, alignment: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    head += b"".join(_gstr(k) + v for k, v in kvs) + tensor_infos
    return head + b"\0" * (-len(head) % alignment) + tensor_data


@FUZZ
@example(edits=[(0, (8, "a b"), "add")])  # found: a string bos id raised TypeError
@example(edits=[(7, (10, 1 << 40), "add")])  # found: block_count 2^40 built a list of 10^12 names
@example(edits=[(8, (9, (4, [1, 2])), "add")])  # found: numeric merges raised AttributeError
@example(edits=[(9, (4, 7), "add")])  # found: a scalar token_type raised TypeError
@example(edits=[(4, (9, (8, ["a"])), "add")])  # found: an array as pre-tokenizer name, unhashable
@given(edits=st.lists(st.tuples(st.integers(0, 1000), GGUF_VALUE, st.sampled_from(["set", "drop", "add"])),
                      min_size=1, max_size=3))
def test_generated_gguf_metadata(seeds, tmp_path_factory, edits):
    data = seeds["gguf"].read_bytes()
    kvs, infos, data_offset = split_gguf(data)
    n_tensors = struct.unpack_from("<Q", data, 8)[0]
    extra = ["tokenizer.ggml.bos_token_id", "general.alignment", "llama.rope.scaling.type", "llama.expert_count",
             "tokenizer.ggml.pre", "llama.rope.scaling.factor", "tokenizer.ggml.add_eos_token", "llama.block_count",
             "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens"]
    for k, (vtype, value), how in edits:
        if how == "drop" and kvs:
            del kvs[k % len(kvs)]
            continue
        encoded = struct.pack("<I", vtype) + encode_gguf_value(vtype, value)
        if how == "add":
            key = extra[k % len(extra)]
            kvs = [kv for kv in kvs if kv[0] != key] + [(key, encoded)]
        elif kvs:
            kvs[k % len(kvs)] = (kvs[k % len(kvs)][0], encoded)
    blob = join_gguf(kvs, infos, n_tensors, data[data_offset:])
    path = _write(tmp_path_factory.getbasetemp() / "generated.gguf", blob)
    expect_clean("gguf metadata", read_gguf, path)


TENSOR_INFO = st.tuples(st.text(max_size=6), st.lists(st.one_of(st.integers(0, 70), HUGE_INT), max_size=5),
                        st.integers(0, 40) | st.sampled_from([1 << 31, (1 << 32) - 1]),
                        st.integers(0, 300) | HUGE_INT)


@FUZZ
@given(infos=st.lists(TENSOR_INFO, max_size=4), n_declared=st.one_of(st.none(), HUGE_INT),
       data_size=st.integers(0, 600), version=st.sampled_from([2, 3, 1, 0x03000000]))
def test_generated_gguf_tensor_tables(tmp_path_factory, infos, n_declared, data_size, version):
    table = b""
    for name, dims, ggml_type, offset in infos:
        table += _gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d & (2 ** 64 - 1))
                                                                         for d in dims)
        table += struct.pack("<IQ", ggml_type, offset & (2 ** 64 - 1))
    n_tensors = len(infos) if n_declared is None else n_declared & (2 ** 64 - 1)
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, 0) + table
    blob = head + b"\0" * (-len(head) % 32) + bytes(data_size)
    path = _write(tmp_path_factory.getbasetemp() / "table.gguf", blob)
    from kanana_quant.gguf.header import read_gguf_header

    expect_clean("gguf tensor table", read_gguf_header, path)


def test_every_target_ran(seeds):
    """The fuzz tests above counted their inputs (a target that silently skipped would show 0)."""
    report = os.environ.get("KQ_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"tried": dict(TRIED),
                                            "outcomes": {f"{t}/{o}": n for (t, o), n in OUTCOMES.items()}}))
    if TRIED:  # when the whole module ran (not a -k selection)
        assert all(n >= min(EXAMPLES, 20) for n in TRIED.values()), TRIED
        # Byte mutations must neither all be rejected nor all load: both outcomes were exercised.
        assert OUTCOMES.get(("gguf bytes", "ok"), 0) > 0 and OUTCOMES.get(("gguf bytes", "error"), 0) > 0, OUTCOMES
