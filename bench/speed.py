"""CPU speed of one 4-bit model in three runtimes, in one run on one machine: the numpy runtime, onnxruntime
(our ONNX export) and llama.cpp (llama-cpp-python on a Q4_0 GGUF of the same checkpoint, whose codes the GGUF
carries exactly), all with the same thread count.

    python bench/speed.py [--presets kanana-1.5-2.1b,kanana-1.5-15.7b-a3b] [--threads 2] [--work DIR]
                          [--engines numpy,onnxruntime,llama.cpp] [--numpy-decode 8] [--numpy-prefill 64]
                          [--repeat 3] [--grid sym|asym] [--group 32] [--lm-head auto|q8|q4] [--layers N]
                          [--checkpoint [PRESET=]DIR ...] [--save NAME]

Per preset: the float model is synthesised (random weights, bf16) into --work if missing, quantized with RTN
4-bit group 32 (symmetric = Q4_0's grid by default; --grid asym, --group G), exported to ONNX (peak RSS of the
export measured) and to a Q4_0 GGUF. --checkpoint PRESET=DIR uses an existing quantized checkpoint for that
preset instead (repeatable, so the dense RTN model and a calibrated MoE run side by side in one run).
Each engine then runs in its own child process: after one untimed 512-token prefill as warm-up, decode tokens/s
= 128 single-token steps after a 32-token prompt, prefill tokens/s = one 512-token prompt; peak RSS is the
child's. The numpy runtime dequantizes every
weight on every step, so it runs fewer steps (--numpy-decode / --numpy-prefill; labelled in the results).
The memory-bandwidth bound is measured read bandwidth / bytes of weights one decode step must read (all
linears and the lm_head; for MoE the router-selected top-k share of the experts; not the embedding table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import llamacpp_build, save  # noqa: E402

PROMPT, DECODE, PREFILL = 32, 128, 512
NOSPIN = "onnxruntime-nospin"
ISOLATED = "onnxruntime-isolated"  # onnxruntime behind the child-process boundary every CLI command uses
NOEXTRA = "llama.cpp-noextra"  # llama.cpp loaded without extra buffer types (what an AMX build gets)
VARIANTS = {NOSPIN: "onnxruntime", ISOLATED: "onnxruntime", NOEXTRA: "llama.cpp"}  # engine -> whose files


def sh(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a child; (wall seconds, peak RSS GiB)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "kanana_quant.cli", *map(str, args)]


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# ---------------------------------------------------------------------------------------------------------
# Child: one engine, timed


def child(engine: str, path: str, threads: int, decode: int, prefill: int, vocab: int) -> None:
    import numpy as np

    t0 = time.perf_counter()
    if engine == "numpy":
        from kanana_quant.loader import open_model
        from kanana_quant.runtimes.numpy_engine import NumpyEngine

        runtime, configuration = NumpyEngine(open_model(path).weights, max_seq_len=1024), f"numpy {np.__version__}"
    elif engine == "onnxruntime":
        from kanana_quant.runtimes.onnx_engine import OnnxEngine, describe

        runtime, configuration = OnnxEngine(Path(path), max_seq_len=1024, threads=threads), describe()
    elif engine == ISOLATED:
        from kanana_quant.runtimes.isolated import IsolatedEngine

        runtime = IsolatedEngine("onnxruntime", Path(path), max_seq_len=1024, threads=threads)
        configuration = f"{runtime.configuration}, in a child process"
    else:
        from kanana_quant.loader import open_checkpoint
        from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine

        runtime = LlamaCppEngine(Path(path), open_checkpoint(Path(path)).config, max_seq_len=1024, threads=threads,
                                 extra_buffers=False if engine == NOEXTRA else None)
        configuration = runtime.configuration
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(vocab, 128000), PROMPT + decode).tolist()
    long = rng.integers(0, min(vocab, 128000), prefill).tolist()
    # Warm-up, as llama-bench does: one untimed prefill touches every weight (first-call allocations,
    # prepacking, and each MoE expert's pages, which the previous engine's run may have evicted from the page
    # cache; with only the prompt as warm-up, the MoE's decode rounds spread from 14.5 to 20.6 tokens/s).
    runtime.reset()
    runtime.forward(long[::-1])
    runtime.reset()
    runtime.forward(ids[:PROMPT])
    t0 = time.perf_counter()
    for token in ids[PROMPT:PROMPT + decode]:
        runtime.forward([token])
    decode_s = time.perf_counter() - t0
    runtime.reset()
    t0 = time.perf_counter()
    runtime.forward(long)
    prefill_s = time.perf_counter() - t0
    print(json.dumps({"load_s": load, "decode_tokens": decode, "decode_tok_s": decode / decode_s,
                      "prefill_tokens": prefill, "prefill_tok_s": prefill / prefill_s,
                      "peak_rss_gib": peak_rss_gib(), "configuration": configuration}))


def status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in GiB, or None where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return None


def peak_rss_gib() -> float:
    """This process's own high-water RSS (VmHWM starts afresh at exec; ru_maxrss would carry the parent's
    peak across fork + exec)."""
    peak = status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_engine(engine: str, path: Path, threads: int, decode: int, prefill: int, vocab: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads)}
    if engine == NOSPIN:  # onnxruntime with its worker threads sleeping between ops
        engine, env["KANANA_QUANT_ORT_SPIN"] = "onnxruntime", "0"
    out = subprocess.run([sys.executable, __file__, "--child", engine, str(path), str(threads), str(decode),
                          str(prefill), str(vocab)], capture_output=True, text=True, env=env)
    if out.returncode < 0:  # a native crash: recorded, and the other engines still run
        from kanana_quant.runtimes.isolated import crash_message

        return {"crashed": crash_message(engine, path, out.returncode)}
    if out.returncode != 0:
        raise SystemExit(f"{engine} child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Machine and model facts


def read_bandwidth_gbs(threads: int, gib: float = 1.0) -> float:
    """Best of 3 sums over a 1 GiB array split across `threads` Python threads (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(int(gib * 2**30) // 8, np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def decode_bytes(onnx_dir: Path) -> int:
    """Bytes of weights one decode step reads in the ONNX export (embedding table and rotary caches excluded;
    MoE experts counted at their top-k share)."""
    import onnx

    from kanana_quant.config import load_config

    cfg = load_config(onnx_dir)
    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    share = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe else 1.0
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith(("embed_tokens", "rotary.")):
            continue
        ext = {e.key: e.value for e in t.external_data}
        size = int(ext["length"]) if "length" in ext else len(t.raw_data)
        total += size * (share if ".moe.fc" in t.name else 1.0)
    return int(total)


# ---------------------------------------------------------------------------------------------------------
# Preparing one preset


def rtn_checkpoint(preset: str, work: Path, layers: int | None, group: int, grid: str, env: dict) -> tuple[Path, Path]:
    """(float source, RTN 4-bit checkpoint) of a preset, synthesised and quantized into `work` if missing."""
    name = preset if layers is None else f"{preset}-{layers}L"
    src, q4 = work / name, work / (f"{name}-rtn4-g{group}" + ("" if grid == "sym" else "-asym"))
    if not src.exists() and layers is None:
        sh(cli("synth", "--preset", preset, "-o", src), env)
    elif not src.exists():  # the preset's shapes with fewer decoder layers (labelled in the results)
        # in a child, so this process stays small: children inherit its peak RSS through fork
        sh([sys.executable, "-c", "import sys; from kanana_quant.synth import preset_config, synth_model; "
            "synth_model(sys.argv[1], {**preset_config(sys.argv[2]), 'num_hidden_layers': int(sys.argv[3])}, "
            "dtype='BF16')", str(src), preset, str(layers)], env)
    if not q4.exists():
        sh(cli("quantize", src, "-o", q4, "--method", "rtn", "--bits", 4, "--group-size", group, f"--{grid}",
               "--samples", 1, "--seq-len", 16), env)
    return src, q4


def prepare(preset: str, work: Path, threads: int, grid: str, layers: int | None, group: int = 32,
            lm_head: str = "auto", checkpoint: Path | None = None) -> dict:
    """Exports (ONNX, Q4_0 GGUF) of `checkpoint`, or of the preset's RTN checkpoint when it is None."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if checkpoint is None:
        src, q4 = rtn_checkpoint(preset, work, layers, group, grid, env)
        source_facts = {"float_model_gib": round(dir_bytes(src) / 2**30, 2),
                        "float32_model_gib": round(dir_bytes(src) / 2**30 * 2, 2)}
        grid_facts = f"RTN 4-bit group {group} {grid}"
    else:  # an existing quantized checkpoint (e.g. quant_cost.py's GPTQ MoE)
        q4 = checkpoint
        source_facts = {"quantized_checkpoint_gib": round(dir_bytes(q4) / 2**30, 2)}
        grid_facts = json.loads((q4 / "config.json").read_text()).get("quantization_config", {})
    head = "" if lm_head == "auto" else f"-head-{lm_head}"
    onnx_dir, gguf = work / f"{q4.name}{head}-onnx", work / f"{q4.name}-Q4_0.gguf"
    facts: dict = {}
    export_facts = work / f"{onnx_dir.name}.export.json"  # kept beside the export, so reruns report it too
    if not onnx_dir.exists():
        seconds, rss = sh(cli("export", "onnx", q4, "-o", onnx_dir, "--lm-head", lm_head), env)
        export_facts.write_text(json.dumps({"seconds": round(seconds, 1), "peak_rss_gib": round(rss, 2),
                                            **source_facts}))
    if export_facts.is_file():
        facts["onnx_export"] = json.loads(export_facts.read_text())
    if not gguf.exists():
        sh(cli("export", "gguf", q4, "-o", gguf, "--type", "Q4_0"), env)
    facts["files_gib"] = {"quantized_checkpoint": round(dir_bytes(q4) / 2**30, 3),
                          "onnx": round(dir_bytes(onnx_dir) / 2**30, 3), "gguf_q4_0": round(dir_bytes(gguf) / 2**30, 3)}
    facts["grid"] = grid_facts
    facts["onnx_lm_head"] = lm_head
    facts["paths"] = {"numpy": q4, "onnxruntime": onnx_dir, "llama.cpp": gguf}
    return facts


def checkpoint_map(entries: list[str], presets: list[str]) -> dict[str, Path]:
    """--checkpoint values as {preset: dir}."""
    out: dict[str, Path] = {}
    for entry in entries:
        preset, sep, path = entry.rpartition("=")
        if not sep:
            if len(presets) != 1:
                raise SystemExit(f"--checkpoint {entry}: name its preset (PRESET=DIR) when --presets has several")
            preset = presets[0]
        if preset not in presets:
            raise SystemExit(f"--checkpoint {entry}: {preset} is not in --presets {','.join(presets)}")
        out[preset] = Path(path)
    return out


def smollm2_exports(work: Path, env: dict, bits: int = 4) -> dict:
    """SmolLM2-135M-Instruct (real weights) RTN `bits`-bit g64 sym, as ONNX and as a GGUF carrying its codes
    (Q4_0 for 4 bits, Q8_0 for 8)."""
    from kanana_quant.smollm import smollm2_gguf

    q = work / f"smollm2-rtn{bits}-g64"
    if not q.exists():
        sh(cli("quantize", smollm2_gguf(), "-o", q, "--method", "rtn", "--bits", bits, "--group-size", 64,
               "--samples", 1, "--seq-len", 16), env)
    gguf_type = {4: "Q4_0", 8: "Q8_0"}[bits]
    onnx_dir, gguf = work / f"{q.name}-onnx", work / f"{q.name}-{gguf_type}.gguf"
    if not onnx_dir.exists():
        sh(cli("export", "onnx", q, "-o", onnx_dir), env)
    if not gguf.exists():
        sh(cli("export", "gguf", q, "-o", gguf, "--type", gguf_type), env)
    return {"onnxruntime": onnx_dir, "llama.cpp": gguf}


# task-mode models with real weights: name -> bits of SmolLM2's RTN checkpoint. The 8-bit one is a target a
# 4-bit SmolLM2 can draft for (SmolLM2-135M is its family's smallest model).
SMOLLM2 = {"smollm2": 4, "smollm2-8bit": 8}


def task_mode(args) -> None:
    import tasks

    from kanana_quant.loader import open_model

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    drafts = checkpoint_map(args.draft, args.task_models.split(","))
    results = {"threads": args.threads, "max_tokens": args.max_tokens, "prompts": str(tasks.TASKS.name),
               "protocol": "greedy; each prompt a user turn in the chat template; decode tok/s = tokens after the "
                           "first / time after it; one process per engine and mode",
               "llama_cpp_build": llamacpp_build(), "models": {}}
    engines = [e for e in args.engines.split(",") if e != "numpy"]  # minutes per answer: not a task-mode engine
    for name in args.task_models.split(","):
        if name in SMOLLM2:
            paths = smollm2_exports(args.work, env, SMOLLM2[name])
        else:
            paths = prepare(name, args.work, args.threads, "asym", args.layers, 128)["paths"]
        entry = results["models"][name] = {"runs": {}, "summary": {}, "identical_to_plain": {}}
        for engine in engines:
            modes = args.modes.split(",")
            if "plain" in modes and len(modes) > 1:
                modes.insert(modes.index("plain") + 1, "margins")  # untimed: where drafted answers part
            margins = None
            for mode in modes:
                if mode == "draft" and name not in drafts:
                    continue
                draft = drafts.get(name)
                if draft is not None and str(draft) in SMOLLM2:  # a task model's own export for this engine
                    draft = smollm2_exports(args.work, env, SMOLLM2[str(draft)])[engine]
                rows = tasks.run_child(engine, paths[engine], mode, args.threads, args.max_tokens, draft)
                if mode == "margins":
                    margins = rows
                    continue
                key = f"{engine} {mode}"
                entry["runs"][key], entry["summary"][key] = rows, tasks.summarise(rows)
                if mode != "plain" and f"{engine} plain" in entry["runs"]:
                    entry["identical_to_plain"][key] = tasks.identical(rows, entry["runs"][f"{engine} plain"],
                                                                       margins)
                crashed = [r for r in rows if "crashed" in r]
                print(name, key, entry["summary"][key], entry["identical_to_plain"].get(key, ""),
                      f"CRASHED: {crashed[0]['stderr'][-300:]}" if crashed else "", flush=True)
        if args.llama_lookup:
            tokenizer = open_model(str(paths["llama.cpp"])).tokenizer
            rows = tasks.llama_lookup(Path(args.llama_lookup), paths["llama.cpp"], args.threads, args.max_tokens,
                                      tokenizer)
            entry["runs"]["llama-lookup"], entry["summary"]["llama-lookup"] = rows, tasks.summarise(rows)
            print(name, "llama-lookup", entry["summary"]["llama-lookup"], flush=True)
    print("saved", save(args.save, results))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, path, threads, decode, prefill, vocab = sys.argv[2:8]
        return child(engine, path, int(threads), int(decode), int(prefill), int(vocab))
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", action="store_true", help="task mode (bench/tasks.py): input-grounded prompts, plain "
                                                         "vs prompt lookup vs draft model vs llama.cpp")
    ap.add_argument("--task-models", default="smollm2,kanana-1.5-2.1b",
                    help=f"task mode: {', '.join(SMOLLM2)} (real weights) and/or presets")
    ap.add_argument("--modes", default="plain,lookup", help="task mode: plain, lookup, draft")
    ap.add_argument("--draft", action="append", default=[], metavar="MODEL=DIR",
                    help="task mode: a draft model for MODEL: an export for the engine, or a SmolLM2 task model's "
                         "name (e.g. smollm2-8bit=smollm2: its export for each engine)")
    ap.add_argument("--max-tokens", type=int, default=128, help="task mode: tokens per answer")
    ap.add_argument("--llama-lookup", default=None, help="task mode: a llama-lookup binary built from "
                                                         "llama-cpp-python's vendored llama.cpp")
    ap.add_argument("--presets", default="kanana-1.5-2.1b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over the engines (best tokens/s of the rounds is reported, every round listed)")
    ap.add_argument("--save", default=None, help="results file name under bench/results/ (speed, or speed_tasks "
                                                 "with --tasks)")
    ap.add_argument("--work", type=Path, default=Path("/work/scratch"))
    ap.add_argument("--engines", default="numpy,onnxruntime,llama.cpp",
                    help=f"comma list of numpy, onnxruntime, {NOSPIN} (KANANA_QUANT_ORT_SPIN=0), {ISOLATED}, "
                         f"llama.cpp, {NOEXTRA} (use_extra_bufts off)")
    ap.add_argument("--numpy-decode", type=int, default=8)
    ap.add_argument("--numpy-prefill", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only the first N decoder layers of each preset (a quicker, labelled stand-in)")
    ap.add_argument("--grid", default="sym", choices=("sym", "asym"),
                    help="RTN grid: sym is Q4_0's own grid (the GGUF carries the codes exactly); asym skips RTN's "
                         "clipping search, so a 15.7B MoE quantizes in minutes (its GGUF is re-rounded to Q4_0)")
    ap.add_argument("--group", type=int, default=32,
                    help="RTN group size of the checkpoint; 32 with --grid sym is exactly Q4_0's grid, other groups "
                         "are re-rounded to Q4_0 for llama.cpp")
    ap.add_argument("--lm-head", default="auto", help="the ONNX export's lm_head (export onnx --lm-head)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="[PRESET=]DIR",
                    help="use this quantized checkpoint for PRESET instead of synthesising and RTN-quantizing "
                         "(repeatable; PRESET= may be left out when --presets names one preset)")
    args = ap.parse_args()
    if args.tasks:
        args.save = args.save or "speed_tasks"
        return task_mode(args)
    args.save = args.save or "speed"
    presets = args.presets.split(",")
    checkpoints = checkpoint_map(args.checkpoint, presets)
    from kanana_quant.config import ModelConfig

    results = {"threads": args.threads,
               "protocol": f"warm-up: one untimed {PREFILL}-token prefill; decode: {DECODE} single-token steps after "
                           f"a {PROMPT}-token prompt; prefill: one {PREFILL}-token prompt; random token ids; each "
                           "engine in its own process",
               "models": {}}
    if "llama.cpp" in args.engines.split(","):
        results["llama_cpp_build"] = llamacpp_build()
    for preset in presets:
        cfg = ModelConfig.preset(preset)
        facts = prepare(preset, args.work, args.threads, args.grid, args.layers, args.group, args.lm_head,
                        checkpoints.get(preset))
        if args.layers:
            facts["layers"] = f"first {args.layers} of {cfg.num_layers} decoder layers"
        paths = facts.pop("paths")
        entry = {**facts, "decode_bytes": decode_bytes(paths["onnxruntime"]), "engines": {}}
        runs: dict[str, list[dict]] = {}
        for round_ in range(args.repeat):  # round-robin, so a busy spell on a shared machine hits every engine
            for engine in args.engines.split(","):
                if engine == "numpy" and round_:
                    continue  # minutes per run, and nowhere near the others
                decode, prefill = (args.numpy_decode, args.numpy_prefill) if engine == "numpy" else (DECODE, PREFILL)
                path = paths[VARIANTS.get(engine, engine)]
                r = run_engine(engine, path, args.threads, decode, prefill, cfg.vocab_size)
                print(preset, engine, "round", round_, r, flush=True)
                if "crashed" in r:
                    entry.setdefault("crashed", {})[engine] = r["crashed"]
                else:
                    runs.setdefault(engine, []).append(r)
        for engine, results_ in runs.items():
            r = dict(results_[0])
            for key in ("decode_tok_s", "prefill_tok_s"):
                r[key] = max(x[key] for x in results_)
                r[key.replace("tok_s", "median_tok_s")] = float(statistics.median(x[key] for x in results_))
                r[key.replace("tok_s", "all_runs")] = [round(x[key], 2) for x in results_]
            r["peak_rss_gib"] = max(x["peak_rss_gib"] for x in results_)
            file_gib = entry["files_gib"][{"numpy": "quantized_checkpoint", "onnxruntime": "onnx",
                                           "llama.cpp": "gguf_q4_0"}[VARIANTS.get(engine, engine)]]
            r["rss_over_file"] = round(r["peak_rss_gib"] / file_gib, 2)
            entry["engines"][engine] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
        ref = entry["engines"].get("llama.cpp")
        if ref:
            for name, r in entry["engines"].items():
                r["decode_vs_llama_cpp"] = round(r["decode_tok_s"] / ref["decode_tok_s"], 3)
                r["decode_median_vs_llama_cpp"] = round(r["decode_median_tok_s"] / ref["decode_median_tok_s"], 3)
                r["prefill_vs_llama_cpp"] = round(r["prefill_tok_s"] / ref["prefill_tok_s"], 3)
        results["models"][preset if args.layers is None else f"{preset}-{args.layers}L"] = entry
    # measured last: its 1 GiB array would otherwise raise the peak RSS every later child inherits
    bandwidth = read_bandwidth_gbs(args.threads)
    results["read_bandwidth_gbs"] = round(bandwidth, 2)
    for entry in results["models"].values():
        per_token = entry.pop("decode_bytes")
        entry["decode_bytes_per_token_gib"] = round(per_token / 2**30, 3)
        entry["decode_bound_tok_s"] = round(bandwidth * 1e9 / per_token, 2)
    print(json.dumps(results, indent=2))
    print("saved", save(args.save, results))


if __name__ == "__main__":
    main()
