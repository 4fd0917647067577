"""The shape of the code: lower layers never import higher ones, each fact is written once, and weights are
asked through their declared interface, not probed."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kanana_quant"
SOURCES = {str(p.relative_to(PACKAGE)): p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}


def _where(pattern: str) -> list[str]:
    return sorted(name for name, text in SOURCES.items() if re.search(pattern, text))


def test_quantizers_never_import_exporters_and_runtimes_never_import_quantizers():
    quant = {n: t for n, t in SOURCES.items() if n.startswith("quant/")}
    assert quant and not [n for n, t in quant.items() if re.search(r"kanana_quant(\.| import )exporters", t)]
    runtimes = {n: t for n, t in SOURCES.items() if n.startswith("runtimes/")}
    assert runtimes and not [n for n, t in runtimes.items() if re.search(r"kanana_quant(\.| import )quant\b", t)]


def test_each_fact_is_defined_once():
    # Llama-3 RoPE scaling: the blend between the low- and high-frequency bands
    assert _where(r"\(1 - smooth\) / factor \+ smooth") == ["rope.py"]
    # the Q/K row permutation of llama.cpp's converter
    assert _where(r"reshape\(n_head, 2,") == ["gguf/names.py"]
    # the Llama-3 pre-tokenizer regex (its 1-3 digit numbers) and the Split + ByteLevel sequence built from it
    assert _where(r"\\p\{N\}\{1,3\}") == ["gguf/vocab.py"]
    assert _where(r"pre_tokenizers\.Split\(") == ["gguf/vocab.py"]
    # the bit widths a checkpoint stores, and the files that travel with a model
    assert _where(r"\(2, 3, 4, 8\)") == ["quant/packing.py"]
    assert _where(r'"tokenizer_config\.json", "special_tokens_map\.json"') == ["tokenizer.py"]
    # what -1 means as a group size
    assert _where(r"group_size == -1|group_size != -1|== -1 else") == []


def test_weights_are_never_probed():
    assert _where(r"(getattr|hasattr)\([\w.]*(weights|ckpt|checkpoint|source|src)\b") == []


def test_every_weights_class_declares_the_interface():
    from kanana_quant.checkpoint import HFCheckpoint
    from kanana_quant.exporters.onnx_sidecar import OnnxExport
    from kanana_quant.gguf.reader import GGUFCheckpoint
    from kanana_quant.qcheckpoint import QuantizedCheckpoint
    from kanana_quant.weights import QuantizedWeights, Weights

    # every method and property, and `format` (None on float weights); `config` is set per instance
    members = [m for m in vars(Weights) if not m.startswith("_")] + ["format"]
    for cls in (HFCheckpoint, QuantizedCheckpoint, GGUFCheckpoint, OnnxExport):
        missing = [m for m in members if not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
        assert "Weights" in (cls.__doc__ or ""), f"{cls.__name__} does not say it implements weights.Weights"
    assert hasattr(QuantizedCheckpoint, "qtensor") and "qtensor" in vars(QuantizedWeights)
