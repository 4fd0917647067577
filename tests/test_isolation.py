"""Native engines run in child processes: logits cross the process boundary unchanged, a child that dies
of a signal becomes one error line, and the demo finishes without the engine that crashed. Also the llama.cpp
build check that keeps AMX builds from crashing (llama.cpp #20824), whichever CPU runs the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_TEXT
from kanana_quant.gguf.writer import export_gguf
from kanana_quant.exporters.onnx import export_onnx
from kanana_quant.loader import open_model
from kanana_quant.runtimes import llamacpp_engine
from kanana_quant.runtimes.engines import open_engine
from kanana_quant.errors import EngineCrashed
from kanana_quant.runtimes.isolated import IsolatedEngine
from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine
from kanana_quant.runtimes.onnx_engine import OnnxEngine

# Loaded by every Python process started with this folder on PYTHONPATH, before its main module: in the
# engine children it replaces the engine's forward by a real SIGSEGV, as a native fault would end them.
CRASH = """
import os, signal
_engine = os.environ.get("KANANA_TEST_CRASH")
if _engine:
    from kanana_quant.runtimes import {module} as m
    m.{cls}.forward = lambda *a, **k: os.kill(os.getpid(), signal.SIGSEGV)
"""
CLASSES = {"llama.cpp": ("llamacpp_engine", "LlamaCppEngine"), "onnxruntime": ("onnx_engine", "OnnxEngine")}


def crash_on_forward(folder: Path, engine: str) -> dict:
    """Environment in which `engine`'s children die of SIGSEGV at their first forward."""
    module, cls = CLASSES[engine]
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(CRASH.format(module=module, cls=cls))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
            "KANANA_TEST_CRASH": engine}


@pytest.fixture(scope="module")
def exports(model_dirs, tmp_path_factory):
    model = open_model(str(model_dirs("dense-tied")))
    out = tmp_path_factory.mktemp("isolated")
    return model, {"llama.cpp": export_gguf(model, out / "m.gguf", "Q8_0"),
                   "onnxruntime": export_onnx(model, out / "onnx").path}


@pytest.mark.parametrize("engine", ["llama.cpp", "onnxruntime"])
def test_isolated_engine_returns_the_in_process_logits(exports, engine):
    model, paths = exports
    loaded = open_model(str(paths[engine]))
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)[:20]
    isolated = open_engine(loaded, engine, max_seq_len=64, threads=1)
    inside = open_engine(loaded, engine, max_seq_len=64, threads=1, isolated=False)
    assert isinstance(isolated, IsolatedEngine) and isinstance(inside, (LlamaCppEngine, OnnxEngine))
    assert isolated.max_seq_len == inside.max_seq_len == 64 and engine in isolated.configuration
    for e in (isolated, inside):
        e.forward(ids[:12])
        e.forward(ids[12:16])
        e.pos = 8  # the rewind chat relies on
    assert np.array_equal(isolated.forward(ids[8:12], all_logits=True), inside.forward(ids[8:12], all_logits=True))
    assert isolated.pos == inside.pos == 12
    with pytest.raises(Exception, match="exceeds the model's 64"):  # the child's error, raised here
        isolated.forward(ids * 4)
    assert np.array_equal(isolated.forward(ids[12:13]), inside.forward(ids[12:13]))
    isolated.close()


@pytest.mark.parametrize("engine", ["llama.cpp", "onnxruntime"])
def test_child_killed_by_sigsegv_is_one_error_line(exports, tmp_path, monkeypatch, engine):
    model, paths = exports
    for key, value in crash_on_forward(tmp_path / "site", engine).items():
        monkeypatch.setenv(key, value)
    isolated = open_engine(open_model(str(paths[engine])), engine, max_seq_len=64, threads=1)
    with pytest.raises(EngineCrashed) as crash:
        isolated.forward([1, 2, 3])
    message = str(crash.value)
    assert message.startswith(f"{engine} crashed (signal SIGSEGV) running {paths[engine]}")
    assert "likely cause" in message and "\n" not in message


def test_demo_finishes_without_the_engine_that_crashed(tmp_path):
    env = crash_on_forward(tmp_path / "site", "llama.cpp")
    result = subprocess.run([sys.executable, "-m", "kanana_quant.cli", "demo", "--model", "tiny", "-o",
                             str(tmp_path / "demo"), "--max-tokens", "4", "--samples", "4", "--seq-len", "64"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert {line.split("│")[2].strip() for line in table[1:]} == {"numpy", "onnxruntime"}
    assert "llama.cpp skipped: llama.cpp crashed (signal SIGSEGV)" in " ".join(result.stdout.split())
    replies = [line for line in result.stdout.splitlines() if line.strip().startswith("→")]
    assert len(replies) == 2 * 3  # the float and quantized numpy runs and onnxruntime, two prompts each

    # onnxruntime is on the main path: its crash is still reported with the others' results, but fails the demo
    env = crash_on_forward(tmp_path / "site", "onnxruntime")
    result = subprocess.run([sys.executable, "-m", "kanana_quant.cli", "demo", "--model", "tiny", "-o",
                             str(tmp_path / "demo"), "--max-tokens", "4", "--samples", "4", "--seq-len", "64"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1
    assert "onnxruntime skipped: onnxruntime crashed (signal SIGSEGV)" in " ".join(result.stdout.split())
    assert "demo: onnxruntime crashed" in result.stderr


AMX_BUILD = {"AVX512_VNNI": "1", "AMX_INT8": "1", "REPACK": "1"}


def test_load_plan_turns_extra_buffers_off_only_for_amx_builds():
    extra, words = llamacpp_engine.load_plan(AMX_BUILD)
    assert extra is False and "#20824" in words and "-mno-amx-int8" in words
    extra, words = llamacpp_engine.load_plan({"AVX2": "1", "REPACK": "1"})
    assert extra is True and words == "llama.cpp without AMX, CPU repacking on"


def test_amx_build_loads_without_extra_buffers_and_still_matches(exports, monkeypatch):
    """What an AMX build gets, tested on any CPU: llama.cpp loads with use_extra_bufts off, and its logits are
    those of the default load (the extra buffers change kernels, never results beyond rounding)."""
    model, paths = exports
    gguf = open_model(str(paths["llama.cpp"]))
    ids = model.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=True)[:16]
    default = LlamaCppEngine(gguf.path, gguf.config, max_seq_len=64, threads=1)
    monkeypatch.setattr(llamacpp_engine, "build_features", lambda: AMX_BUILD)
    plain = LlamaCppEngine(gguf.path, gguf.config, max_seq_len=64, threads=1)
    assert default.llm.model_params.use_extra_bufts is True
    assert plain.llm.model_params.use_extra_bufts is False and "#20824" in plain.configuration
    ours, theirs = plain.forward(ids), default.forward(ids)
    assert theirs.std() > 0.5 and np.max(np.abs(ours - theirs)) <= 1e-2 * np.abs(theirs).max()


README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("compiler", ["cc", "c++"])
def test_readme_install_flags_compile_out_amx_on_an_amx_cpu(compiler):
    """On any x86 machine: README's install lines set CFLAGS and CXXFLAGS to NO_AMX_FLAGS, and with those ahead
    of `-march=sapphirerapids` (where ggml's build puts `-march=native` on an Intel Xeon with AMX) the compiler
    pip uses defines no __AMX_INT8__, the macro that compiles ggml's AMX buffer in; without them it does."""
    lines = README.read_text(encoding="utf-8").splitlines()
    for marker in ("<!-- demo-command -->", "<!-- test-command -->"):
        command = lines[lines.index(marker) + 1]
        assert f'CFLAGS="{llamacpp_engine.NO_AMX_FLAGS}" CXXFLAGS="{llamacpp_engine.NO_AMX_FLAGS}" pip' in command

    def amx_macros(*flags: str) -> list[str]:
        done = subprocess.run([compiler, *flags, "-march=sapphirerapids", "-dM", "-E", "-x",
                               "c" if compiler == "cc" else "c++", "-"], input="", capture_output=True, text=True)
        if done.returncode and "sapphirerapids" in done.stderr:  # such a compiler cannot build AMX code either
            pytest.skip(f"{compiler} predates -march=sapphirerapids (gcc 11, clang 12), so it has no AMX to leave out")
        assert done.returncode == 0, done.stderr
        return sorted(line.split()[1] for line in done.stdout.splitlines() if "__AMX_" in line)

    assert {"__AMX_INT8__", "__AMX_TILE__"} <= set(amx_macros())  # the check can fail
    assert amx_macros(*llamacpp_engine.NO_AMX_FLAGS.split()) == []
