"""Open a MODEL argument as config + lazily read weights + tokenizer, whatever its format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kanana_quant.checkpoint import HFCheckpoint
from kanana_quant.config import ModelConfig, load_config
from kanana_quant.errors import KananaQuantError
from kanana_quant.exporters.onnx_sidecar import OnnxExport, is_onnx_export
from kanana_quant.hub import resolve_model
from kanana_quant.qcheckpoint import QuantizedCheckpoint
from kanana_quant.tokenizer import Tokenizer
from kanana_quant.weights import Weights


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    weights: Weights  # an ONNX export's only give config and sizes: its weights run in onnxruntime
    tokenizer: Tokenizer


def open_checkpoint(path: Path) -> Weights:
    """The weights of a model: a GGUF file, an ONNX export directory, or a directory (quantized when
    config.json has quantization_config)."""
    if path.is_file():
        if path.suffix == ".gguf":
            from kanana_quant.gguf.reader import GGUFCheckpoint

            return GGUFCheckpoint(path)
        raise KananaQuantError(f"{path}: not a .gguf file; pass a GGUF file or a Hugging Face model directory")
    if is_onnx_export(path):
        return OnnxExport(path)
    config = load_config(path)
    if "quantization_config" in config.raw:
        return QuantizedCheckpoint(path, config)
    return HFCheckpoint(path, config)


def open_model(spec: str) -> LoadedModel:
    path = resolve_model(spec)
    weights = open_checkpoint(path)
    if path.is_file():  # a GGUF carries its tokenizer in its metadata
        from kanana_quant.gguf.reader import GGUFCheckpoint

        assert isinstance(weights, GGUFCheckpoint)
        tokenizer = weights.tokenizer()
    else:
        tokenizer = Tokenizer.from_dir(path, extra_eos_ids=weights.config.eos_token_ids)
    return LoadedModel(path, weights.config, weights, tokenizer)
