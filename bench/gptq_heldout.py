"""Where does GPTQ on the Q4_0 GGUF grid lose to llama.cpp's imatrix RTN? Output error tr(D H Dᵀ) of each
rounding of a few SmolLM2 layers' q, gate and down projections on the calibration Hessian and on held-out
English / Korean Hessians (8 × 512 tokens each), relative to llama.cpp's imatrix Q4_0 rounding (= 1).

    python bench/gptq_heldout.py [SAMPLES=16] [LAYERS=0,8,16,24,29]

Roundings: RTN on our clipping grid, and GPTQ (act order) on our clipping grid and on llama.cpp's imatrix
grid, at damping 0.01 and 0.1 and with H shrunk 30% / 60% toward its diagonal. The float model's activations
feed every layer. Prints one line per tensor.
(Issue 19: why GPTQ GGUFs lose to llama.cpp+imatrix on English held-out text.)"""
import sys
import numpy as np
import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import heldout_text
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from kanana_quant.smollm import smollm2_gguf
from kanana_quant.loader import open_model
from kanana_quant.calib import calibration_ids
from kanana_quant.layers_torch import TorchLayer
from kanana_quant.quant.gptq import GPTQ, ColumnGrid
from kanana_quant.quant import ggml_grid
from kanana_quant.quant.ggml_grid import _per_column, _nonzero
from kanana_quant.gguf import blocks
from kanana_quant.quant.grid import QuantSpec

torch.set_num_threads(1)
m = open_model(str(smollm2_gguf()))
cfg, tok = m.config, m.tokenizer
SAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 16
cal = np.asarray(calibration_ids(tok, "builtin", SAMPLES, 512, 0))
def windows(lang, n=8):
    ids = tok.encode(heldout_text(lang))
    return np.asarray(ids[: n * 512]).reshape(n, 512)
embed = m.weights.get("embed")
xs = {"cal": torch.from_numpy(embed[cal]), "en": torch.from_numpy(embed[windows("en")]), "ko": torch.from_numpy(embed[windows("ko")])}

def llama_grid(w, imp):
    d = blocks.fit_q4_0(w.numpy(), imp.numpy()).d.astype(np.float16).astype(np.float32)
    return ColumnGrid(_per_column(_nonzero(d), 32), torch.full_like(w, 8), 15)

def err(D, H):
    return float(((D @ H) * D).sum())

LAYERS = {int(a) for a in (sys.argv[2].split(",") if len(sys.argv) > 2 else "0,8,16,24,29".split(","))}
for i in range(cfg.num_layers):
    w = {r: torch.from_numpy(np.array(a)) for r, a in m.weights.layer(i).items()}
    layer = TorchLayer(cfg, w, 512)
    if i in LAYERS:
        feeds = {"q": layer.attention_input,
                 "gate": lambda x: layer.mlp_input(layer.after_attention(x, layer.attention_context(layer.attention_input(x)))),
                 "down": lambda x: layer.swiglu_hidden(layer.mlp_input(layer.after_attention(x, layer.attention_context(layer.attention_input(x)))))}
        for role, feed in feeds.items():
            acts = {k: feed(x).reshape(-1, w[role].shape[1]) for k, x in xs.items()}
            H = {k: 2 * a.T @ a / a.shape[0] for k, a in acts.items()}
            W = w[role].float()
            imp = torch.diag(H["cal"])
            res = {}
            rtn = dequantize(blocks.quantize_q4_0(W.numpy(), imp.numpy()), T.Q4_0)
            res["rtn-llama-imatrix"] = W - torch.from_numpy(rtn)
            clip = ggml_grid.fitter(T.Q4_0)(W, imp)
            q, wq = clip.grid.round(W, clip.grid.scale, clip.grid.zero)
            res["rtn-clip"] = W - wq
            for gname, gfit in (("clip", lambda w_, i_: ggml_grid.fitter(T.Q4_0)(w_, i_).grid), ("llama", llama_grid)):
                # damping, and shrinking H toward its diagonal (GPTQ's shrink; the GGUF path's default is
                # 0.5): regularisers for a Hessian that fits the calibration tokens too well
                for damp, shrink in ((0.01, 0), (0.1, 0), (0.01, 0.3), (0.01, 0.6)):
                    g = GPTQ(W)
                    g.add_batch(acts["cal"][None])
                    r = g.fasterquant(QuantSpec(4, 32, True), percdamp=damp, act_order=True, grid=gfit,
                                      shrink=shrink)
                    res[f"gptq-{gname}-d{damp}" + (f"-s{shrink}" if shrink else "")] = W - r.weight
            base = {k: err(res["rtn-llama-imatrix"], H[k]) for k in H}
            print(f"layer {i} {role}: " + " | ".join(
                f"{name} " + " ".join(f"{k} {err(D, H[k]) / base[k]:.3f}" for k in H) for name, D in res.items()), flush=True)
    # next layer's inputs: the float model
    with torch.inference_mode():
        xs = {k: layer.forward(x) for k, x in xs.items()}
