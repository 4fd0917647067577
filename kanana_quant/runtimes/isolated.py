"""Engines with native code that can crash (llama.cpp, onnxruntime) run in a child process, so a segfault
there becomes one error line here instead of ending `demo`, `eval` or a benchmark.

The parent keeps the Engine interface (forward / pos / reset); each forward is one request over a socket
pair and one reply carrying the logits as raw float32 bytes (JSON headers, never pickle). An embedding model's
engine (embed.Encoder) runs the same way: its int64 batch goes over as bytes, its embeddings come back. The parent owns
`pos` and sends it with every forward, so rewinding costs no round trip. The child runs in its own session:
Ctrl-C reaches only the parent, which drops the reply of an interrupted forward before its next request. A
child whose parent dies reads end-of-file and exits.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Sequence

import numpy as np

from kanana_quant.errors import EngineCrashed, KananaQuantError

ISOLATED_ENGINES = ("llama.cpp", "onnxruntime")
_HEADER = struct.Struct("<I")


def crash_message(engine: str, path: Path, returncode: int) -> str:
    """One line: the engine, how it died, the likely cause and what to do instead."""
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
    cause, fix = "a fault in its native code", "run the same model with --engine numpy"
    if engine == "llama.cpp":
        from kanana_quant.runtimes.llamacpp_engine import REINSTALL, build_features

        fix = "run an ONNX export with --engine onnxruntime, or this file with --engine numpy"
        if build_features().get("AMX_INT8") == "1":
            cause, fix = "its AMX kernels (llama.cpp #20824)", f"rebuild llama-cpp-python without AMX: {REINSTALL}"
    elif engine == "onnxruntime":
        fix = "re-export with `kanana-quant export onnx`, or run the checkpoint with --engine numpy"
    return f"{engine} crashed ({how}) running {path}; likely cause: {cause}; {fix}"


def _frame(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return _HEADER.pack(len(head)) + head + payload


def _unframe(message: bytes) -> tuple[dict, memoryview]:
    (size,) = _HEADER.unpack_from(message)
    view = memoryview(message)
    return json.loads(view[_HEADER.size:_HEADER.size + size].tobytes()), view[_HEADER.size + size:]


class IsolatedEngine:
    """`engine` ("llama.cpp" or "onnxruntime") on the model at `path`, in a child process."""

    def __init__(self, engine: str, path: Path, max_seq_len: int | None = None, threads: int | None = None,
                 kv_type: str = "f32", kind: str = "decoder"):
        if engine not in ISOLATED_ENGINES:
            raise ValueError(f"no isolated engine {engine!r}")
        self.name, self.path, self.pos = engine, Path(path), 0
        ours, theirs = socket.socketpair()
        spec = {"engine": engine, "path": str(path), "max_seq_len": max_seq_len, "threads": threads,
                "kv_type": kv_type, "kind": kind}
        self._child = subprocess.Popen(
            [sys.executable, "-m", "kanana_quant.runtimes.isolated", str(theirs.fileno()), json.dumps(spec)],
            pass_fds=(theirs.fileno(),), start_new_session=True, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._finalizer = weakref.finalize(self, _stop, self._child, self._conn)
        self._owed = 1  # replies still to be read: the child's "ready", later those of interrupted forwards
        ready, _ = self._reply()
        self.max_seq_len = int(ready["max_seq_len"])
        self.configuration: str = ready["configuration"]

    def _reply(self) -> tuple[dict, memoryview]:
        """The next reply; a dead child becomes EngineCrashed, an error in the child its exception here."""
        try:
            message = self._conn.recv_bytes()
        except (EOFError, OSError):
            self._finalizer()
            raise EngineCrashed(crash_message(self.name, self.path, self._child.wait())) from None
        self._owed -= 1
        header, payload = _unframe(message)
        if "error" in header:
            raise (KananaQuantError if header["user"] else RuntimeError)(header["error"])
        return header, payload

    def _request(self, header: dict, payload: bytes = b"") -> np.ndarray:
        while self._owed:  # a request interrupted by Ctrl-C: its reply is stale
            self._reply()
        try:
            self._conn.send_bytes(_frame(header, payload))
        except OSError:
            self._finalizer()
            raise EngineCrashed(crash_message(self.name, self.path, self._child.wait())) from None
        self._owed += 1
        header, payload = self._reply()
        return np.frombuffer(payload, np.float32).reshape(header["shape"]).copy()

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        ids = [int(i) for i in ids]
        logits = self._request({"pos": self.pos, "ids": ids, "all_logits": all_logits})
        self.pos += len(ids)
        return logits

    def reset(self) -> None:
        self.pos = 0

    def close(self) -> None:
        """End the child (also done when the engine is garbage-collected or the program exits)."""
        self._finalizer()


class IsolatedEncoder(IsolatedEngine):
    """An embedding model's engine (embed.Encoder) in a child process."""

    def __init__(self, engine: str, path: Path, threads: int | None = None):
        super().__init__(engine, path, threads=threads, kind="encoder")

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, pool_mask: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(np.stack([input_ids, attention_mask, pool_mask]), np.int64)
        return self._request({"encode": list(batch.shape)}, batch.tobytes())


def _stop(child: subprocess.Popen, conn: Connection) -> None:
    conn.close()  # the child reads end-of-file and exits
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# ---------------------------------------------------------------------------------------------------------
# The child


def _open(spec: dict):
    path = Path(spec["path"])
    if spec.get("kind") == "encoder":
        return _open_encoder(spec, path)
    if spec["engine"] == "llama.cpp":
        from kanana_quant.loader import open_checkpoint
        from kanana_quant.runtimes.llamacpp_engine import LlamaCppEngine

        engine = LlamaCppEngine(path, open_checkpoint(path).config, max_seq_len=spec["max_seq_len"],
                                threads=spec["threads"], kv_type=spec["kv_type"])
        return engine, engine.configuration
    from kanana_quant.runtimes.onnx_engine import OnnxEngine, describe

    return OnnxEngine(path, max_seq_len=spec["max_seq_len"], threads=spec["threads"],
                      kv_type=spec["kv_type"]), describe()


def _open_encoder(spec: dict, path: Path):
    from kanana_quant.loader import open_checkpoint

    config = open_checkpoint(path).config
    if spec["engine"] == "llama.cpp":
        from kanana_quant.runtimes.llamacpp_engine import LlamaCppEncoder

        engine = LlamaCppEncoder(path, config, threads=spec["threads"])
        configuration = engine.configuration
    else:
        from kanana_quant.runtimes.onnx_engine import OnnxEncoder, describe

        engine, configuration = OnnxEncoder(path, threads=spec["threads"]), describe()
    engine.max_seq_len = config.embedding.max_length
    return engine, configuration


def _error(e: BaseException) -> bytes:
    if isinstance(e, KananaQuantError):
        return _frame({"error": str(e), "user": True})
    import traceback

    traceback.print_exc()
    return _frame({"error": f"{type(e).__name__}: {e}", "user": False})


def child_main(fd: int, spec: dict) -> None:
    conn = Connection(fd)
    try:
        engine, configuration = _open(spec)
    except Exception as e:
        conn.send_bytes(_error(e))
        return
    conn.send_bytes(_frame({"max_seq_len": engine.max_seq_len, "configuration": configuration}))
    while True:
        try:
            request, payload = _unframe(conn.recv_bytes())
        except EOFError:
            return
        try:
            if "encode" in request:
                batch = np.frombuffer(payload, np.int64).reshape(request["encode"])
                out = np.ascontiguousarray(engine.encode(*batch), np.float32)
            else:
                engine.pos = request["pos"]
                out = np.ascontiguousarray(engine.forward(request["ids"], request["all_logits"]), np.float32)
            reply = _frame({"shape": list(out.shape)}, out.tobytes())
        except Exception as e:
            reply = _error(e)
        conn.send_bytes(reply)


if __name__ == "__main__":
    child_main(int(sys.argv[1]), json.loads(sys.argv[2]))
