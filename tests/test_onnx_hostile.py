"""Broken or hostile ONNX export directories fail with one line naming the file, never a traceback, and an
external-data path may not leave the export directory."""

from __future__ import annotations

import os
import shutil

import onnx
import pytest

from test_cli import cli


@pytest.fixture(scope="module")
def onnx_export(tiny_dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    result = cli("export", "onnx", tiny_dense, "-o", out)
    assert result.returncode == 0, result.stderr
    return out


def _truncate(path, fraction=0.5):
    os.truncate(path, int(path.stat().st_size * fraction))


def _escape(directory):
    (directory.parent / "secret.bin").write_bytes(b"not yours" * 1000)
    model = onnx.load(directory / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(model, directory / "model.onnx")


def _format_1(directory):
    """What `export onnx` wrote before onnxruntime-genai's contract: our metadata inside genai_config.json."""
    (directory / "kanana_quant.json").unlink()
    (directory / "genai_config.json").write_text('{"model": {}, "kanana_quant": {"format": "kanana-quant-onnx", '
                                                 '"version": 1}}')


@pytest.mark.parametrize("damage, message", [
    (lambda d: _truncate(d / "model.onnx.data"), "out of bounds"),
    (lambda d: _truncate(d / "model.onnx"), "onnxruntime cannot load it"),
    (lambda d: (d / "genai_config.json").write_text('{"model": ['), "genai_config.json: not valid JSON"),
    (lambda d: (d / "kanana_quant.json").write_text('{"format": ['), "kanana_quant.json: not valid JSON"),
    (lambda d: (d / "kanana_quant.json").write_text('{"format": "x"}'), "not a kanana-quant ONNX export"),
    (lambda d: (d / "kanana_quant.json").write_text('{"format": "kanana-quant-onnx", "version": 3}'),
     "export format version 3"),
    (lambda d: _format_1(d), "older kanana-quant (format 1"),
    (lambda d: _escape(d), "escapes model directory"),
])
def test_damaged_onnx_export_fails_with_one_line(onnx_export, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_export, broken)
    damage(broken)
    result = cli("generate", broken, "--prompt", "hi", "--max-tokens", 2)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
