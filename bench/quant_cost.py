"""Wall time and peak RSS (whole process) of quantizing full-size Kanana shapes with random weights.

    python bench/quant_cost.py [--presets kanana-1.5-2.1b,kanana-1.5-15.7b-a3b] [--method gptq]
                               [--samples 16] [--seq-len 256] [--layers N] [--work DIR]

Each quantization runs in its own child process, so its peak RSS (getrusage of the child) is the whole
process's. Models are synthesised (bf16, streamed) into --work first and reused afterwards. With --layers N
only the first N decoder layers are quantized (no checkpoint is assembled): the report then gives the
measured per-layer time, and the whole-model time is an extrapolation, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import earlier_rows, save  # noqa: E402


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of a child process."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def child(src: str, out: str, method: str, samples: int, seq_len: int, layers: int) -> None:
    """Quantize the first `layers` layers (all: the whole checkpoint); print per-layer seconds as JSON."""
    from kanana_quant.loader import open_model
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions
    from kanana_quant.quant.workdir import work_path

    model = open_model(src)
    opts = QuantOptions(QuantFormat(method, 4, 128, True), samples=samples, seq_len=seq_len)
    n = model.config.num_layers if layers <= 0 else layers
    seconds = []

    class Enough(Exception):
        """The layers to time are done: stop before the rest (and the checkpoint)."""

    def on_layer(report) -> None:
        seconds.append(report.seconds)
        print(f"layer {report.layer}: {report.seconds:.1f} s" + (
            f", routed tokens per expert {min(report.expert_tokens)}..{max(report.expert_tokens)}"
            if report.expert_tokens else ""), file=sys.stderr, flush=True)
        if len(seconds) == n < model.config.num_layers:
            raise Enough

    try:
        quantize_model(model, Path(out), opts, on_layer=on_layer)
    except Enough:
        shutil.rmtree(work_path(Path(out)))
    print(json.dumps({"layer_seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="kanana-1.5-2.1b,kanana-1.5-15.7b-a3b")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=0, help="quantize only the first N layers (0 = all)")
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        src, out, method, samples, seq_len, layers = args.child
        return child(src, out, method, int(samples), int(seq_len), int(layers))
    rows = []
    for preset in args.presets.split(","):
        src = args.work / preset
        if not src.exists():
            seconds, rss = run([sys.executable, "-m", "kanana_quant.cli", "synth", "--preset", preset, "-o", str(src)])
            print(f"synth {preset}: {seconds:.0f} s, peak RSS {rss:.2f} GiB", flush=True)
        out = args.work / f"{preset}-{args.method}"
        shutil.rmtree(out, ignore_errors=True)
        log = args.work / f"{preset}-{args.method}.json"
        cmd = [sys.executable, __file__, "--child", str(src), str(out), args.method, str(args.samples),
               str(args.seq_len), str(args.layers)]
        with open(log, "w") as f:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=f)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
        layer_seconds = json.loads(log.read_text())["layer_seconds"]
        from kanana_quant.config import load_config

        n_layers = load_config(src).num_layers
        row = {"preset": preset, "method": args.method, "grid": "4-bit g128 sym",
               "calibration": f"{args.samples} x {args.seq_len} tokens (built-in set)",
               "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
               "layers_quantized": len(layer_seconds), "layers_total": n_layers,
               "wall_seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
               "mean_layer_seconds": round(sum(layer_seconds) / len(layer_seconds), 1),
               "source_gb": round(sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9, 2)}
        if len(layer_seconds) < n_layers:
            row["extrapolated_total_seconds"] = round(row["mean_layer_seconds"] * n_layers)
        else:
            row["quantized_gb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 2)
        row["command"] = " ".join(["quant_cost.py", *sys.argv[1:]])
        row["date"] = time.strftime("%Y-%m-%d")
        rows.append(row)
        print(row, flush=True)
    print(f"wrote {save('quant_cost', {'rows': merged(rows)})}")


def merged(rows: list[dict]) -> list[dict]:
    """Earlier results for other presets/methods stay: each run measures only the presets it was given."""
    new = {(r["preset"], r["method"]) for r in rows}
    return earlier_rows("quant_cost", lambda r: (r["preset"], r["method"]) in new) + rows


if __name__ == "__main__":
    main()
