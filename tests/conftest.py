"""Tiny Kanana-shaped models, generated once per test session: the fixtures every test runs on."""

from __future__ import annotations

import os
import signal
import sys

# Tiny models: BLAS/OpenMP threads cost more in start-up and oversubscription than they give (measured: the
# suite ran 3x faster single-threaded). Set before numpy/torch load; subprocess CLI tests inherit it.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from kanana_quant.synth import TINY, synth_model  # noqa: E402

YARN = {"type": "yarn", "factor": 4.4, "original_max_position_embeddings": 128, "beta_fast": 64, "beta_slow": 2}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

WIDE = {"hidden_size": 256, "head_dim": 64, "intermediate_size": 512}

# name -> HF config: dense tied/untied with every RoPE kind, MoE in both tensor namings.
VARIANTS = {
    "dense-tied": TINY["dense"],
    "dense-untied-yarn": {**TINY["dense"], "tie_word_embeddings": False, "rope_scaling": YARN},
    "dense-llama3-rope": {**TINY["dense"], "rope_scaling": LLAMA3},
    "moe-mixtral": TINY["moe"],
    "moe-qwen": TINY["qwen-moe"],
    "moe-qwen-no-renorm": {**TINY["qwen-moe"], "norm_topk_prob": False},
    # Rows of 256 so llama.cpp's K-quants apply (the 96-wide models fall back to legacy types).
    "dense-256": {**TINY["dense"], **WIDE},
    # 8 layers and 4 query heads per KV head: llama-quantize's per-layer and GQA rules all show
    "dense-256-deep": {**TINY["dense"], **WIDE, "num_hidden_layers": 8, "num_attention_heads": 4,
                       "num_key_value_heads": 1},
    "moe-256": {**TINY["moe"], **WIDE, "intermediate_size": 256},
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Lazily synthesise each variant the first time a test asks for it."""
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = synth_model(root / name, VARIANTS[name], seed=len(made) + 1)
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_dense(model_dirs):
    return model_dirs("dense-tied")


@pytest.fixture
def run(monkeypatch, capsys):
    """The CLI in-process through `main()` (the console entry point, which maps exceptions to exit codes):
    run(*args) -> (exit code, stdout, stderr stripped)."""
    # imported here, not at the top: most test modules never run the CLI
    from kanana_quant.cli import main

    # main() installs its own SIGTERM handler; the next test must not inherit it
    previous = signal.getsignal(signal.SIGTERM)

    def invoke(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["kanana-quant", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            main()
        out, err = capsys.readouterr()
        return exit_.value.code, out, err.strip()  # a transient progress bar may leave a blank line

    yield invoke
    signal.signal(signal.SIGTERM, previous)


SAMPLE_TEXT = ("Kanana is a bilingual model. 카카오의 카나나는 한국어와 영어를 함께 배웠습니다. "
               "It runs offline on a laptop 💻, even 大韓民國 텍스트도 잘 처리해요!")


def pytest_report_header(config):
    """CPU and llama.cpp build in every run's header: the llama.cpp tests run on AMD and on Intel AMX machines."""
    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    amx = any(line.startswith("flags") and " amx_int8" in line for line in lines)
    try:
        from kanana_quant.runtimes.llamacpp_engine import build_features, load_plan

        build = load_plan(build_features())[1]
    except ImportError:
        build = "llama-cpp-python not installed"
    return [f"cpu: {model} ({'with' if amx else 'no'} AMX)", f"llama.cpp: {build}"]
