"""Hugging Face checkpoints: lazy reading by canonical tensor name, one tensor or one layer at a time,
and streaming, sharded, atomic writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from kanana_quant import names
from kanana_quant.atomic import atomic_dir, ensure_free_space
from kanana_quant.config import ModelConfig, load_config
from kanana_quant.errors import KananaQuantError, confined, parse_json, read_text
from kanana_quant.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors

if TYPE_CHECKING:
    from kanana_quant.qcheckpoint import QuantFormat

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_INDEX_BYTES = 64 << 20
DEFAULT_SHARD_BYTES = 4 << 30


class HFCheckpoint:
    """A Hugging Face model directory (config.json + safetensors), read lazily through mmap.

    Tensors are addressed by canonical name (see names.py); every expected tensor is checked for presence
    and shape from the headers alone when the checkpoint is opened. Implements weights.Weights.
    """

    format: QuantFormat | None = None  # float weights; QuantizedCheckpoint sets its format

    def __init__(self, model_dir: str | Path, config: ModelConfig | None = None):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise KananaQuantError(f"{self.dir}: not a directory; pass a Hugging Face model directory")
        self.config = config or load_config(self.dir)
        self._files: dict[str, SafetensorsFile] = {}
        self._where = self._weight_map()  # HF name -> shard file name
        self.moe_layout = names.moe_layout(self.config, self._where)
        self._hf = names.hf_name_map(self.config, self.moe_layout)
        if self.config.embedding and names.GLOBAL_HF["embed"] not in self._where:
            # a bare LlamaModel's save_pretrained has no "model." prefix (Kanana2VecModel's does)
            self._hf = {k: v.removeprefix("model.") for k, v in self._hf.items()}
        self._check_tensors()

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            data = parse_json(read_text(confined(self.dir, INDEX_FILE, str(self.dir)), MAX_INDEX_BYTES), str(index))
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise KananaQuantError(f"{index}: corrupt index (no weight_map of tensor -> file); "
                                       "re-download the model")
            for shard in set(weight_map.values()):
                self._confined(shard, index)
            return weight_map
        single = self.dir / SINGLE_FILE
        if single.is_file():
            return {name: SINGLE_FILE for name in self._file(SINGLE_FILE).tensors}
        pickled = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise KananaQuantError(
                f"{self.dir}: only pickle weights ({pickled[0]}), which kanana-quant never loads because "
                "unpickling can run code; convert them to safetensors first (transformers: "
                "model.save_pretrained(dir, safe_serialization=True))")
        raise KananaQuantError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}; not a safetensors checkpoint")

    def _confined(self, shard: str, index: Path) -> Path:
        if not shard.endswith(".safetensors"):
            raise KananaQuantError(f"{index}: shard {shard[:80]!r} is not a .safetensors file; refusing it")
        return confined(self.dir, shard, str(index))

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            path = confined(self.dir, shard, str(self.dir))
            if not path.is_file():
                raise KananaQuantError(f"{path}: shard listed in the index is missing; re-download the model")
            self._files[shard] = SafetensorsFile(path)
        return self._files[shard]

    def _file_of(self, hf: str) -> SafetensorsFile:
        shard = self._where.get(hf)
        if shard is None:
            raise KananaQuantError(f"{self.dir}: tensor {hf!r} is missing from the checkpoint")
        file = self._file(shard)
        if hf not in file.tensors:
            raise KananaQuantError(f"{file.path}: tensor {hf!r} is listed in the index but not in the file")
        return file

    def _locate(self, name: str):
        hf = self._hf[name]
        return self._file_of(hf), hf

    def _check_tensors(self) -> None:
        for name in self._hf:
            self._check_one(name)

    def _check_one(self, name: str) -> None:
        file, hf = self._locate(name)
        info = file.tensors[hf]
        expected = names.tensor_shape(self.config, name)
        if info.shape != expected:
            raise KananaQuantError(f"{file.path}: tensor {hf!r} has shape {list(info.shape)}, config.json "
                                   f"implies {list(expected)}; the config and weights do not match")
        if info.dtype not in ("F32", "F16", "BF16"):
            raise KananaQuantError(f"{file.path}: tensor {hf!r} has dtype {info.dtype}; expected a float")

    def is_quantized(self, name: str) -> bool:
        return False

    @property
    def names(self) -> list[str]:
        return list(self._hf)

    def dtype(self, name: str) -> str:
        file, hf = self._locate(name)
        return file.tensors[hf].dtype

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor by canonical name, converted to `dtype` (read from the mapped file on demand)."""
        file, hf = self._locate(name)
        return file.get(hf, dtype)

    def raw(self, name: str) -> np.ndarray:
        """One tensor as stored (BF16 as uint16 bits): a view of the mapped file, for copying it unchanged."""
        file, hf = self._locate(name)
        return file.raw(hf)

    def layer(self, index: int, dtype=np.float32) -> dict[str, np.ndarray]:
        """All tensors of decoder layer `index`, keyed by role."""
        return {role: self.get(f"layers.{index}.{role}", dtype) for role in names.layer_roles(self.config)}

    def nbytes(self) -> int:
        """Bytes of all tensor data in the checkpoint's files."""
        return sum(t.end - t.start for shard in set(self._where.values()) for t in self._file(shard).tensors.values())

    def close(self) -> None:
        for file in self._files.values():
            file.close()


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def save_checkpoint(out_dir: str | Path, specs: Iterable[TensorSpec], produce: Callable[[TensorSpec], np.ndarray],
                    files: dict[str, str] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    overwrite: bool = False, on_tensor: Callable[[TensorSpec], None] | None = None) -> Path:
    """Write a sharded safetensors checkpoint plus small text files (config.json, tokenizer, ...) to
    `out_dir`, streaming: `produce(spec)` is called once per tensor, in order. The directory appears only
    when complete."""
    specs = list(specs)
    out_dir = Path(out_dir)
    total = sum(s.nbytes for s in specs)
    ensure_free_space(out_dir.parent, total, f"writing {out_dir.name}")

    def produce_and_report(spec: TensorSpec) -> np.ndarray:
        array = produce(spec)
        if on_tensor:
            on_tensor(spec)
        return array

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        shards = plan_shards(specs, max_shard_bytes)
        if len(shards) == 1:
            write_safetensors(tmp / SINGLE_FILE, shards[0], produce_and_report, {"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, shard, produce_and_report, {"format": "pt"})
                weight_map.update({s.name: fname for s in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        for fname, text in (files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
    return out_dir
