"""Tensor names: our canonical names and the Hugging Face (Llama, Mixtral, Qwen-MoE) names they map to.

Canonical names are short and architecture-neutral: ``embed``, ``norm``, ``lm_head`` and, per layer,
``layers.{i}.{role}`` with roles below; MoE experts are ``layers.{i}.experts.{e}.{gate|up|down}``.
"""

from __future__ import annotations

from kanana_quant.config import ModelConfig

GLOBAL_HF = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}

ATTENTION_HF = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}
ATTENTION_BIAS_HF = {"q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
                     "v_bias": "self_attn.v_proj.bias"}
QK_NORM_HF = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
DENSE_MLP_HF = {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}

# MoE naming -> (router name, expert name pattern, our projection -> their projection).
MOE_HF = {
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.{p}.weight",
                {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen": ("mlp.gate.weight", "mlp.experts.{e}.{p}.weight",
             {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}

# The linear layers of a decoder layer in calibration order (GPTQ true-sequential groups).
ATTENTION_LINEARS = ("q", "k", "v", "o")
MLP_LINEARS = ("gate", "up", "down")


def layer_roles(cfg: ModelConfig) -> list[str]:
    """Canonical roles present in every decoder layer of this model, experts expanded."""
    roles = list(ATTENTION_HF)
    if cfg.attention_bias:
        roles += list(ATTENTION_BIAS_HF)
    if cfg.qk_norm:
        roles += list(QK_NORM_HF)
    if cfg.moe:
        roles.append("router")
        roles += [f"experts.{e}.{p}" for e in range(cfg.moe.num_experts) for p in MLP_LINEARS]
    else:
        roles += list(MLP_LINEARS)
    return roles


def canonical_names(cfg: ModelConfig) -> list[str]:
    names = ["embed"]
    for i in range(cfg.num_layers):
        names += [f"layers.{i}.{r}" for r in layer_roles(cfg)]
    names.append("norm")
    if not cfg.tie_word_embeddings:
        names.append("lm_head")
    return names


def hf_name(cfg: ModelConfig, name: str) -> str:
    """The Hugging Face tensor name of a canonical name."""
    if name in GLOBAL_HF:
        return GLOBAL_HF[name]
    _, index, role = name.split(".", 2)
    prefix = f"model.layers.{index}."
    for table in (ATTENTION_HF, ATTENTION_BIAS_HF, QK_NORM_HF):
        if role in table:
            return prefix + table[role]
    if cfg.moe:
        router, pattern, proj = MOE_HF[cfg.moe.naming]
        if role == "router":
            return prefix + router
        if role.startswith("experts."):
            _, e, p = role.split(".")
            return prefix + pattern.format(e=e, p=proj[p])
    elif role in DENSE_MLP_HF:
        return prefix + DENSE_MLP_HF[role]
    raise KeyError(f"no tensor role {role!r} in a {cfg.architecture} layer")


def hf_name_map(cfg: ModelConfig) -> dict[str, str]:
    """canonical -> Hugging Face name for every tensor of the model."""
    return {name: hf_name(cfg, name) for name in canonical_names(cfg)}


def tensor_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape a canonical tensor must have (checked when loading, used when synthesising)."""
    h = cfg.hidden_size
    if name in ("embed", "lm_head"):
        return (cfg.vocab_size, h)
    if name == "norm":
        return (h,)
    role = name.split(".", 2)[2]
    if role.startswith("experts."):
        role = role.rsplit(".", 1)[1]
    inter = cfg.moe.expert_intermediate_size if cfg.moe else cfg.intermediate_size
    return {
        "attn_norm": (h,), "ffn_norm": (h,),
        "q": (cfg.q_size, h), "k": (cfg.kv_size, h), "v": (cfg.kv_size, h), "o": (h, cfg.q_size),
        "q_bias": (cfg.q_size,), "k_bias": (cfg.kv_size,), "v_bias": (cfg.kv_size,),
        "q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,),
        "router": (cfg.moe.num_experts if cfg.moe else 0, h),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter),
    }[role]
