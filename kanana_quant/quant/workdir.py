"""The resumable work folder beside a quantization's output: `.OUT.work/`.

It holds a fingerprint of the run (source, config, options, output kind), how many layers are done
(state.json, rewritten atomically after each), each finished layer's tensors (layerN.safetensors), and the
calibration activations as two disk memmaps that alternate as the input and output of the layer being
quantized (the page cache keeps them in RAM when they fit). `--resume` continues at the next layer and
produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kanana_quant.atomic import atomic_file
from kanana_quant.errors import KananaQuantError
from kanana_quant.quant.options import LayerReport

STATE = "state.json"


def work_path(out: Path) -> Path:
    """The work folder of an output: hidden, beside it, so it shares its disk."""
    return Path(out).parent / f".{Path(out).name}.work"


class WorkDir:
    def __init__(self, out: Path, facts: dict, acts_shape: tuple[int, int, int]):
        """facts: what must match for a resume (source, config, options...); acts_shape: [samples, seq, hidden]."""
        self.out = Path(out)
        self.path = work_path(self.out)
        self.fingerprint = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
        self.acts_shape = acts_shape

    def _state(self) -> dict | None:
        path = self.path / STATE
        return json.loads(path.read_text()) if path.is_file() else None

    def _save(self, state: dict) -> None:
        with atomic_file(self.path / STATE) as tmp:
            tmp.write_text(json.dumps(state))

    def resume_from(self, resume: bool) -> int | None:
        """The first layer still to quantize when an interrupted run of these settings is there to resume,
        None when a fresh run may start; anything else is one-line error."""
        if self.out.exists():
            raise KananaQuantError(f"{self.out}: already exists; choose another output or remove it first")
        state = self._state()
        if state and not resume:
            raise KananaQuantError(f"{self.path}: an interrupted run is there; pass --resume to continue it "
                                   "or delete that folder to start over")
        if state and state["fingerprint"] != self.fingerprint:
            raise KananaQuantError(f"{self.path}: the interrupted run used other settings or another model; "
                                   "delete that folder to start over")
        if state:
            return state["done"] + 1
        if resume:
            raise KananaQuantError(f"{self.path}: nothing to resume (no interrupted run for {self.out})")
        return None

    def create(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)

    def started(self) -> None:
        """The fresh run's setup is complete (activations written): from now on it can be resumed."""
        self._save({"fingerprint": self.fingerprint, "done": -1})

    def layer_done(self, report: LayerReport) -> None:
        state = self._state()
        state["done"] = report.layer
        state.setdefault("reports", []).append(asdict(report))
        self._save(state)

    def reports(self) -> list[dict]:
        return (self._state() or {}).get("reports", [])

    def acts(self, which: int, mode: str) -> np.memmap:
        """Activation buffer `which` (0 or 1; layer i reads i % 2 and writes (i + 1) % 2)."""
        return np.memmap(self.path / f"acts{which % 2}.f32", dtype=np.float32, mode=mode, shape=self.acts_shape)

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer{i}.safetensors"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
