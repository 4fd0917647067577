"""The interface every model's weights share, whatever the file: a Hugging Face directory (checkpoint.py),
our quantized checkpoint (qcheckpoint.py), a GGUF file (gguf/reader.py) or an ONNX export (onnx_sidecar.py).

Tensors are addressed by canonical name (names.py) and read lazily, one at a time. Runtimes, quantizers and
writers take a `Weights` and ask it; they never probe for methods. Quantized weights add their format and
the packed integer codes of each quantized tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from kanana_quant.config import ModelConfig

if TYPE_CHECKING:
    from kanana_quant.qcheckpoint import QTensor, QuantFormat


class Weights(Protocol):
    config: ModelConfig
    # How the weights are quantized (QuantizedWeights), or None: get() returns the weights themselves.
    format: QuantFormat | None

    @property
    def names(self) -> list[str]:
        """Every canonical tensor name the model has."""

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor in Hugging Face layout, converted to `dtype` (dequantized if need be)."""

    def layer(self, index: int, dtype=np.float32) -> dict[str, np.ndarray]:
        """Every tensor of decoder layer `index`, keyed by role ("q", "experts.3.down", ...)."""

    def dtype(self, name: str) -> str:
        """The safetensors dtype ("F32", "F16", "BF16") a float copy of the tensor is written in."""

    def raw(self, name: str) -> np.ndarray:
        """The tensor in dtype(name) without a float32 round trip where the file stores it so (BF16 as
        uint16 bits): for copying it unchanged into another checkpoint."""

    def is_quantized(self, name: str) -> bool:
        """Whether the tensor is stored as integer codes (then QuantizedWeights.qtensor reads them)."""

    def nbytes(self) -> int:
        """Bytes the tensors occupy in their files."""

    def close(self) -> None:
        """Unmap the files, giving back the pages read so far; the next read maps them again."""


class QuantizedWeights(Weights, Protocol):
    format: QuantFormat

    def qtensor(self, name: str, rows: slice = slice(None)) -> QTensor:
        """The packed codes, scales and zeros of a quantized tensor (optionally a block of output rows)."""

