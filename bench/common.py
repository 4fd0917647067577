"""Shared by the bench scripts: held-out texts from PyPI packages, machine facts, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("KANANA_QUANT_CACHE", Path.home() / ".cache" / "kanana-quant"))
RESULTS = Path(__file__).parent / "results"

# Held-out text nobody calibrates on: English news (the Lee corpus in gensim's test data) and Korean law
# and bills (konlpy's kolaw and kobill corpora).
TEXTS = {
    "en": ("gensim", ["gensim/test/test_data/lee_background.cor"]),
    "ko": ("konlpy", ["konlpy/data/corpus/kolaw/constitution.txt"]
           + [f"konlpy/data/corpus/kobill/18098{n}.txt" for n in range(90, 100)]),
}


def _wheel(package: str) -> Path:
    found = sorted(CACHE.glob(f"{package}-*.whl"))
    if found:
        return found[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, package], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        target = CACHE / wheel.name
        os.replace(wheel, target)
    return target


def heldout_text(lang: str) -> str:
    package, members = TEXTS[lang]
    with zipfile.ZipFile(_wheel(package)) as z:
        return "\n\n".join(z.read(m).decode("utf-8") for m in members)


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> dict:
    """The CPU's model name and the instruction sets speed depends on (every speed figure names its CPU)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {"model": info.get("model name") or platform.processor() or platform.machine(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def llamacpp_build() -> dict | None:
    """What the installed llama.cpp was compiled with, and how our engine loads it."""
    from kanana_quant.runtimes.llamacpp_engine import build_features, load_plan

    try:
        features = build_features()
    except ImportError:  # llama-cpp-python not installed
        return None
    return {"features": {k: v for k, v in features.items() if v != "0"}, "configuration": load_plan(features)[1]}


def machine() -> dict:
    import numpy as np

    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "cpu": cpu(),
            "cores": os.cpu_count(), "numpy": np.__version__,
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def earlier_rows(name: str, redone, same_setup=lambda old: True) -> list[dict]:
    """Rows of an earlier bench/results/NAME.json that this run did not redo (`redone(row)` false), so a run
    that measures only some configurations keeps the others; none if `same_setup(old result)` is false."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text(encoding="utf-8"))
    return [r for r in old.get("rows", []) if not redone(r)] if same_setup(old) else []


def float_checkpoint(model, out: Path, **config) -> Path:
    """A loaded model (e.g. a GGUF, dequantized) as a float32 Hugging Face directory, config.json updated with
    `config`: the form other tools and our own checkpoint readers take."""
    from kanana_quant import names
    from kanana_quant.checkpoint import save_checkpoint
    from kanana_quant.safetensors_io import TensorSpec

    cfg, raw = model.config, {**model.config.raw, **config}
    hf = names.hf_name_map(cfg)
    canonical = {v: k for k, v in hf.items()}
    specs = [TensorSpec(hf[n], "F32", names.tensor_shape(cfg, n)) for n in names.canonical_names(cfg)
             if not (n == "lm_head" and raw.get("tie_word_embeddings"))]
    files = {"config.json": json.dumps(raw, indent=2, ensure_ascii=False), **model.tokenizer.to_files()}
    return save_checkpoint(out, specs, lambda s: model.weights.get(canonical[s.name]), files)


def bench_venv(name: str, installs: list[list[str]]) -> Path:
    """The python of CACHE/bench-venvs/NAME, a venv for a tool whose dependencies clash with ours, created on
    first use: one `pip install` per list in `installs`, in order (torch==2.13.0 first, so the tool's own
    resolution keeps the CPU build instead of pulling a multi-GB CUDA one). Reused while its recorded
    `installs` are the same; a different list rebuilds it."""
    root = CACHE / "bench-venvs"
    venv = root / name
    python = venv / "bin" / "python"
    stamp = venv / "kanana-installs.json"
    wanted = json.dumps(installs)
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    root.mkdir(parents=True, exist_ok=True)
    print(f"creating {venv} ({'; '.join(' '.join(i) for i in installs)}), once", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    with open(root / f"{name}-install.log", "w") as log:
        for packages in installs:
            done = subprocess.run([str(python), "-m", "pip", "install", *packages], check=False, stdout=log,
                                  stderr=subprocess.STDOUT)
            if done.returncode:
                raise SystemExit(f"pip install {' '.join(packages)} into {venv} failed; see {log.name}")
    stamp.write_text(wanted)
    return python


def run_tool(cmd: list, what: str) -> str:
    """Run a bench tool (a llama.cpp binary, or a script in a tool venv) and return its output. A failure stops
    the bench with the tool's last lines and the whole output kept in a log beside the temp folders."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode:
        log = Path(tempfile.gettempdir()) / f"kq-bench-{'-'.join(what.split())}.log"
        log.write_text(output)
        tail = " | ".join(output.strip().splitlines()[-3:]) or f"exit status {done.returncode}"
        raise SystemExit(f"{what} failed ({done.returncode}): {tail} (log: {log})")
    return output


LLAMACPP_TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")


def llamacpp_python_source() -> Path:
    """The installed llama-cpp-python version's sdist, unpacked under CACHE (fetched with pip once)."""
    from importlib.metadata import version

    ver = version("llama-cpp-python")
    src = CACHE / f"llama-cpp-python-{ver}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", tmp, f"llama-cpp-python=={ver}"], check=True)
            sdist = next(Path(tmp).glob("*.tar.gz"))
            src.mkdir(parents=True, exist_ok=True)
            subprocess.run(["tar", "xzf", str(sdist), "--strip-components=1", "-C", str(src)], check=True)
    return src


def llamacpp_tools() -> dict:
    """llama-imatrix, llama-quantize and llama-perplexity built with cmake from the llama.cpp that the installed
    llama-cpp-python vendors (its sdist, fetched with pip once), cached under CACHE; returns their paths and
    the build's `--version` line."""
    from importlib.metadata import version

    from kanana_quant.runtimes.llamacpp_engine import NO_AMX_FLAGS  # as the Python binding is built (#20824)

    ver = version("llama-cpp-python")
    build = CACHE / f"llama.cpp-tools-{ver}" / "build"
    bins = {t: build / "bin" / t for t in LLAMACPP_TOOLS}
    if not all(p.is_file() for p in bins.values()):
        src = llamacpp_python_source()
        print(f"building {', '.join(LLAMACPP_TOOLS)} from llama-cpp-python {ver}'s llama.cpp (once, ~15 min)",
              flush=True)
        subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), "-DGGML_NATIVE=ON",
                        "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}",
                        f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}",
                        "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "--target", *LLAMACPP_TOOLS, "-j2"], check=True,
                       capture_output=True)
    done = subprocess.run([str(bins["llama-perplexity"]), "--version"], capture_output=True, text=True)
    line = next((x for x in (done.stdout + done.stderr).splitlines() if x.startswith("version")), "?")
    return {"paths": bins, "build": f"llama-cpp-python {ver}'s llama.cpp, {line.strip()}, -DGGML_NATIVE=ON {NO_AMX_FLAGS}"}
