"""Fuzz the readers of untrusted files far longer than the test suite does, and say how many inputs were tried.

    python bench/fuzz.py                       # hypothesis: 2000 inputs per target (tests/test_fuzz.py), random seeds
    python bench/fuzz.py --examples 20000
    python bench/fuzz.py --atheris 300         # + coverage-guided libFuzzer (atheris) on the GGUF and
                                               #   safetensors readers, 300 s each

Every input must load or fail with a one-line KananaQuantError; anything else is a bug and is printed with the
input that caused it (hypothesis prints a reproduction blob; atheris writes a crash-* file). Children run
under a 4 GiB address-space limit, so an input that makes a reader allocate without bound fails as a
MemoryError instead of swapping the machine to death.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 4 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_hypothesis(examples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "KQ_FUZZ_EXAMPLES": str(examples), "KQ_FUZZ_RANDOM": "1", "KQ_FUZZ_REPORT": str(report),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                                 str(ROOT / "tests" / "test_fuzz.py")], cwd=ROOT, env=env,
                                preexec_fn=_limit_memory)
        seconds = time.perf_counter() - start
        data = json.loads(report.read_text()) if report.is_file() else {"tried": {}, "outcomes": {}}
    return {"engine": "hypothesis", "seconds": round(seconds, 1), "passed": result.returncode == 0, **data}


# ---------------------------------------------------------------------------------------------------------
# atheris (coverage-guided): runs in a child process per target, because libFuzzer owns the process
# ---------------------------------------------------------------------------------------------------------

ATHERIS_CHILD = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import atheris
with atheris.instrument_imports():
    from kanana_quant import gguf, safetensors_io, tokenizer
from kanana_quant.errors import KananaQuantError
import test_fuzz

target, corpus, report = sys.argv[2], sys.argv[3], sys.argv[4]
reader = test_fuzz.read_gguf if target == "gguf" else test_fuzz.read_safetensors
path = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else corpus, f"kq-atheris-{os.getpid()}.{target}")
counts = {"tried": 0, "ok": 0, "error": 0}

def one_input(data: bytes) -> None:
    counts["tried"] += 1
    with open(path, "wb") as f:
        f.write(data)
    try:
        reader(path)
        counts["ok"] += 1
    except KananaQuantError as e:
        assert "\n" not in str(e), str(e)
        counts["error"] += 1
    if counts["tried"] % 256 == 0:  # libFuzzer leaves through C exit(): no atexit, so report as we go
        with open(report, "w") as f:
            f.write(json.dumps(counts))

atheris.Setup([sys.argv[0], corpus, *sys.argv[5:]], one_input)
atheris.Fuzz()
"""


def run_atheris(seconds: int) -> list[dict]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install atheris); skipping the coverage-guided run")
        return []
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fuzz import build_seeds

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        seeds = build_seeds(Path(tmp) / "seeds")
        for target, files in (("gguf", [seeds["gguf"], seeds["gguf_k"]]),
                              ("safetensors", [seeds["safetensors"], seeds["hf"] / "model.safetensors"])):
            corpus = Path(tmp) / f"corpus-{target}"
            corpus.mkdir()
            for f in files:
                (corpus / f.name).write_bytes(f.read_bytes())
            report = Path(tmp) / f"{target}.json"
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", ATHERIS_CHILD, str(ROOT), target, str(corpus), str(report),
                                     f"-max_total_time={seconds}", "-rss_limit_mb=4096", "-timeout=10",
                                     f"-artifact_prefix={ROOT}/crash-{target}-", "-print_final_stats=1"],
                                    cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                    capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            counts = json.loads(report.read_text()) if report.is_file() else {}
            for line in result.stderr.splitlines():  # libFuzzer's own count is exact
                if line.startswith("stat::number_of_executed_units:"):
                    counts["tried"] = int(line.split(":")[-1])
            if result.returncode != 0:
                print(result.stderr[-3000:])
            results.append({"engine": "atheris", "target": target, "seconds": round(elapsed, 1),
                            "passed": result.returncode == 0, **counts})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="hypothesis inputs per fuzz test")
    parser.add_argument("--atheris", type=int, default=0, metavar="SECONDS",
                        help="also run atheris this many seconds per target (0 = no)")
    args = parser.parse_args()
    runs = [run_hypothesis(args.examples)]
    if args.atheris:
        runs += run_atheris(args.atheris)
    total = 0
    for run in runs:
        if run["engine"] == "hypothesis":
            for target, n in sorted(run["tried"].items()):
                ok = run["outcomes"].get(f"{target}/ok", 0)
                print(f"hypothesis  {target:22} {n:7d} inputs ({ok} loaded, {n - ok} refused with one line)")
                total += n
            print(f"hypothesis  {'all targets':22} {sum(run['tried'].values()):7d} inputs in {run['seconds']} s: "
                  f"{'no failures' if run['passed'] else 'FAILED (see above)'}")
        else:
            n = run.get("tried", 0)
            total += n
            print(f"atheris     {run['target']:22} {n:7d} inputs in {run['seconds']} s: "
                  f"{'no failures' if run['passed'] else 'FAILED (see above)'}")
    print(f"total: {total} inputs")
    sys.exit(0 if all(r["passed"] for r in runs) else 1)


if __name__ == "__main__":
    main()
