"""ModelConfig: everything a forward pass needs, parsed once from a Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from kanana_quant import kanana
from kanana_quant.errors import KananaQuantError, confined, read_json_object

# Embedding models on a Llama backbone: Kanana2VecModel (its pooling and attention are Kanana facts, kanana.py)
# and Llama-backbone encoders whose config.json declares them with the keys below.
EMBEDDING_ARCHITECTURES = (kanana.EMBEDDING_ARCHITECTURE, "LlamaModel", "LlamaBidirectionalModel", "BiLlamaModel")
POOLINGS = ("mean",)
# Architecture class -> (our family name, MoE tensor naming or None).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", None),
    **{arch: ("llama", None) for arch in EMBEDDING_ARCHITECTURES},
    "MixtralForCausalLM": ("mixtral", "mixtral"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "qwen"),
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MAX_CONFIG_BYTES = 1 << 20
# Caps far above any real model, checked before anything is sized from a config (a hostile config.json or
# GGUF header must not make us build a list of 10^9 tensor names).
MAX_DIM = 1 << 24  # vocab, hidden, intermediate, heads, head_dim, context
MAX_LAYERS = 1024
MAX_EXPERTS = 1024
MAX_EXPERT_MATRICES = 1 << 17  # layers x experts


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RopeScaling:
    """A rope_scaling / rope_parameters block, normalised (the old `type` key becomes `rope_type`)."""

    rope_type: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None = derived from factor (and mscale)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k router probabilities (always true for Mixtral)
    naming: str  # "mixtral" (block_sparse_moe.experts.N.w1/w2/w3) or "qwen" (mlp.experts.N.*_proj)


@dataclass(frozen=True)
class EmbeddingConfig:
    """How an embedding model turns hidden states into one vector per text.

    Read from config.json keys `pooling` ("mean"), `is_causal` (false), `matryoshka_dimensions` (sizes the
    model was trained to be cut to), `query_prefix` (with {instruction}) and `pool_instruction` (whether the
    query prefix is pooled); a Kanana2VecModel config needs none of them (defaults: kanana.py)."""

    pooling: str
    query_prefix: str
    pool_instruction: bool  # False: the prefix's tokens (BOS included) are left out of the mean
    max_length: int
    dimensions: tuple[int, ...]  # allowed output sizes, the full one last


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    moe: MoEConfig | None = None
    attention_bias: bool = False
    qk_norm: bool = False  # Qwen3-MoE normalises q and k per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    embedding: EmbeddingConfig | None = None  # an encoder: bidirectional attention, pooled, no lm_head
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def causal(self) -> bool:
        return self.embedding is None

    @property
    def has_lm_head(self) -> bool:
        """Whether lm_head is a tensor of its own (not tied to the embedding, and not an encoder)."""
        return self.embedding is None and not self.tie_word_embeddings

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        return _parse(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise KananaQuantError(f"{path}: no config.json; pass a Hugging Face model directory")
        return _parse(read_json_object(path, MAX_CONFIG_BYTES), str(path))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in kanana.PRESETS:
            raise KananaQuantError(f"unknown preset {name!r}; choose one of: {', '.join(kanana.PRESETS)}")
        return _parse(dict(kanana.PRESETS[name]), f"preset {name}")

    def num_parameters(self) -> int:
        h, layer = self.hidden_size, 2 * self.hidden_size
        layer += h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            layer += 2 * self.head_dim
        if self.moe:
            layer += self.moe.num_experts * (h + 3 * h * self.moe.expert_intermediate_size)
        else:
            layer += 3 * h * self.intermediate_size
        heads = 2 if self.has_lm_head else 1
        return self.num_layers * layer + heads * self.vocab_size * h + h


def _parse(raw: dict, source: str) -> ModelConfig:
    def need(key: str) -> int:
        value = raw.get(key)
        if value is None:
            raise KananaQuantError(f"{source}: missing {key!r}; is this a complete config.json?")
        return _positive(source, key, value)

    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise KananaQuantError(
            f"{source}: unsupported architecture {_short(archs)}; kanana-quant supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (dense Kanana, Llama-backbone embedding models and Mixtral/Qwen-MoE-named MoE)"
        )
    family, moe_naming = SUPPORTED_ARCHITECTURES[arch]
    embedding = _parse_embedding(raw, source, arch) if arch in EMBEDDING_ARCHITECTURES else None
    if raw.get("hidden_act", "silu") != "silu":
        raise KananaQuantError(f"{source}: hidden_act {_short(raw['hidden_act'])} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise KananaQuantError(f"{source}: mlp_bias=true is not supported")

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise KananaQuantError(f"{source}: hidden_size {hidden} is not a multiple of {heads} heads "
                                   "and no head_dim is given")
        head_dim = hidden // heads
    head_dim = _positive(source, "head_dim", head_dim)
    if head_dim % 2:
        raise KananaQuantError(f"{source}: head_dim must be a positive even number, got {head_dim}")
    kv_heads = _positive(source, "num_key_value_heads", raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise KananaQuantError(f"{source}: {heads} attention heads are not a multiple of {kv_heads} KV heads")
    num_layers = need("num_hidden_layers")
    if num_layers > MAX_LAYERS:
        raise KananaQuantError(f"{source}: num_hidden_layers {num_layers} is over {MAX_LAYERS}; the config is corrupt")
    eps = raw.get("rms_norm_eps", 1e-6)
    if not _is_number(eps) or eps < 0:
        raise KananaQuantError(f"{source}: 'rms_norm_eps' must be a non-negative number, got {_short(eps)}")
    bos = raw.get("bos_token_id")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    for key, value, ids in (("bos_token_id", bos, () if bos is None else (bos,)), ("eos_token_id", eos, eos_ids)):
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_DIM for i in ids):
            raise KananaQuantError(f"{source}: {key} must be a token id or a list of them, got {_short(value)}")

    rope_theta, rope_scaling = _parse_rope(raw, source)
    moe = _parse_moe(raw, source, family, moe_naming) if moe_naming else None
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=moe.expert_intermediate_size if moe else need("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        embedding=embedding and _check_dimensions(embedding, hidden, source),
        rope_theta=rope_theta,
        max_position_embeddings=need("max_position_embeddings"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
        moe=moe,
        attention_bias=bool(raw.get("attention_bias", False)),
        qk_norm=family == "qwen3_moe",
        bos_token_id=bos,
        eos_token_ids=tuple(int(i) for i in eos_ids),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        raw=raw,
    )


def _parse_embedding(raw: dict, source: str, arch: str) -> EmbeddingConfig:
    kanana2vec = arch == kanana.EMBEDDING_ARCHITECTURE
    pooling = raw.get("pooling", kanana.EMBEDDING_POOLING if kanana2vec else None)
    if pooling is None:
        raise KananaQuantError(f"{source}: {arch} as an embedding model needs 'pooling': 'mean' and "
                               "'is_causal': false in config.json (kanana-quant runs mean-pooled bidirectional encoders)")
    if pooling not in POOLINGS:
        raise KananaQuantError(f"{source}: pooling {_short(pooling)} is not supported; kanana-quant pools "
                               f"embeddings by {', '.join(POOLINGS)} (set 'pooling': 'mean')")
    causal = raw.get("is_causal", False if kanana2vec else None)
    if causal is not False:
        mode = "missing" if causal is None else _short(causal)
        raise KananaQuantError(f"{source}: attention mode is_causal={mode} is not supported for {arch}; "
                               "kanana-quant runs embedding models with bidirectional attention ('is_causal': false)")
    prefix = raw.get("query_prefix", kanana.EMBEDDING_QUERY_PREFIX)
    if not isinstance(prefix, str) or "{instruction}" not in prefix:
        raise KananaQuantError(f"{source}: 'query_prefix' must be a string containing {{instruction}}, "
                               f"got {_short(prefix)}")
    pool_instruction = raw.get("pool_instruction", False)
    if not isinstance(pool_instruction, bool):
        raise KananaQuantError(f"{source}: 'pool_instruction' must be true or false, got {_short(pool_instruction)}")
    dims = raw.get("matryoshka_dimensions") or []
    if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise KananaQuantError(f"{source}: 'matryoshka_dimensions' must be a list of positive integers, "
                               f"got {_short(dims)}")
    max_length = raw.get("max_length", kanana.EMBEDDING_MAX_LENGTH)
    return EmbeddingConfig(pooling, prefix, pool_instruction, _positive(source, "max_length", max_length),
                           tuple(sorted(set(dims))))


def _check_dimensions(embedding: EmbeddingConfig, hidden: int, source: str) -> EmbeddingConfig:
    over = [d for d in embedding.dimensions if d > hidden]
    if over:
        raise KananaQuantError(f"{source}: matryoshka_dimensions {over} exceed hidden_size {hidden}")
    dims = tuple(d for d in embedding.dimensions if d != hidden) + (hidden,)
    return EmbeddingConfig(embedding.pooling, embedding.query_prefix, embedding.pool_instruction,
                           embedding.max_length, dims)


def _positive(source: str, key: str, value, limit: int = MAX_DIM) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KananaQuantError(f"{source}: {key!r} must be a positive integer, got {_short(value)}")
    if value > limit:
        raise KananaQuantError(f"{source}: {key!r} is {value}, over {limit}; the config is corrupt")
    return value


def _parse_rope(raw: dict, source: str) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 saves `rope_parameters` (with rope_theta inside); older files `rope_scaling`.
    block = raw.get("rope_parameters") or raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if isinstance(block, dict) and theta is None:
        theta = block.get("rope_theta")
    theta = 10000.0 if theta is None else theta
    if not _is_number(theta) or theta <= 1:
        raise KananaQuantError(f"{source}: rope_theta must be a number above 1, got {_short(theta)}")
    theta = float(theta)
    if not block:
        return theta, None
    if not isinstance(block, dict):
        raise KananaQuantError(f"{source}: rope_scaling must be an object, got {_short(block)}")
    kind = block.get("rope_type") or block.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise KananaQuantError(f"{source}: rope type {_short(kind)} is not supported; use one of "
                               f"{', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    known = {f for f in RopeScaling.__dataclass_fields__} | {"type", "rope_theta", "partial_rotary_factor"}
    unknown = set(block) - known
    if unknown:
        raise KananaQuantError(f"{source}: unsupported rope_scaling keys {_short(sorted(unknown))}")
    if block.get("partial_rotary_factor", 1.0) != 1.0:
        raise KananaQuantError(f"{source}: partial_rotary_factor is not supported")

    def num(key, default=None, positive=True):
        value = block.get(key)
        if value is None:
            return default
        if not _is_number(value) or (positive and value <= 0):
            raise KananaQuantError(f"{source}: rope_scaling.{key} must be a {'positive ' if positive else ''}"
                                   f"number, got {_short(value)}")
        return float(value)

    factor = num("factor")
    if factor is None:
        raise KananaQuantError(f"{source}: rope_scaling.factor must be a positive number, got None")
    original = block.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    if kind in ("llama3", "yarn") and not original:
        original = raw.get("max_position_embeddings")
    if original is not None:
        original = _positive(source, "original_max_position_embeddings", original)
    scaling = RopeScaling(
        rope_type=kind,
        factor=factor,
        original_max_position_embeddings=original,
        low_freq_factor=num("low_freq_factor", 1.0),
        high_freq_factor=num("high_freq_factor", 4.0),
        beta_fast=num("beta_fast", 32.0),
        beta_slow=num("beta_slow", 1.0),
        attention_factor=num("attention_factor"),
        mscale=num("mscale", positive=False),
        mscale_all_dim=num("mscale_all_dim", positive=False),
        truncate=bool(block.get("truncate", True)),
    )
    if kind == "llama3" and scaling.low_freq_factor == scaling.high_freq_factor:
        raise KananaQuantError(f"{source}: llama3 rope_scaling needs low_freq_factor != high_freq_factor")
    return theta, scaling


def _parse_moe(raw: dict, source: str, family: str, naming: str) -> MoEConfig:
    if family == "mixtral":
        experts, inter, norm = raw.get("num_local_experts"), raw.get("intermediate_size"), True
    else:
        experts, inter = raw.get("num_experts"), raw.get("moe_intermediate_size")
        norm = bool(raw.get("norm_topk_prob", False))
        if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
            raise KananaQuantError(f"{source}: dense layers inside an MoE model (mlp_only_layers / "
                                   "decoder_sparse_step) are not supported")
        if raw.get("shared_expert_intermediate_size"):
            raise KananaQuantError(f"{source}: shared experts are not supported (Kanana MoE has none)")
    top_k = raw.get("num_experts_per_tok")
    for key, value in (("experts", experts), ("expert intermediate size", inter), ("num_experts_per_tok", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise KananaQuantError(f"{source}: MoE {key} must be a positive integer, got {_short(value)}")
    inter = _positive(source, "expert intermediate size", inter)
    if experts > MAX_EXPERTS or experts * _positive(source, "num_hidden_layers", raw.get("num_hidden_layers"),
                                                    MAX_LAYERS) > MAX_EXPERT_MATRICES:
        raise KananaQuantError(f"{source}: {experts} experts per layer is over what kanana-quant reads "
                               f"({MAX_EXPERTS}, {MAX_EXPERT_MATRICES} in all); the config is corrupt")
    if top_k > experts:
        raise KananaQuantError(f"{source}: num_experts_per_tok {top_k} exceeds the {experts} experts")
    return MoEConfig(experts, top_k, inter, norm, naming)


def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if path.is_file():
        confined(model_dir, "config.json", str(model_dir))
    return ModelConfig.from_file(path)
