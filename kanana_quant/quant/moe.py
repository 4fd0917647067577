"""Routing calibration tokens to MoE experts.

Each expert is calibrated on the tokens the router sends it, weighted by their routing weight (the weight
its output gets in the layer). Rarely chosen experts would get an ill-conditioned Hessian, or none at all,
so below `min_tokens` an expert also gets the tokens whose router probability for it is highest, weighted
by that (small) probability: every expert is quantized from real activations, none skipped, none NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kanana_quant.config import MoEConfig


@dataclass
class ExpertTokens:
    rows: torch.Tensor  # token indices into the calibration activations
    weights: torch.Tensor  # per-token weight for the Hessian
    routed: int  # how many of them the router actually sent here (top-k)


def expert_tokens(layer, x: torch.Tensor, moe: MoEConfig, min_tokens: int | None = None) -> list[ExpertTokens]:
    probs, experts, weights = layer.routing(x)
    n = x.shape[0]
    if min_tokens is None:  # a quarter of a fair share, at least 128 tokens
        min_tokens = max(128, n * moe.top_k // moe.num_experts // 4)
    min_tokens = min(min_tokens, n)
    out = []
    for e in range(moe.num_experts):
        rows, slot = torch.nonzero(experts == e, as_tuple=True)
        w = weights[rows, slot].float()
        routed = len(rows)
        if routed < min_tokens:
            score = probs[:, e].clone()
            score[rows] = -1.0  # already included
            extra = torch.topk(score, min_tokens - routed).indices
            rows, w = torch.cat([rows, extra]), torch.cat([w, probs[extra, e].float()])
        out.append(ExpertTokens(rows, w, routed))
    return out
