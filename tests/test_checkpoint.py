"""safetensors reading/writing against the reference `safetensors` package and torch, sharding, atomicity."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from kanana_quant.checkpoint import HFCheckpoint, save_checkpoint
from kanana_quant.errors import KananaQuantError
from kanana_quant.names import hf_name_map
from kanana_quant.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors
from kanana_quant.synth import TINY, synth_model


def test_reader_matches_reference_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
               "c": rng.integers(-9, 9, (2, 2, 2)).astype(np.int32), "empty": np.zeros((0, 4), np.float32)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    ours = SafetensorsFile(tmp_path / "x.safetensors")
    assert ours.metadata == {"k": "v"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours.raw(name), value)
        assert ours.raw(name).dtype == value.dtype


def test_writer_output_reads_back_with_reference_package_and_torch_bf16(tmp_path):
    rng = np.random.default_rng(1)
    values = {"w": (rng.standard_normal((4, 6)) * 3).astype(np.float32), "i": np.arange(6, dtype=np.int32)}
    values["w"][0, :3] = [np.nan, np.inf, 1 + 2 ** -8]  # specials and a round-to-even tie
    specs = [TensorSpec("w", "BF16", (4, 6)), TensorSpec("w16", "F16", (4, 6)), TensorSpec("i", "I32", (6,))]
    source = {"w": values["w"], "w16": values["w"], "i": values["i"]}
    write_safetensors(tmp_path / "y.safetensors", specs, lambda s: source[s.name])
    with safe_open(tmp_path / "y.safetensors", framework="pt") as f:
        expected = torch.from_numpy(values["w"]).to(torch.bfloat16)
        got = f.get_tensor("w")
        exact = dict(rtol=0, atol=0, equal_nan=True)  # bit-exact except NaN payloads, which may differ
        torch.testing.assert_close(got, expected, **exact)
        torch.testing.assert_close(f.get_tensor("w16"), torch.from_numpy(values["w"]).half(), **exact)
        assert torch.equal(f.get_tensor("i"), torch.from_numpy(values["i"]))
    ours = SafetensorsFile(tmp_path / "y.safetensors")
    np.testing.assert_array_equal(ours.get("w"), got.float().numpy())


def test_sharded_checkpoint_reads_like_single_file(tmp_path):
    single = synth_model(tmp_path / "single", TINY["moe"], seed=3)
    ckpt = HFCheckpoint(single)
    specs = [TensorSpec(hf, "F32", ckpt.get(name).shape) for name, hf in hf_name_map(ckpt.config).items()]
    to_name = {hf: name for name, hf in hf_name_map(ckpt.config).items()}
    files = {"config.json": (single / "config.json").read_text()}
    sharded = save_checkpoint(tmp_path / "sharded", specs, lambda s: ckpt.get(to_name[s.name]), files,
                              max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    other = HFCheckpoint(sharded)
    for name in ckpt.names:
        np.testing.assert_array_equal(other.get(name), ckpt.get(name))
    layer = other.layer(1)
    assert set(layer) >= {"q", "router", "experts.7.down"} and len(layer) == 6 + 1 + 8 * 3


def test_layer_reads_only_that_layer(tmp_path):
    raw = {**TINY["dense"], "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8}
    ckpt = HFCheckpoint(synth_model(tmp_path / "m", raw))
    layer_bytes = sum(a.nbytes for a in ckpt.layer(0).values())
    tracemalloc.start()
    ckpt.layer(5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ckpt.nbytes() > 7 * layer_bytes
    assert peak < 2 * layer_bytes


def test_shard_outside_model_dir_is_refused(tiny_dense, tmp_path):
    for f in tiny_dense.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    names = SafetensorsFile(tmp_path / "model.safetensors").tensors
    weight_map = {n: "../../etc/model.safetensors" for n in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(KananaQuantError, match="outside the model directory"):
        HFCheckpoint(tmp_path)


def _corrupt(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda: b"\x01\x02", "truncated"),
    (lambda: struct.pack("<Q", 1 << 62) + b"{}", "header length"),
    (lambda: struct.pack("<Q", 4) + b"{]]]", "not JSON"),
    (lambda: _header({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}), "outside the file"),
    (lambda: _header({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, 16), "do not hold"),
    (lambda: _header({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, 1), "unsupported dtype"),
    (lambda: _header({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4), "shape"),
    (lambda: _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12), "overlap"),
])
def test_corrupt_safetensors_fail_with_one_line(tmp_path, make, message):
    path = _corrupt(tmp_path / "bad.safetensors", make())
    with pytest.raises(KananaQuantError, match=message) as err:
        SafetensorsFile(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def _header(header: dict, data_bytes: int = 0) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + b"\0" * data_bytes


def test_pickle_only_directory_is_refused(tiny_dense, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dense / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(KananaQuantError, match="never loads"):
        HFCheckpoint(tmp_path)


def test_shape_mismatch_with_config_is_refused(tiny_dense, tmp_path):
    for f in tiny_dense.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KananaQuantError, match="do not match"):
        HFCheckpoint(tmp_path)


def test_failed_write_leaves_nothing(tmp_path):
    def produce(spec):
        if spec.name == "b":
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write
        return np.zeros(spec.shape, np.float32)

    specs = [TensorSpec("a", "F32", (8,)), TensorSpec("b", "F32", (8,))]
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "out", specs, produce, {"config.json": "{}"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path / "x.safetensors", specs, produce)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(tiny_dense):
    with pytest.raises(KananaQuantError, match="already exists"):
        save_checkpoint(tiny_dense, [], lambda s: None)
