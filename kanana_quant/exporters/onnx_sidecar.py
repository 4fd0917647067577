"""The ONNX export directory: its file names, the graph's inputs and outputs, `genai_config.json` (what
onnxruntime-genai reads: shapes, KV-cache names, context length, eos ids; only keys its schema accepts) and
`kanana_quant.json` (our own metadata: format version, source, quantization, ops, lm_head).

The graph contract is onnxruntime-genai's (its model builder's decoders): `input_ids` int64 [batch, seq],
`attention_mask` int64 [batch, total] (right-padded batches: a row's tokens first, then zeros), past / present
KV per layer [batch, kv_heads, cache, head_dim] sharing one buffer, `logits` [batch, seq, vocab]; seqlens and
the total length are computed inside the graph from the mask. One optional input is ours: `logits_to_keep`
(int64 [1], default 0 = every position; k > 0 = the last k positions), which genai leaves at its default and
our engine sets to 1 for prefill, so a 128K-vocabulary head does not run over a whole prompt.

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
SIDECAR = "genai_config.json"  # onnxruntime-genai's config: nothing else may go in it
METADATA = "kanana_quant.json"  # ours
FORMAT = "kanana-quant-onnx"
# 1: seqlens_k / total_sequence_length / logits_index inputs, metadata inside genai_config.json (genai refused it)
# 2: onnxruntime-genai's contract (attention_mask in, seqlens inside, symbolic batch), metadata in METADATA
FORMAT_VERSION = 2

# Graph input / output names (onnxruntime-genai's conventions).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS_TO_KEEP = "logits_to_keep"  # optional, ours: int64 [1]; 0 = all positions, k = the last k
LOGITS = "logits"
# An embedding model's graph (no KV cache, no lm_head): right-padded int64 [batch, seq] inputs, pooled output.
POOL_MASK = "pool_mask"  # 1 where a token counts in the mean (0 for padding and a query's instruction prefix)
ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, POOL_MASK)
EMBEDDINGS = "embeddings"  # float32 [batch, hidden]


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def is_onnx_export(path: str | Path) -> bool:
    """True for a directory written by `kanana-quant export onnx`, this version's or an older one (graph plus
    our metadata file, or an older export's sidecar), so that opening an old one says to re-export."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_FILE).is_file() and ((path / METADATA).is_file() or
                                                                (path / SIDECAR).is_file())


REEXPORT = "re-export it with `kanana-quant export onnx SRC -o DIR`"


def read_metadata(path: str | Path) -> dict:
    """Our metadata of an export (kanana_quant.json), checked: one line for anything else, naming what to do."""
    path = Path(path)
    if not (path / METADATA).is_file():
        sidecar = read_json_object(path / SIDECAR, 1 << 20) if (path / SIDECAR).is_file() else {}
        if isinstance(sidecar.get("kanana_quant"), dict):
            raise KananaQuantError(f"{path}: an ONNX export of an older kanana-quant (format 1, which onnxruntime-genai "
                                   f"cannot run and this version's engine does not read); {REEXPORT}")
        raise KananaQuantError(f"{path}: not a kanana-quant ONNX export (no {METADATA}); {REEXPORT}")
    ours = read_json_object(path / METADATA, 1 << 20)
    if ours.get("format") != FORMAT:
        raise KananaQuantError(f"{path / METADATA}: not a kanana-quant ONNX export's metadata; {REEXPORT}")
    if ours.get("version") != FORMAT_VERSION:
        raise KananaQuantError(f"{path / METADATA}: export format version {ours.get('version')!r}, this kanana-quant "
                               f"reads {FORMAT_VERSION}; {REEXPORT}")
    return ours


def read_sidecar(path: str | Path) -> dict:
    """genai_config.json of an export whose metadata checks out."""
    path = Path(path)
    read_metadata(path)
    sidecar = read_json_object(path / SIDECAR, 1 << 20)
    if not isinstance(sidecar.get("model"), dict):
        raise KananaQuantError(f"{path / SIDECAR}: no \"model\" section; {REEXPORT}")
    return sidecar


class OnnxExport:
    """An export directory seen as a model: config, sidecar and sizes. Its weights live in the ONNX graph and
    run only in onnxruntime (`--engine onnxruntime`). Implements weights.Weights; reading a tensor fails
    with one line."""

    format = None  # not a quantized HF checkpoint (the quantization is described in the sidecar)

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.metadata = read_metadata(self.dir)
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
