"""llama-quantize's file types and its per-tensor type policy (llama_tensor_get_type), for the roles a llama
model has: which GGML type each tensor of a `--type` file gets."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from kanana_quant import names
from kanana_quant.config import ModelConfig
from kanana_quant.errors import KananaQuantError

T = GGMLQuantizationType

# name -> (default tensor type, llama.cpp's general.file_type)
FILE_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (T.F32, LlamaFileType.ALL_F32),
    "F16": (T.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "Q2_K": (T.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "Q3_K_S": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "Q3_K_M": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "Q3_K_L": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    "IQ4_NL": (T.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
    "IQ4_XS": (T.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
    "Q4_K_M": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_M": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS)
# llama-quantize's tensor_type_fallback for rows that are not whole 256-blocks.
K_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}


def file_type_info(file_type: str) -> tuple[str, GGMLQuantizationType, LlamaFileType]:
    key = str(file_type).upper()
    if key not in FILE_TYPES:
        raise KananaQuantError(f"unknown GGUF type {file_type!r}; choose one of: {', '.join(FILE_TYPES)}")
    return (key, *FILE_TYPES[key])


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quantize's choice of layers that get more bits: the first and last eighth, and every third."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _role(name: str) -> tuple[str, int | None]:
    if not name.startswith("layers."):
        return name, None
    _, layer, role = name.split(".", 2)
    return role.rsplit(".", 1)[-1] if role.startswith("experts.") else role, int(layer)


def _v_type(cfg: ModelConfig, key: str, layer: int, default: GGMLQuantizationType) -> GGMLQuantizationType:
    n_gqa = cfg.num_heads // cfg.num_kv_heads
    if key == "Q2_K":
        return T.Q4_K if n_gqa >= 4 else T.Q3_K
    if key == "Q3_K_M":
        return T.Q5_K if layer < 2 else T.Q4_K
    if key == "Q3_K_L":
        return T.Q5_K
    if key in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
        return T.Q5_K
    if key in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, cfg.num_layers):
        return T.Q6_K
    return default


def _down_type(key: str, layer: int, n: int, default: GGMLQuantizationType,
               has_imatrix: bool) -> GGMLQuantizationType:
    if key == "Q2_K":
        return T.Q3_K
    if key == "Q3_K_M":
        return T.Q5_K if layer < n // 16 else T.Q4_K
    if key == "Q3_K_L":
        return T.Q5_K
    if key in ("Q4_K_M", "Q5_K_M"):
        return T.Q6_K if use_more_bits(layer, n) else default
    if key in ("IQ4_NL", "IQ4_XS") and layer < n // 8 and not has_imatrix:
        return T.Q5_K
    if key in ("Q4_0", "Q5_0") and has_imatrix and layer < n // 8:
        # llama.cpp's guard against "craziness" in the first ffn_down layers, only with an imatrix
        return T.Q4_1 if key == "Q4_0" else T.Q5_1
    return default


_O_MOE8_Q5_K = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_M", "IQ4_XS")
_O_TYPES = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}


def _mix(cfg: ModelConfig, name: str, key: str, default: GGMLQuantizationType, cols: int,
         has_imatrix: bool) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl for the roles a llama model has and the file types we write."""
    role, layer = _role(name)
    n, experts = cfg.num_layers, cfg.moe.num_experts if cfg.moe else 0
    if role == "lm_head" or (role == "embed" and cfg.tie_word_embeddings):
        # the output matrix decides quality at every step, so it gets 6 bits whatever the mix
        if cols % GGML_QUANT_SIZES[default][0]:
            return T.Q8_0
        return default if default == T.Q8_0 else T.Q6_K
    if role == "v":
        # Mixtral-8x: V (and K) are tiny next to the experts
        return T.Q8_0 if experts == 8 else _v_type(cfg, key, layer, default)
    if role == "k" and experts == 8:
        return T.Q8_0
    if role == "down":
        return _down_type(key, layer, n, default, has_imatrix)
    if role == "o":
        if experts == 8:
            return T.Q5_K if key in _O_MOE8_Q5_K else default
        return _O_TYPES.get(key, default)
    return default


def _fallback(qtype: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    """llama-quantize's tensor_type_fallback; where it would abort (legacy types on rows that are not whole
    32-blocks) we store F16, its own last resort."""
    if cols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = K_FALLBACK.get(qtype, T.F16)
    return qtype if cols % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def tensor_type(cfg: ModelConfig, name: str, file_type: str, has_imatrix: bool = False) -> GGMLQuantizationType:
    """The GGML type llama-quantize gives a canonical tensor (expert names give their stacked tensor's type)."""
    key, default, _ = file_type_info(file_type)
    shape = names.tensor_shape(cfg, name)
    if len(shape) < 2 or _role(name)[0] == "router":
        return T.F32  # norms, biases and the router stay exact: tiny, and the router picks experts
    if default in FLOAT_TYPES:
        return default
    return _fallback(_mix(cfg, name, key, default, shape[-1], has_imatrix), shape[-1])


def carrier_file_type(fmt) -> str | None:
    """The file type whose main tensor type holds a QuantFormat's codes exactly (for row widths that are
    whole 32-blocks and groups of 32, 64, 128 or per-channel), or None."""
    if fmt.bits <= 4:
        return "Q4_0" if fmt.sym else "Q5_0"
    return "Q8_0" if fmt.bits == 8 and fmt.sym else None
