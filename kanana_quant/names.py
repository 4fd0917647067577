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

# MoE tensor layouts -> (router name, expert name pattern, our projection -> their projection).
MOE_LAYOUTS = {
    "block_sparse_moe": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.{p}.weight",
                         {"gate": "w1", "up": "w3", "down": "w2"}),
    "mlp": ("mlp.gate.weight", "mlp.experts.{e}.{p}.weight",
            {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
# The layout a model family's own float checkpoints use (config.MoEConfig.naming -> layout).
SOURCE_LAYOUT = {"mixtral": "block_sparse_moe", "qwen": "mlp"}
# The layout our quantized checkpoints are written in, whatever the source's: the one GPTQModel (the loader
# transformers and vLLM users go through) loads. Measured with GPTQModel 7.7 (bench/ecosystem.py): Mixtral
# experts as block_sparse_moe.experts.E.w1/w2/w3 are refused ("Missing required quantized weights …
# mlp.experts.0.down_proj.qweight") and a block_sparse_moe.gate router is left unused (a random router); as
# mlp.gate + mlp.experts.E.{gate,up,down}_proj the model loads and decodes as ours. transformers 5's Mixtral
# module is named mlp too. Readers accept either layout.
WRITTEN_LAYOUT = "mlp"

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
    if cfg.has_lm_head:
        names.append("lm_head")
    return names


def hf_name(cfg: ModelConfig, name: str, layout: str | None = None) -> str:
    """The Hugging Face tensor name of a canonical name; MoE tensors in `layout` (default: the family's own)."""
    if name in GLOBAL_HF:
        return GLOBAL_HF[name]
    _, index, role = name.split(".", 2)
    prefix = f"model.layers.{index}."
    for table in (ATTENTION_HF, ATTENTION_BIAS_HF, QK_NORM_HF):
        if role in table:
            return prefix + table[role]
    if cfg.moe:
        router, pattern, proj = MOE_LAYOUTS[layout or SOURCE_LAYOUT[cfg.moe.naming]]
        if role == "router":
            return prefix + router
        if role.startswith("experts."):
            _, e, p = role.split(".")
            return prefix + pattern.format(e=e, p=proj[p])
    elif role in DENSE_MLP_HF:
        return prefix + DENSE_MLP_HF[role]
    raise KeyError(f"no tensor role {role!r} in a {cfg.architecture} layer")


def hf_name_map(cfg: ModelConfig, layout: str | None = None) -> dict[str, str]:
    """canonical -> Hugging Face name for every tensor of the model (MoE tensors in `layout`, default the
    family's own)."""
    return {name: hf_name(cfg, name, layout) for name in canonical_names(cfg)}


def moe_layout(cfg: ModelConfig, tensor_names) -> str | None:
    """The MoE layout a checkpoint's tensors are in: the family's own, or another one whose first router is
    present (our quantized checkpoints write WRITTEN_LAYOUT); None for dense models."""
    if not cfg.moe:
        return None
    own = SOURCE_LAYOUT[cfg.moe.naming]
    present = set(tensor_names)
    for layout in (own, *(k for k in MOE_LAYOUTS if k != own)):
        if "model.layers.0." + MOE_LAYOUTS[layout][0] in present:
            return layout
    return own  # neither: the missing-tensor error names the family's own tensor


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
