"""BENCHMARKS.md from the bench JSON results, with PNG plots.

    python bench/report.py            # collect bench/results/*.json as they are
    python bench/report.py --run      # first re-run quality.py, gguf_quality.py and speed.py (hours on 2 cores)

Every table and figure is generated from bench/results/*.json, so the numbers in BENCHMARKS.md are the JSON's;
each figure names the machine, the date and the command that produced its data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIGURES = ROOT / "bench" / "figures"
OUT = ROOT / "BENCHMARKS.md"
SCRIPTS = ("quality.py", "gguf_quality.py", "speed.py")
SMOLLM2_WEIGHTS = 134_515_008
# rows measured before results carried their own calibration (session 1: the bilingual set alone)
EARLIER_CALIBRATION = "builtin (220 documents, before calib_en.txt), 64 x 512"  # SmolLM2-135M parameters: bits per weight of a GGUF = 8 · bytes / this


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def cpu_name(machine: dict) -> str:
    """The CPU a result ran on: its model and the instruction sets speed depends on (results before
    2026-12-01 recorded only the architecture)."""
    cpu = machine.get("cpu", "?")
    if isinstance(cpu, dict):
        return f"{cpu['model']} ({', '.join(cpu['flags']) or 'no AVX2'}{'' if 'amx_int8' in cpu['flags'] else ', no AMX'})"
    return f"{cpu} (model not recorded; the AMD EPYC machine of issues 13 and 18)"


def provenance(result: dict) -> str:
    m = result.get("machine", {})
    return f"{m.get('date', '?')}, {m.get('cores', '?')}-core {cpu_name(m)}, `python bench/{m.get('command', '?')}`"


def _figure(name: str, results: list[dict], draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = draw(plt)
    for k, result in enumerate(reversed(results)):
        m = result.get("machine", {})
        fig.text(0.01, 0.01 + 0.03 * k, f"{m.get('date', '?')} · {m.get('cores', '?')}-core {cpu_name(m)} · "
                                        f"python bench/{m.get('command', '?')}", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.04 * len(results), 1, 1))
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{name}](bench/figures/{name}.png)"


def tool_notes(rows: list[dict]) -> list[str]:
    """What each other tool's row ran (bench/llmcompressor_run.py's report): versions, the recipe's settings,
    the check that its export is the tool's own model, and any patch it needed on this machine."""
    notes = {}
    for r in rows:
        if "tool" not in r:
            continue
        steps = []
        for name, fields in r["recipe"].items():
            settings = {k: v for k, v in fields.items() if not isinstance(v, (list, dict))}
            if "weights" in fields:
                settings["observer"] = fields["weights"].get("observer")
            steps.append(f"{name}({', '.join(f'{k}={v}' for k, v in settings.items())})")
        check = r["grid_check"]
        notes.setdefault(r["method"], []).append(
            f"{r['grid']}: {', '.join(f'{k} {v}' for k, v in r['tool'].items())}; {' then '.join(steps)}; "
            f"{check['quantized_linears']} linears, at most {check['max_levels_per_group']} distinct values per "
            f"group, logits within {check['export_max_logit_diff']:.2g} of the tool's own fake-quantized forward"
            + (f"; {r['cpu_patch']}" if r.get("cpu_patch") else ""))
    return [f"- {method}: " + " — ".join(parts) for method, parts in notes.items()] + ([""] if notes else [])


def quality_section(q: dict, g: dict | None) -> list[str]:
    rows = q["rows"]
    float_row = next(r for r in rows if r["bits"] == 16)
    lines = ["## Perplexity vs bits per weight (SmolLM2-135M-Instruct)", "",
             f"Data: {provenance(q)}. {q['windows']} windows × {q['ctx']} tokens of held-out English and "
             f"Korean; calibration per row (the newest run's: {q['calibration']}). The float model is SmolLM2's Q4_1 GGUF dequantized "
             "(its weights sit on a Q4_1 group-32 grid, which flatters block-32 rules); groups are 64 because "
             "128 does not divide its 576-wide rows.", "",
             "| method | grid | bpw | PPL en | ΔPPL en (× RTN) | PPL ko | ΔPPL ko (× RTN) | calibration |",
             "|---|---|---|---|---|---|---|---|"]
    rtn = {}
    for r in rows:
        if r["bits"] == 16:
            lines.append(f"| float | – | 16 | {r['en']:.2f} | – | {r['ko']:.3f} | – | – |")
            continue
        key = r["grid"]
        d_en, d_ko = r["en"] - float_row["en"], r["ko"] - float_row["ko"]
        if r["method"] == "rtn":
            rtn[key] = (d_en, d_ko)
        base = rtn.get(key, (d_en, d_ko))
        calibration = "–" if r["method"].startswith("rtn") else r.get("calibration", EARLIER_CALIBRATION)
        lines.append(f"| {r['method']} | {key} | {r['bpw']:.4g} | {r['en']:.2f} | {d_en:.2f} ({d_en / base[0]:.2f}) "
                     f"| {r['ko']:.3f} | {d_ko:.3f} ({d_ko / base[1]:.2f}) | {calibration} |")
    lines += ["", *tool_notes(rows)]

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, lang in zip(axes, ("en", "ko")):
            methods = sorted({r["method"] for r in rows if r["bits"] != 16})
            for method in methods:
                pts = sorted((r["bpw"], r[lang]) for r in rows if r["method"] == method)
                ax.plot(*zip(*pts), "o", label=method)
            if g and "scorer" not in g:  # llama-perplexity scores differently: its plot is in the GGUF section
                for method in sorted({r["method"] for r in g["rows"] if r["method"] != "float"}):
                    pts = sorted((8 * r["bytes"] / SMOLLM2_WEIGHTS, r[lang]) for r in g["rows"] if r["method"] == method)
                    ax.plot(*zip(*pts), "s", mfc="none", label=f"GGUF {method} (bpw of the whole file)")
            ax.axhline(float_row[lang], color="0.5", ls="--", label="float")
            ax.set_xlabel("bits per weight")
            ax.set_ylabel(f"perplexity ({'English' if lang == 'en' else 'Korean'})")
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle("SmolLM2-135M-Instruct: perplexity vs bits per weight")
        return fig, axes

    lines += [_figure("ppl_vs_bpw", [q] + ([g] if g else []), draw), ""]
    return lines


def _autoround_note(g: dict) -> str:
    runs = {r["method"]: r for r in g["rows"] if r["method"].startswith("AutoRound")}
    if not runs:
        return "AutoRound: not run."
    tool = next(iter(runs.values()))["tool"]
    return (f"{', '.join(f'`{m}`' for m in runs)} = AutoRound {tool['auto-round']}'s own GGUF export "
            f"(bench/autoround_run.py; transformers {tool['transformers']}, torch {tool['torch']}) on the same "
            "windows; iters 0 is its optimized RTN search weighted by the calibration activations (what it "
            "recommends for GGUF except at 3 bits), 200 its sign-gradient tuning, alg-ext its `enable_alg_ext` "
            "variant of that tuning (its most accurate GGUF mode). It exports no IQ types, and Q2_K only as its "
            "q2_k_s mix.")


def gguf_section(g: dict) -> list[str]:
    if "scorer" not in g:  # results before issue 19: llama-cpp-python's logits, llama.cpp without an imatrix
        return _gguf_section_v1(g)
    lines = ["## GGUF in llama.cpp: ours vs llama.cpp with and without an importance matrix", "",
             f"Data: {provenance(g)}; rows that run did not redo come from earlier runs with the same scorer and "
             f"calibration. Every file scored by llama.cpp's `{g['scorer']}` (each chunk's second half "
             f"scored) on held-out English and Korean; llama.cpp tools: {g['llama_cpp_tools']}. "
             "`llama.cpp` = `llama-quantize` of our F16 GGUF; `llama.cpp+imatrix` = the same with `--imatrix` from "
             "`llama-imatrix` on our calibration windows "
             f"({g['calibration']['samples']} × {g['calibration']['seq_len']} tokens of the built-in set); "
             "`kanana-quant gptq` = `kanana-quant quantize --format gguf --type T` on the same windows (GPTQ on "
             "each tensor's grid with its Hessian shrunk halfway to its diagonal, the default `--shrink`, never "
             "worse than RTN per tensor; rows marked `shrink 0` are plain GPTQ, `damp 0.1` a stronger damping); `kanana-quant gptq --target-bpw` = the same with "
             "`--target-bpw` set to the llama.cpp+imatrix file's bits per weight over the layer linears, so each "
             "tensor's type is picked by its Hessian-weighted error per byte and the file is that one's size. "
             "× imatrix = ΔPPL over llama.cpp+imatrix's at "
             "the same type (goal ≤ 0.7). SmolLM2's 576-wide rows are not whole 256-blocks: llama-quantize, and "
             "we with it, store them as Q4_0/Q5_0/Q5_1/IQ4_NL, so only ffn_down is a real Q2_K/Q3_K/Q4_K/IQ4_XS "
             f"tensor. {_autoround_note(g)}", "",
             "| type | method | bytes | bpw | PPL en | ΔPPL en | × imatrix | PPL ko | ΔPPL ko | × imatrix |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        bpw = 8 * r["bytes"] / SMOLLM2_WEIGHTS
        if r["method"] == "float":
            lines.append(f"| F16 | float | {r['bytes']:,} | {bpw:.2f} | {r['en']:.3f} | – | – | {r['ko']:.4f} | – | – |")
            continue
        lines.append(f"| {r['type']} | {r['method']} | {r['bytes']:,} | {bpw:.2f} | {r['en']:.3f} | "
                     f"{r['dppl_en']:+.3f} | {r['x_imatrix_en']:.2f} | {r['ko']:.4f} | {r['dppl_ko']:+.4f} | "
                     f"{r['x_imatrix_ko']:.2f} |")
    lines.append("")

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        rows = g["rows"]
        base = next(r for r in rows if r["method"] == "float")
        for ax, lang in zip(axes, ("en", "ko")):
            # our ablations (a knob off its default, named in parentheses) are in the table, not on the plot
            plotted = [m for m in dict.fromkeys(r["method"] for r in rows)
                       if m != "float" and not (m.startswith("kanana-quant") and "(" in m)]
            for method in plotted:
                pts = sorted((8 * r["bytes"] / SMOLLM2_WEIGHTS, r[lang], r["type"]) for r in rows
                             if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
                for x, y, t in pts:
                    ax.annotate(t, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.axhline(base[lang], color="0.5", ls="--", label="F16")
            ax.set_xlabel("bits per weight (whole file, embeddings included)")
            ax.set_ylabel(f"llama-perplexity ({'English' if lang == 'en' else 'Korean'})")
        axes[0].legend(fontsize=7)
        fig.suptitle("SmolLM2-135M-Instruct GGUF: perplexity vs bits per weight")
        return fig, axes

    return lines + [_figure("gguf_ppl_vs_bpw", [g], draw), ""]


def _gguf_section_v1(g: dict) -> list[str]:
    lines = ["## GGUF in llama.cpp: our exports vs llama.cpp's own quantizer", "",
             f"Data: {provenance(g)}. Perplexity from llama.cpp's logits (llama-cpp-python) on "
             f"{g['windows']} windows × {g['ctx']} tokens; `llama.cpp` = `llama_model_quantize` of our F16 "
             "GGUF without an imatrix; `ours rtn` = `kanana-quant export gguf`; `ours gptq` = "
             "`kanana-quant quantize --format gguf` (GPTQ on each tensor's GGUF grid). The bpw column counts "
             "every tensor in the file (embeddings included).", "",
             "| type | method | MB | bpw | PPL en | ΔPPL en (× llama.cpp) | PPL ko | ΔPPL ko (× llama.cpp) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        bpw = 8 * r["bytes"] / SMOLLM2_WEIGHTS
        if r["method"] == "float":
            lines.append(f"| F16 | float | {r['bytes'] / 1e6:.2f} | {bpw:.2f} | {r['en']:.3f} | – | {r['ko']:.4f} | – |")
            continue
        lines.append(f"| {r['type']} | {r['method']} | {r['bytes'] / 1e6:.2f} | {bpw:.2f} | {r['en']:.3f} | "
                     f"{r['dppl_en']:.3f} ({r['x_llamacpp_en']:.2f}) | {r['ko']:.4f} | "
                     f"{r['dppl_ko']:.4f} ({r['x_llamacpp_ko']:.2f}) |")
    return lines + [""]


def tasks_section(t: dict) -> list[str]:
    """speed.py --tasks: decode tokens/s per kind of task, each engine and mode against llama.cpp's plain
    decode and llama-lookup measured in the same run."""
    lines = ["## Task mode: prompt lookup and draft models on input-grounded prompts", "",
             f"Data: {provenance(t)}. {t['protocol']}; {t['max_tokens']} tokens per answer, {t['threads']} threads, "
             f"prompts `{Path(t['prompts']).name}`. llama.cpp: {t['llama_cpp_build'].get('configuration', '?')}. "
             "Each cell: decode tokens/s (acceptance of drafted tokens); the × columns divide by llama.cpp's plain "
             "decode on the same kind of task, and the line under each table by llama-lookup's.", ""]
    for model, entry in t["models"].items():
        summary = entry["summary"]
        kinds = sorted({k for s in summary.values() for k in s})
        lines += [f"**{model}**", "", "| engine, mode | " + " | ".join(kinds) + " | "
                  + " | ".join(f"× llama.cpp plain ({k})" for k in kinds) + " |",
                  "|---" * (1 + 2 * len(kinds)) + "|"]
        plain, lookup = summary.get("llama.cpp plain", {}), summary.get("llama-lookup", {})
        for key, per in summary.items():
            cells = [f"{per[k]['decode_tok_s']}" + (f" ({per[k]['acceptance']:.2f})" if per[k].get("acceptance")
                                                    is not None else "") if k in per else "–" for k in kinds]
            ratios = [f"{per[k]['decode_tok_s'] / plain[k]['decode_tok_s']:.2f}" if k in per and k in plain else "–"
                      for k in kinds]
            lines.append(f"| {key} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        if entry.get("identical_to_plain"):
            lines += ["", "Answers token for token identical to the same engine's plain greedy decode: " + ", ".join(
                f"{k} {_parted(v)}" for k, v in entry["identical_to_plain"].items()) + "."]
        if lookup:
            best = summary.get("onnxruntime lookup", {})
            lines += ["", "onnxruntime with lookup over llama-lookup: " + ", ".join(
                f"{k} {best[k]['decode_tok_s'] / lookup[k]['decode_tok_s']:.2f}×" for k in kinds
                if k in best and k in lookup)]
        lines.append("")
    return lines


def _parted(v) -> str:
    """'k/n', and where the other answers part from plain greedy's: plain's top-2 log-probability gap there."""
    if isinstance(v, str):  # results before the gaps were recorded
        return v
    gaps = sorted(p["plain_top2_gap"] for p in v["parted"] if "plain_top2_gap" in p)
    if not gaps:
        return v["identical"]
    return (f"{v['identical']} (the others part where plain's two best tokens are within "
            f"{', '.join(f'{g:.3f}' for g in gaps)} nats)")


def speed_section(s: dict, name: str) -> list[str]:
    lines = [f"## Speed: decode and prefill per engine ({name})", "",
             f"Data: {provenance(s)}, {s.get('threads', '?')} threads per engine. {s.get('protocol', '')}. "
             f"Measured read bandwidth {s.get('read_bandwidth_gbs', '?')} GB/s; the decode bound is the bytes of "
             "weights one token reads divided by it." + (f" {s['note']}" if s.get("note") else ""), "",
             "Best of the rounds, the median after it where recorded, and every round in brackets: single rounds "
             "on this machine vary by about 15%."
             + (f" llama.cpp: {s['llama_cpp_build']['configuration']} (built with "
                f"{', '.join(s['llama_cpp_build']['features'])})."
                if s.get("llama_cpp_build") else " llama.cpp: llama-cpp-python's default build (not recorded)."), "",
             "| model | engine | decode tok/s | × llama.cpp | prefill tok/s | × llama.cpp | peak RSS GiB | RSS / file |",
             "|---|---|---|---|---|---|---|---|"]
    models = s.get("models", {})

    def rounds(e: dict, key: str) -> str:
        runs = e.get(f"{key}_all_runs")
        return f" ({', '.join(f'{r:g}' for r in runs)})" if runs and len(runs) > 1 else ""

    for model, m in models.items():
        for engine, e in m.get("engines", {}).items():
            median = (f" / {e['decode_median_tok_s']:.2f}" if "decode_median_tok_s" in e else "")
            median_x = (f" / {e['decode_median_vs_llama_cpp']:.2f}" if "decode_median_vs_llama_cpp" in e else "")
            lines.append(f"| {model} | {engine} | {e.get('decode_tok_s', 0):.2f}{median}{rounds(e, 'decode')} | "
                         f"{e.get('decode_vs_llama_cpp', 0):.2f}{median_x} | {e.get('prefill_tok_s', 0):.1f}"
                         f"{rounds(e, 'prefill')} | {e.get('prefill_vs_llama_cpp', 0):.2f} | "
                         f"{e.get('peak_rss_gib', 0):.2f} | {e.get('rss_over_file', 0):.2f} |")
        if "decode_bound_tok_s" in m:
            lines.append(f"| {model} | memory-bandwidth bound | {m['decode_bound_tok_s']:.1f} | | | | | |")
    lines.append("")
    for model, m in models.items():
        files = ", ".join(f"{k} {v} GiB" for k, v in m.get("files_gib", {}).items())
        grid = m.get("grid", "?")
        grid = grid if isinstance(grid, str) else ", ".join(f"{k} {v}" for k, v in grid.items()
                                                           if k in ("quant_method", "bits", "group_size", "sym"))
        lines.append(f"- {model}: checkpoint {grid}; ONNX lm_head {m.get('onnx_lm_head', 'auto')}; files: {files}; "
                     f"weights read per decoded token (ONNX) {m.get('decode_bytes_per_token_gib', '?')} GiB"
                     + (f"; {m['layers']}" if "layers" in m else "")
                     + (f"; ONNX export {m['onnx_export']['seconds']} s at peak RSS {m['onnx_export']['peak_rss_gib']} GiB"
                        if "onnx_export" in m else ""))
    lines.append("")
    if not models:
        return lines

    def draw(plt):
        names = list(models)
        engines = list(dict.fromkeys(e for m in models.values() for e in m.get("engines", {})))
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        width = 0.8 / max(len(engines), 1)
        for ax, metric, label in zip(axes, ("decode_tok_s", "prefill_tok_s", "peak_rss_gib"),
                                     ("decode tokens/s", "prefill tokens/s", "peak RSS GiB")):
            for j, engine in enumerate(engines):
                vals = [models[n].get("engines", {}).get(engine, {}).get(metric, 0) for n in names]
                ax.bar([i + j * width for i in range(len(names))], vals, width, label=engine)
            if metric == "decode_tok_s":
                for i, n in enumerate(names):
                    if "decode_bound_tok_s" in models[n]:
                        ax.hlines(models[n]["decode_bound_tok_s"], i - width / 2, i + width * len(engines),
                                  colors="k", linestyles=":", label="memory-bandwidth bound" if i == 0 else None)
            ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(names))], names, fontsize=7)
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7)
        fig.suptitle("Engines on Kanana-shaped 4-bit models (random weights)")
        return fig, axes

    return lines + [_figure(name, [s], draw), ""]


def serve_section(s: dict) -> list[str]:
    rows = s["rows"]
    lines = ["## Serving: concurrent streaming clients, kanana-quant serve vs llama.cpp's server", "",
             f"Data: {provenance(s)}. Model: {s['model']}. {s['protocol']}. Servers: "
             + "; ".join(f"`{k}` = {v}" for k, v in s["servers"].items()) + ". Each server alone on the machine, "
             "started on a free localhost port and warmed up with one request; the load generator runs beside it "
             "on the same cores.", "",
             "| server | clients | aggregate tok/s | TTFT p50 / p95 s | latency p50 / p95 s | errors | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['clients']} | {r['aggregate_tok_s']:.1f} | {r['ttft_p50_s']} / "
                     f"{r['ttft_p95_s']} | {r['latency_p50_s']} / {r['latency_p95_s']} | {r['errors']} of "
                     f"{r['requests']} | {r.get('peak_rss_gib', '–')} |")
    lines.append("")

    def draw(plt):
        servers = list(dict.fromkeys(r["server"] for r in rows))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in servers:
            mine = [r for r in rows if r["server"] == name]
            clients = [r["clients"] for r in mine]
            axes[0].plot(clients, [r["aggregate_tok_s"] for r in mine], marker="o", label=name)
            axes[1].plot(clients, [r["ttft_p50_s"] for r in mine], marker="o", label=name)
        for ax, label in zip(axes, ("aggregate completion tokens/s", "time to first token, p50 (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["clients"] for r in rows}), [str(c) for c in sorted({r["clients"] for r in rows})])
            ax.set_xlabel("concurrent streaming clients")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7)
        fig.suptitle("SmolLM2-135M 4-bit, same weights in every server")
        return fig, axes

    lines += [_figure("serve", [s], draw), ""]
    if (FIGURES / "serve_chat.png").is_file():
        lines += ["The chat page (`kanana-quant serve` at `/`, headless chromium, "
                  "`python bench/serve.py --screenshot`), SmolLM2 answering a Korean greeting:", "", "![serve_chat](bench/figures/serve_chat.png)", ""]
    return lines


def grammar_section(g: dict) -> list[str]:
    lines = ["## Grammar-constrained decoding: cost per library", "",
             f"Data: {provenance(g)}. Versions: " + ", ".join(f"{k} {v}" for k, v in g["versions"].items())
             + ". The JSON schema's matcher is compiled, then the next-token mask is computed at every step of "
             f"the valid output `{g['output']}` (and, for llguidance, of Kanana's tool-call grammar over "
             f"`{g['tool_output']}`).", "",
             "| vocabulary | library | tokenizer setup s | grammar | compile s | mask mean ms | mask p95 ms | steps |",
             "|---|---|---|---|---|---|---|---|"]
    for vocab, per in g["results"].items():
        for lib, r in per.items():
            if lib == "vocab":
                continue
            for what in ("json_schema", "tool_calls"):
                if what in r:
                    m = r[what]["mask"]
                    lines.append(f"| {vocab} ({per['vocab']:,}) | {lib} | {r['tokenizer_setup_s']} | {what} | "
                                 f"{r[what]['compile_s']} | {m['mean_ms']} | {m['p95_ms']} | {m['steps']} |")
    return lines + [""]


def cost_section(c: dict) -> list[str]:
    lines = ["## Cost of quantizing full-size Kanana shapes", "",
             "Random weights of the real shapes (speed and memory do not depend on values); peak RSS of the whole "
             "quantizing process. Runs of fewer layers than the model has extrapolate the total from the mean "
             "layer time.", "",
             "| preset | method | grid | calibration | threads | layers run | s/layer | total s | peak RSS GiB | source GB "
             "| command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        total = r.get("extrapolated_total_seconds", r["wall_seconds"])
        lines.append(f"| {r['preset']} | {r['method']} | {r['grid']} | {r['calibration']} | {r.get('threads', '2')} "
                     f"| {r['layers_quantized']}"
                     f"/{r['layers_total']} | {r['mean_layer_seconds']:.0f} | {total:.0f} | {r['peak_rss_gib']} | "
                     f"{r['source_gb']} | `{r.get('command', c['machine'].get('command', '?'))}` "
                     f"({r.get('date', c['machine'].get('date', '?'))}) |")
    return lines + [""]


def amx_build_section(a: dict) -> list[str]:
    """amx_build.py: README's install flags against a plain build, both compiled as on an Intel Xeon with AMX."""
    lines = ["## llama.cpp built as on an Intel Xeon with AMX", "",
             f"Data: {provenance(a)}. llama-cpp-python ({a['source']}) built twice with `pip wheel` from its sdist, "
             "as README's install line builds it, with a compiler wrapper that turns ggml's `-march=native` into "
             "`-march=sapphirerapids` (what native means on those Xeons); each wheel's libraries disassembled. "
             "AMX instructions are what ggml's AMX buffer (llama.cpp #20824) compiles to.", "",
             "| CFLAGS / CXXFLAGS | compiles with -march=native | of them with the -mno-amx flags | AMX instructions "
             "| AVX-512 register uses | build s |", "|---|---|---|---|---|---|"]
    for r in a["rows"]:
        amx = ", ".join(f"{lib} {v['amx']}" for lib, v in r["libraries"].items() if v["amx"]) or "0"
        avx512 = sum(v["avx512"] for v in r["libraries"].values())
        lines.append(f"| `{r['cflags'] or '(unset)'}` | {r['native_compiles']} | {r['native_flags_with_amx_off']} "
                     f"| {amx} | {avx512} | {r['seconds']} |")
    return lines + [""]


def kv_cache_section(k: dict) -> list[str]:
    lines = ["## KV-cache types: perplexity cost on long text", "",
             f"Data: {provenance(k)}. {k['model']} scored in {k['windows']} windows of {k['ctx']} tokens of held-out "
             "English and Korean per engine, once per KV type the engine offers (`--kv-type`); the last column is "
             "what that type's cache takes for Kanana-1.5-8B's shape at 32K context.", "",
             "| engine | KV type | PPL en | PPL ko | Δ en vs f32 | Δ ko vs f32 | 8B cache at 32K GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in k["rows"]:
        ref = next(x for x in k["rows"] if x["engine"] == r["engine"] and x["kv_type"] == "f32")
        lines.append(f"| {r['engine']} | {r['kv_type']} | {r['en']:.4f} | {r['ko']:.4f} | {r['en'] - ref['en']:+.4f} | "
                     f"{r['ko'] - ref['ko']:+.4f} | {r['kanana_8b_cache_gib_32k']} |")
    return lines + [""]


def long_context_section(c: dict) -> list[str]:
    """long_context.py: resident memory and decode speed of the 8B shape with a long cache, per engine and KV
    type, each context's rows side by side with llama.cpp's q8_0 cache."""
    lines = ["## Long context: Kanana-1.5-8B shape at 4K–32K tokens", "",
             f"Data: {provenance(c)}, {c['threads']} threads, {c['decode']} decode steps per row. Weights: "
             f"{c['grid']}, files {c['files_gib']} GiB. llama.cpp: {c['llama_cpp_build'].get('configuration', '?')}. "
             + " ".join(c["protocol"].split()), "",
             "| context | engine | KV type | KV cache GiB | RSS GiB | peak RSS GiB | decode tok/s | × llama.cpp q8_0 | measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        if "failed" in r:
            lines.append(f"| {r['context']} | {r['engine']} | {r['kv_type']} | – | failed ({r['failed']}) | | | | |")
            continue
        ref = next((x for x in c["rows"] if x["context"] == r["context"] and x["engine"] == "llama.cpp"
                    and x["kv_type"] == "q8_0" and "failed" not in x), None)
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref else "–"
        lines.append(f"| {r['context']} | {r['engine']} | {r['kv_type']} | {r['kv_cache_gib']} | {r['rss_gib']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | {r['decode_tok_s']:.2f} | {ratio} | {r.get('measured', '')} |")
    return lines + [""]


def embed_quality_section(q: dict) -> list[str]:
    """bench/embed_quality.py: each quantizer's embeddings against the float encoder's, on real text."""
    kinds = [k for k in ("en", "ko", "queries", "pair passages") if k in q["texts"]]
    lines = ["## Embedding fidelity on real weights (SmolLM2-135M as a bidirectional encoder)", "",
             f"Data: {provenance(q)}. {q['model']}; cosine similarity of each quantized encoder's embedding to the "
             f"float encoder's, per text (mean / minimum), on held-out English news and Korean law cut to "
             f"{q['passage_tokens']} tokens, and on the retrieval set's queries (with the instruction prefix) and "
             f"passages; texts: " + ", ".join(f"{k} {n}" for k, n in q["texts"].items()) +
             f". Calibration: {q['calibration']}. Recall@1 / MRR: the encoder on {q.get('pairs', 203)} pairs of the "
             "retrieval set, half English, half Korean (SmolLM2 was not trained for retrieval: these say how much "
             "ranking moves, not how good it is).", "",
             "| method | grid | " + " | ".join(f"cos {k} (mean / min)" for k in kinds) +
             " | cos all (mean / min) | recall@1 | MRR | quantize s |",
             "|---|---|" + "---|" * len(kinds) + "---|---|---|---|"]
    for r in q["rows"]:
        ret = r["retrieval"]["all"]
        if r["method"] == "float":
            lines.append("| float | – | " + " | ".join("1 / 1" for _ in kinds) +
                         f" | 1 / 1 | {ret['recall@1']:.3f} | {ret['mrr']:.3f} | – |")
            continue
        grid = f"{r['bits']}-bit g{r['group']} {'sym' if r['sym'] else 'asym'}"
        cells = " | ".join(f"{r['cosine'][k]['mean']:.5f} / {r['cosine'][k]['min']:.4f}" for k in kinds)
        lines.append(f"| {r['method']} | {grid} | {cells} | {r['cosine_all']['mean']:.5f} / "
                     f"{r['cosine_all']['min']:.4f} | {ret['recall@1']:.3f} | {ret['mrr']:.3f} | "
                     f"{r['quantize_seconds']:.0f} |")
    by = {(r["method"], r.get("bits")): r for r in q["rows"]}
    notes = []
    for bits in sorted({r.get("bits") for r in q["rows"] if r.get("bits")}, reverse=True):
        g, rtn = by.get(("gptq", bits)), by.get(("rtn", bits))
        if g and rtn:
            gap = lambda r: 1 - r["cosine_all"]["mean"]  # noqa: E731
            notes.append(f"{bits}-bit: GPTQ's mean cosine distance {gap(g):.5f} vs RTN's {gap(rtn):.5f} "
                         f"({gap(g) / gap(rtn):.2f}x)")
    return lines + ["", "; ".join(notes) + ".", ""] if notes else lines + [""]


def embed_speed_section(s: dict) -> list[str]:
    """bench/embed_speed.py: embeddings per second, onnxruntime vs numpy, at batch 1 and 16."""
    runs = {(r["engine"], r["batch"]): r for r in s["runs"]}
    gib = 1 << 30
    lines = ["## Embedding speed (kanana-nano-2.1b-embedding shape)", "",
             f"Data: {provenance(s)}. {s['model']}; {s['tokens_per_passage']}-token passages, {s['threads']} "
             "threads per engine, each engine and batch size in its own process after one untimed passage; best "
             "(median) of the timed batches. Files: " +
             ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in s["file_bytes"].items()) + ". Load average (1, 5, "
             f"15 min) before / after the runs: {s['load_average_1_5_15']['before']} / "
             f"{s['load_average_1_5_15']['after']} on {s['machine'].get('cores', '?')} cores (other jobs shared "
             "the machine when it is above the thread count).", "",
             "| batch | onnxruntime embeddings/s | numpy embeddings/s | onnxruntime / numpy | peak RSS GiB: "
             "onnxruntime | numpy |",
             "|---|---|---|---|---|---|"]
    for batch in sorted({b for _, b in runs}):
        o, n = runs.get(("onnxruntime", batch)), runs.get(("numpy", batch))
        if not o:
            continue
        if n:
            cells = (f"{n['embeddings_per_s_best']:.4f} ({n['embeddings_per_s_median']:.4f}) | "
                     f"{o['embeddings_per_s_best'] / n['embeddings_per_s_best']:.0f}x")
            rss = f"{n['peak_rss_bytes'] / gib:.2f}"
        else:
            cells, rss = "not timed | –", "–"
        lines.append(f"| {batch} | {o['embeddings_per_s_best']:.3f} ({o['embeddings_per_s_median']:.3f}) | {cells} | "
                     f"{o['peak_rss_bytes'] / gib:.2f} | {rss} |")
    return lines + [""]


def ecosystem_section(e: dict, contract: dict | None) -> list[str]:
    """The compatibility table of bench/ecosystem.py: each output in each engine that claims to load it."""
    lines = ["## Ecosystem: which engines load which output", "",
             f"Data: {provenance(e)}. Tiny Kanana-shaped models (random weights; dense Llama with 256-wide rows, "
             "Mixtral MoE with 8 experts top-2), quantized by `kanana-quant quantize` with GPTQ (symmetric) and "
             "AWQ (asymmetric) 4-bit group 32, exported with `export onnx --accuracy-level 0 --lm-head float` "
             "and `export gguf --type Q4_0 / F32`, each loaded in the engine named and compared with our numpy "
             f"runtime on the same checkpoint: {e['steps']} greedy tokens after a Korean+English prompt, and the "
             f"prompt's last logits (float32 engines agree within {e['tolerance']:g}). GPTQModel's CPU kernels "
             "compute in bfloat16, so its float32 rows run the transformers model GPTQModel built with the "
             "weights GPTQModel itself dequantized (checked bit for bit against ours); its kernel's own tokens "
             "are noted. Each GPTQModel / transformers load runs in a fresh process (importing gptqmodel patches "
             "transformers' MoE loading).", "",
             "| output | engine | result | greedy tokens equal to ours | max abs logit Δ | notes |",
             "|---|---|---|---|---|---|"]
    for r in e["rows"]:
        notes = []
        if r.get("error"):
            notes.append(f"`{r['error'][:160]}`")
        if r.get("weights_compared"):
            notes.append("dequantized weights bit-identical to ours" if r.get("weights_identical") else
                         f"its dequantization differs from ours by up to {r.get('max_abs_weight_diff', 0):.2g}")
        if r.get("tensors"):
            notes.append(f"{r['tensors']} quantized tensors dequantized by gguf-py, max Δ to ours "
                         f"{r['max_abs_weight_diff']:.2g}")
        if "kernel_tokens_identical" in r:
            notes.append(f"its own kernel ({', '.join(r.get('kernels', []))}): "
                         f"{r['kernel_tokens_identical']}/{r.get('steps', e['steps'])} tokens")
        loading = r.get("loading") or {}
        for key in ("missing_keys", "unexpected_keys"):
            if loading.get(key):
                count = loading[key][-1].split()[1] if loading[key][-1].startswith("...") else len(loading[key])
                notes.append(f"{key.replace('_', ' ')}: {count} (e.g. `{loading[key][0]}`)")
        if r.get("mlp") and r.get("moe"):
            notes.append(f"built as {r.get('class')} with {r['mlp']} blocks")
        if r.get("dequantize_error") or r.get("forward_error"):
            notes.append(f"uninitialised modules: `{(r.get('forward_error') or r.get('dequantize_error'))[:100]}`")
        if r.get("note"):
            notes.append(r["note"])
        tokens = f"{r['tokens_identical']}/{r['steps']}" if "tokens_identical" in r else "–"
        delta = f"{r['max_abs_logit_diff']:.2g}" if "max_abs_logit_diff" in r else "–"
        version = r.get("version", "")
        lines.append(f"| {r['output']} | {r['engine']}{f' ({version})' if version else ''} | **{r['result']}** | "
                     f"{tokens} | {delta} | {'; '.join(notes)} |")
    lines.append("")
    if contract:
        sm = contract["summary"]
        lines += ["### The ONNX graph contract's cost", "",
                  f"Data: {provenance(contract)}, {contract['threads']} threads; {contract['model']}. "
                  f"{contract['protocol']}. Before: the export and engine of the source tree at "
                  f"`{contract['old_tree']}` (seqlens_k / total_sequence_length / logits_index fed by the engine, "
                  "batch fixed at 1); after: this tree's (attention_mask in, seqlens computed inside, symbolic "
                  "batch, logits_to_keep).", "",
                  "| | decode tok/s best / median (rounds) | prefill tok/s best / median (rounds) | peak RSS GiB |",
                  "|---|---|---|---|"]
        for side in ("before", "after"):
            d, p = sm[side]["decode_tok_s"], sm[side]["prefill_tok_s"]
            lines.append(f"| {side} | {d['best']} / {d['median']} ({', '.join(map(str, d['all']))}) | "
                         f"{p['best']} / {p['median']} ({', '.join(map(str, p['all']))}) | "
                         f"{sm[side]['peak_rss_gib']['best']} |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="store_true", help="re-run the benchmarks first")
    args = ap.parse_args()
    if args.run:
        for script in SCRIPTS:
            subprocess.run([sys.executable, str(ROOT / "bench" / script)], check=True)
    quality, gguf_quality, speed, cost = (load(n) for n in ("quality", "gguf_quality", "speed", "quant_cost"))
    lines = ["# Benchmarks", "",
             "Generated by `python bench/report.py` from `bench/results/*.json`; do not edit by hand. "
             "Each section names the machine, the date and the command behind its numbers.", ""]
    if quality:
        lines += quality_section(quality, gguf_quality)
    if gguf_quality:
        lines += gguf_section(gguf_quality)
    for path in sorted(RESULTS.glob("speed*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        lines += tasks_section(result) if "prompts" in result else speed_section(result, path.stem)
    if cost:
        lines += cost_section(cost)
    serve, grammar = load("serve"), load("grammar")
    if serve:
        lines += serve_section(serve)
    if grammar:
        lines += grammar_section(grammar)
    amx_build = load("amx_build")
    if amx_build:
        lines += amx_build_section(amx_build)
    kv_cache, long_context = load("kv_cache"), load("long_context")
    if kv_cache:
        lines += kv_cache_section(kv_cache)
    if long_context:
        lines += long_context_section(long_context)
    embed_speed, embed_quality = load("embed_speed"), load("embed_quality")
    if embed_speed:
        lines += embed_speed_section(embed_speed)
    if embed_quality:
        lines += embed_quality_section(embed_quality)
    ecosystem = load("ecosystem")
    if ecosystem:
        lines += ecosystem_section(ecosystem, load("onnx_contract_speed"))
    missing = [n for n, r in zip(("quality", "gguf_quality", "speed", "quant_cost"),
                                 (quality, gguf_quality, speed, cost)) if r is None]
    if missing:
        lines += [f"Not yet measured: {', '.join(missing)} (no bench/results/<name>.json).", ""]
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
