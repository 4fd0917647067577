"""Wall time and peak RSS (whole process) of quantizing full-size Kanana shapes with random weights.

    python bench/quant_cost.py [--presets kanana-1.5-2.1b,kanana-1.5-15.7b-a3b] [--method gptq]
                               [--samples 16] [--seq-len 256] [--work DIR]

Each quantization runs as its own `kanana-quant quantize` process, so its peak RSS (getrusage of the child)
is the whole process's. Models are synthesised (bf16, streamed) into --work first and reused afterwards.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import save  # noqa: E402


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of a child process."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    _, status, usage = __import__("os").wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="kanana-1.5-2.1b,kanana-1.5-15.7b-a3b")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    args = parser.parse_args()
    cli = [sys.executable, "-m", "kanana_quant.cli"]
    rows = []
    for preset in args.presets.split(","):
        src = args.work / preset
        if not src.exists():
            seconds, rss = run(cli + ["synth", "--preset", preset, "-o", str(src)])
            print(f"synth {preset}: {seconds:.0f} s, peak RSS {rss:.2f} GiB", flush=True)
        out = args.work / f"{preset}-{args.method}"
        if out.exists():
            __import__("shutil").rmtree(out)
        seconds, rss = run(cli + ["quantize", str(src), "-o", str(out), "--method", args.method,
                                  "--samples", str(args.samples), "--seq-len", str(args.seq_len)])
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        qsize = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows.append({"preset": preset, "method": args.method, "calibration": f"{args.samples} x {args.seq_len}",
                     "seconds": round(seconds, 1), "peak_rss_gib": round(rss, 2), "source_gb": size / 1e9,
                     "quantized_gb": qsize / 1e9})
        print(rows[-1], flush=True)
    print(f"wrote {save('quant_cost', {'rows': rows, 'ru_maxrss_self_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})}")


if __name__ == "__main__":
    main()
