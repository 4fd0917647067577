"""The onnxruntime engine: runs an ONNX export directory (`kanana-quant export onnx`) with the same
Engine protocol as the numpy runtime (forward / pos / reset), so generate, chat and eval work unchanged.

The KV cache is one preallocated buffer per layer that GroupQueryAttention reads and writes in place (past and
present are bound to the same OrtValue through IO binding); `pos` only says how much of it is valid, so
lowering it rewinds the cache for free. Its storage type is chosen when the engine opens (`kv_type`): the
export declares a float32 cache, and for f16 the engine retypes the graph's cache inputs and outputs before
onnxruntime loads it (GroupQueryAttention computes in float32 and stores the cache in float16). The CLI does
not offer f16 here (runtimes/engines.py says why, with bench/long_context.py's measurement).

The graph is onnxruntime-genai's (onnx_sidecar.py): the engine feeds an all-ones `attention_mask` as wide as
the valid cache plus the new tokens, and prefill asks for the logits of the last position only
(`logits_to_keep` = 1), unless every position's logits are wanted.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from kanana_quant.config import load_config
from kanana_quant.errors import KananaQuantError
from kanana_quant.exporters import onnx_sidecar as sc
from kanana_quant.runtimes.generate import kv_capacity, thread_budget

MIN_CACHE = 256
# the KV types this engine stores: numpy dtype of the buffers, ONNX element type of the graph's cache tensors
KV_DTYPES = {"f32": (np.float32, onnx.TensorProto.FLOAT), "f16": (np.float16, onnx.TensorProto.FLOAT16)}
SPIN_ENV = "KANANA_QUANT_ORT_SPIN"


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or 0  # 0 = onnxruntime's default (one per physical core)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Worker threads spin between ops by default (as llama.cpp's do): decode runs hundreds of small ops per
    # token, and waking sleeping threads for each costs more than the ops on an idle machine. On a machine
    # whose cores are busy with other work spinning steals their time instead; KANANA_QUANT_ORT_SPIN=0 turns
    # it off. Measured (bench/speed.py, 2.1B g128, 2 threads, idle): median decode 25.7 tokens/s spinning,
    # 22.9 sleeping; under contention last session sleeping was faster.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if os.environ.get(SPIN_ENV) == "0" else "1")
    return so


def describe() -> str:
    """The onnxruntime configuration engines here run with, in words (for logs and benchmark records)."""
    spin = "sleeping" if os.environ.get(SPIN_ENV) == "0" else "spinning"
    return f"onnxruntime {ort.__version__}, CPUExecutionProvider, worker threads {spin} between ops"


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, path: Path, max_seq_len: int | None = None, threads: int | None = None,
                 kv_type: str = "f32"):
        path = Path(path)
        if not sc.is_onnx_export(path):
            raise KananaQuantError(f"{path}: not an ONNX export directory (no {sc.SIDECAR} / {sc.MODEL_FILE}); "
                                   "make one with `kanana-quant export onnx`")
        self.path = path
        self.sidecar = sc.read_sidecar(path)
        self.metadata = sc.read_metadata(path)
        self.config = cfg = load_config(path)
        context = int(self.sidecar["model"].get("context_length") or cfg.max_position_embeddings)
        self.max_seq_len = min(max_seq_len or context, context)
        self.kv_dtype = KV_DTYPES[kv_type][0]
        self.session = _open_session(path, threads, cache_type=KV_DTYPES[kv_type][1], layers=cfg.num_layers)
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._ort_cache: list[tuple[ort.OrtValue, ort.OrtValue]] = []
        self._capacity = 0
        self._mask = np.ones((1, 0), np.int64)
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def reserve(self, length: int) -> list[np.ndarray]:
        """Allocate the KV cache for `length` tokens now rather than as the context grows; its buffers, the keys
        then the values of every layer ([1, kv heads, capacity, head dim] each)."""
        self._ensure_cache(length)
        return self._keys + self._values

    def _ensure_cache(self, length: int) -> None:
        capacity = kv_capacity(length, self._capacity, self.max_seq_len, MIN_CACHE)
        if capacity == self._capacity:
            return
        cfg = self.config
        shape = (1, cfg.num_kv_heads, capacity, cfg.head_dim)
        keys, values, bound = [], [], []
        for layer in range(cfg.num_layers):
            k, v = np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)
            if self._keys:  # keep what is cached: it is the prefix of the new buffer
                k[:, :, :self._capacity] = self._keys[layer]
                v[:, :, :self._capacity] = self._values[layer]
            keys.append(k)
            values.append(v)
            # ortvalue_from_numpy wraps the array's memory; the arrays are kept alive in self._keys/_values.
            bound.append((ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)))
        self._keys, self._values, self._ort_cache, self._capacity = keys, values, bound, capacity
        self._mask = np.ones((1, capacity), np.int64)  # attention_mask[:, :total] of every run

    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run new tokens at positions pos.. and append them to the KV cache; logits of the last token, or of
        every new token with all_logits."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        start, t = self.pos, ids.shape[1]
        if t == 0:
            raise KananaQuantError("forward needs at least one token")
        self._ensure_cache(start + t)
        io = self.session.io_binding()
        io.bind_cpu_input(sc.INPUT_IDS, ids)
        io.bind_cpu_input(sc.ATTENTION_MASK, self._mask[:, :start + t])
        kept = t if all_logits else 1
        # an optional input (an initializer with a default): bind_cpu_input looks only at required inputs
        io.bind_ortvalue_input(sc.LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array([kept], np.int64)))
        for layer, (k, v) in enumerate(self._ort_cache):
            past_k, past_v = sc.past_names(layer)
            present_k, present_v = sc.present_names(layer)
            io.bind_ortvalue_input(past_k, k)
            io.bind_ortvalue_input(past_v, v)
            io.bind_ortvalue_output(present_k, k)
            io.bind_ortvalue_output(present_v, v)
        logits = np.empty((1, kept, self.config.vocab_size), np.float32)
        io.bind_ortvalue_output(sc.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(io)
        logits = logits[0]
        self.pos = start + t
        return logits if all_logits else logits[-1]

    def prefill(self, ids) -> np.ndarray:
        self.reset()
        return self.forward(ids)

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward([token_id])


class OnnxEncoder:
    """An embedding model's ONNX export (embed.Encoder): the graph attends both ways and pools itself."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        path = Path(path)
        metadata = sc.read_metadata(path)
        if metadata.get("kind") != "encoder":
            raise KananaQuantError(f"{path}: an ONNX export of a decoder, not of an embedding model")
        self.session = _open_session(path, threads)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, pool_mask: np.ndarray) -> np.ndarray:
        feeds = dict(zip(sc.ENCODER_INPUTS, (np.asarray(a, np.int64) for a in (input_ids, attention_mask, pool_mask))))
        return self.session.run([sc.EMBEDDINGS], feeds)[0]


def _open_session(path: Path, threads: int | None, cache_type: int = onnx.TensorProto.FLOAT,
                  layers: int = 0) -> "ort.InferenceSession":
    """The export's model on the CPU provider, its `layers` KV-cache tensors retyped to `cache_type` when that
    is not the float32 the export declares; an unreadable model is one line naming the file."""
    model_file = path / sc.MODEL_FILE
    options = session_options(thread_budget(threads))
    try:
        if cache_type == onnx.TensorProto.FLOAT:
            return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        # The graph alone (its weights stay in model.onnx.data, which onnxruntime reads from the export folder).
        model = onnx.load(str(model_file), load_external_data=False)
        cache = {name for layer in range(layers) for name in (*sc.past_names(layer), *sc.present_names(layer))}
        for value in (*model.graph.input, *model.graph.output):
            if value.name in cache:
                value.type.tensor_type.elem_type = cache_type
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path))
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnx and onnxruntime raise their own exception types for unreadable models
        raise KananaQuantError(f"{model_file}: onnxruntime cannot load it "
                               f"({str(e).splitlines()[0][:300]}); re-export with `kanana-quant export onnx`")
