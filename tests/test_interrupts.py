"""Killing the CLI at random moments: outputs appear complete or not at all, and a killed quantize resumes to
the same bytes.

`synth`, `export gguf` and `quantize` run in a subprocess whose tensor writes are slowed down (a sleep per
tensor, added by the driver below, not by the library), so that kill times drawn at random (seeded,
stratified over the run) land before, inside and after the writes. After SIGINT or SIGKILL the output path
must either not exist or hold exactly what an uninterrupted run writes; after SIGINT or SIGTERM nothing
else may be left (quantize's resume state aside); after SIGKILL only dot-named temporaries may be, never under the output's name, and the next run
removes them. A killed quantize then finishes with --resume (or afresh, if it died before its first state
file) bit-identical to an uninterrupted run.

KQ_KILL_TRIALS (default 3 per command) runs more trials; KQ_KILL_SEED changes the draw.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kanana_quant.errors import KananaQuantError
from kanana_quant.loader import open_model
from kanana_quant.synth import TINY, synth_model

TRIALS = int(os.environ.get("KQ_KILL_TRIALS", "3"))
SEED = int(os.environ.get("KQ_KILL_SEED", "6"))
SLOW = 0.04  # seconds of sleep per tensor written, in the child only

DRIVER = r"""
import os, sys, time
slow = float(os.environ["KQ_SLOW"])

def slowed(write):
    def wrapper(path, specs, produce, metadata=None):
        def slow_produce(spec):
            time.sleep(slow)
            return produce(spec)
        return write(path, specs, slow_produce, metadata)
    return wrapper

import kanana_quant.checkpoint as checkpoint
checkpoint.write_safetensors = slowed(checkpoint.write_safetensors)
if sys.argv[1] == "quantize":
    import kanana_quant.quant.sinks as sinks
    sinks.write_safetensors = slowed(sinks.write_safetensors)
if sys.argv[1] == "export":
    import gguf
    write_tensor_data = gguf.GGUFWriter.write_tensor_data
    def slow_write(self, *args, **kwargs):
        time.sleep(slow)
        return write_tensor_data(self, *args, **kwargs)
    gguf.GGUFWriter.write_tensor_data = slow_write
from kanana_quant.cli import main
sys.argv = ["kanana-quant", *sys.argv[1:]]
sys.stderr.write("GO\n")
sys.stderr.flush()
main()
"""

QUANT_ARGS = ["--method", "gptq", "--group-size", "32", "--samples", "8", "--seq-len", "64"]


def run_killed(args: list[str], delay: float, sig: int) -> tuple[int, str]:
    """Start the CLI, wait until its imports are done, then `delay` seconds, then send `sig`."""
    env = {**os.environ, "KQ_SLOW": str(SLOW)}
    child = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    assert child.stderr.readline().strip() == "GO"
    time.sleep(delay)
    if child.poll() is None:
        child.send_signal(sig)
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr


def kill_plan(command: str, span: float) -> list[tuple[float, int]]:
    """Seeded kill times, one per stratum of [0, span], rotating SIGINT (Ctrl-C), SIGKILL and SIGTERM."""
    rng = random.Random(f"{SEED}-{command}")
    signals = [signal.SIGINT, signal.SIGKILL, signal.SIGTERM]
    first = rng.randrange(3)
    return [(span * (k + rng.random()) / TRIALS, signals[(first + k) % 3]) for k in range(TRIALS)]


def leftovers(folder: Path, out: Path, allowed: set[str] = frozenset()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != out.name and p.name not in allowed)


def files_of(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def check_killed_outcome(code: int, stderr: str, sig: int, out: Path, reference: dict[str, bytes],
                         allowed: set[str] = frozenset()) -> str:
    """Either no output, or the complete one; what is left beside it. Returns a label for the report."""
    if sig != signal.SIGKILL:  # Ctrl-C, or a `kill`: the CLI cleans up and exits 130
        # 0: it finished before the signal; -sig: the signal hit interpreter shutdown, after the work (Python
        # restores the default handlers there)
        assert code in (0, 130, -sig), stderr
        if code == 130:
            assert "Traceback" not in stderr, stderr
    else:
        assert code in (0, -signal.SIGKILL), stderr
    if out.exists():
        got = files_of(out)
        for name, data in reference.items():
            assert got.get(name) == data, f"{name} differs from an uninterrupted run"
        if "quantize_report.json" in got:
            json.loads(got["quantize_report.json"])
    else:
        with pytest.raises(KananaQuantError):  # nothing half-written is taken for the model
            open_model(str(out))
    left = leftovers(out.parent, out, allowed)
    if sig != signal.SIGKILL:
        assert left == [], f"{signal.Signals(sig).name} left {left}"
    else:
        assert all(name.startswith(f".{out.name}.partial-") for name in left), left
    return f"{signal.Signals(sig).name} → {'complete' if out.exists() else 'absent'}, leftovers {len(left)}"


def test_synth_killed_at_random_moments(tmp_path):
    reference = files_of(synth_model(tmp_path / "reference", TINY["dense"], seed=0))
    outcomes = []
    for k, (delay, sig) in enumerate(kill_plan("synth", span=0.4 + 20 * SLOW + 0.3)):
        work = tmp_path / f"run{k}"
        work.mkdir()
        out = work / "model"
        code, stderr = run_killed(["synth", "--tiny", "dense", "-o", out], delay, sig)
        outcomes.append(f"{delay:.2f} s: " + check_killed_outcome(code, stderr, sig, out, reference))
        if not out.exists():  # the next run completes and sweeps what a SIGKILL left
            synth_model(out, TINY["dense"], seed=0)
            assert files_of(out) == reference
        assert leftovers(work, out) == []
    print("\nsynth:", "; ".join(outcomes))


def test_export_gguf_killed_at_random_moments(tiny_dense, tmp_path):
    from kanana_quant.gguf.writer import export_gguf

    reference = files_of(export_gguf(open_model(str(tiny_dense)), tmp_path / "reference.gguf", "Q8_0"))
    reference = {"tiny.gguf": reference["reference.gguf"]}
    outcomes = []
    for k, (delay, sig) in enumerate(kill_plan("gguf", span=0.3 + 21 * SLOW + 0.3)):
        work = tmp_path / f"run{k}"
        work.mkdir()
        out = work / "tiny.gguf"
        code, stderr = run_killed(["export", "gguf", tiny_dense, "-o", out, "--type", "Q8_0"], delay, sig)
        outcomes.append(f"{delay:.2f} s: " + check_killed_outcome(code, stderr, sig, out, reference))
        if not out.exists():
            export_gguf(open_model(str(tiny_dense)), out, "Q8_0")
            assert files_of(out) == reference
        assert leftovers(work, out) == []
    print("\nexport gguf:", "; ".join(outcomes))


def test_quantize_killed_then_resumed_is_bit_identical(tiny_dense, tmp_path):
    from kanana_quant.qcheckpoint import QuantFormat
    from kanana_quant.quant.driver import quantize_model
    from kanana_quant.quant.options import QuantOptions

    opts = QuantOptions(QuantFormat("gptq", 4, 32, True), samples=8, seq_len=64)
    reference = files_of(quantize_model(open_model(str(tiny_dense)), tmp_path / "reference", opts))
    reference.pop("quantize_report.json")  # it records seconds per layer
    outcomes = []
    for k, (delay, sig) in enumerate(kill_plan("quantize", span=6.0)):
        work = tmp_path / f"run{k}"
        work.mkdir()
        out = work / "q"
        code, stderr = run_killed(["quantize", tiny_dense, "-o", out, *QUANT_ARGS], delay, sig)
        label = f"{delay:.2f} s: " + check_killed_outcome(code, stderr, sig, out, reference, allowed={".q.work"})
        state = work / ".q.work" / "state.json"
        if not out.exists():
            resumed = state.is_file()
            label += f", resumed after layer {json.loads(state.read_text())['done']}" if resumed else ", restarted"
            quantize_model(open_model(str(tiny_dense)), out, opts, resume=resumed)
        got = files_of(out)
        assert {n: got[n] for n in reference} == reference, "the resumed checkpoint differs"
        assert leftovers(work, out) == [], leftovers(work, out)
        outcomes.append(label)
    print("\nquantize:", "; ".join(outcomes))
