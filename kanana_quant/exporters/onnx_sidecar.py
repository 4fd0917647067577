"""The ONNX export directory: its file names and the `genai_config.json` sidecar (what a runtime needs
besides the graph: shapes, KV-cache names, context length, eos ids, tokenizer files, chat template).

Kept free of onnx / onnxruntime imports so `open_model` and `info` can recognise an export cheaply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kanana_quant import names
from kanana_quant.config import ModelConfig, load_config
from kanana_quant.errors import KananaQuantError, read_json_object

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SIDECAR = "genai_config.json"
FORMAT = "kanana-quant-onnx"
FORMAT_VERSION = 1

# Graph input / output names (onnxruntime-genai's conventions).
INPUT_IDS = "input_ids"
LOGITS_INDEX = "logits_index"  # int64 [N]: positions of the chunk whose logits are computed
SEQLENS_K = "seqlens_k"
TOTAL_LENGTH = "total_sequence_length"
LOGITS = "logits"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def is_onnx_export(path: str | Path) -> bool:
    """True for a directory written by `kanana-quant export onnx` (sidecar + graph present)."""
    path = Path(path)
    return path.is_dir() and (path / SIDECAR).is_file() and (path / MODEL_FILE).is_file()


def read_sidecar(path: str | Path) -> dict:
    path = Path(path)
    sidecar = read_json_object(path / SIDECAR, 1 << 20)
    ours = sidecar.get("kanana_quant")
    if not isinstance(ours, dict) or ours.get("format") != FORMAT:
        raise KananaQuantError(f"{path / SIDECAR}: not a kanana-quant ONNX export sidecar; re-export with "
                               "`kanana-quant export onnx`")
    if ours.get("version") != FORMAT_VERSION:
        raise KananaQuantError(f"{path / SIDECAR}: export format version {ours.get('version')!r}, this kanana-quant "
                               f"reads {FORMAT_VERSION}; re-export with `kanana-quant export onnx`")
    return sidecar


class OnnxExport:
    """An export directory seen as a model: config, sidecar and sizes. Its weights live in the ONNX graph and
    run only in onnxruntime (`--engine onnxruntime`). Implements weights.Weights; reading a tensor fails
    with one line."""

    format = None  # not a quantized HF checkpoint (the quantization is described in the sidecar)

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.sidecar = read_sidecar(self.dir)
        self.config: ModelConfig = load_config(self.dir)

    @property
    def names(self) -> list[str]:
        return names.canonical_names(self.config)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in (self.dir / MODEL_FILE, self.dir / DATA_FILE) if p.is_file())

    def is_quantized(self, name: str) -> bool:
        return False

    def _graph_only(self) -> KananaQuantError:
        return KananaQuantError(f"{self.dir}: is an ONNX export; its weights run only in onnxruntime "
                                "(use --engine onnxruntime), or pass the source model instead")

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        raise self._graph_only()

    def layer(self, index: int, dtype=np.float32) -> dict[str, np.ndarray]:
        raise self._graph_only()

    def dtype(self, name: str) -> str:
        raise self._graph_only()

    def raw(self, name: str) -> np.ndarray:
        raise self._graph_only()

    def close(self) -> None:
        pass
