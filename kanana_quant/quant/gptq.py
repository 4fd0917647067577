"""GPTQ (Frantar et al. 2022): quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer-reconstruction loss ||X Wᵀ − X Qᵀ||².

Groups are always contiguous runs of `group_size` columns in the original order, so the result stores like RTN
(trivial g_idx). With act-order the columns are visited in descending diag(H) order, which would scatter
lazily-fitted groups; hence every group's (scale, zero) is fitted up front on the original weights
("static groups", as GPTQModel does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kanana_quant.errors import KananaQuantError
from kanana_quant.quant.grid import QuantSpec, fit_params, quantize

DAMP_RETRIES = 4  # each retry multiplies the damping by 10


@dataclass
class GPTQResult:
    codes: torch.Tensor   # uint8 [out, in], original column order
    scales: torch.Tensor  # float32 [out, n_groups], fp16-representable
    zeros: torch.Tensor   # float32 [out, n_groups]
    weight: torch.Tensor  # float32 [out, in] == scales · (codes − zeros), per group
    loss: float           # Σ err² / d², the quantity GPTQ minimises greedily (reference's Losses.sum())


@dataclass
class ColumnGrid:
    """A grid fixed before GPTQ runs: column c of row r may take scale[r, c] · (q − zero[r, c]),
    q ∈ [0, maxq]; zero may be fractional (K-quants' sub-block minimum). With `levels` (a non-linear grid such
    as IQ4's) the values are scale[r, c] · levels[q] instead, and zero is unused."""
    scale: torch.Tensor  # float32 [out, in], non-zero
    zero: torch.Tensor   # float32 [out, in]
    maxq: int
    levels: torch.Tensor | None = None  # float32 [maxq + 1], ascending

    def to(self, device) -> "ColumnGrid":
        return ColumnGrid(self.scale.to(device), self.zero.to(device), self.maxq,
                          None if self.levels is None else self.levels.to(device))

    def round(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of w on columns with scale s and zero z, and their values."""
        if self.levels is None:
            q = torch.clamp(torch.round(w / s + z), 0, self.maxq)  # zero may be fractional: round after adding
            return q, s * (q - z)
        mids = (self.levels[1:] + self.levels[:-1]) / 2
        q = torch.bucketize(w / s, mids)
        return q.to(w.dtype), s * self.levels[q]

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        if self.levels is None:
            return self.scale * (codes - self.zero)
        return self.scale * self.levels[codes.long()]


def _hinv_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹. Calibration Hessians are often rank-deficient (few tokens,
    MoE experts), so damping is raised rather than failing; a diagonal H (plain RTN) is the last resort."""
    mean_diag = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(DAMP_RETRIES + 1):
        p = percdamp if attempt == 0 else max(percdamp, 1e-3) * 10 ** attempt
        # With J the exchange (flip) matrix and J·H·J = M·Mᵀ, the upper Cholesky factor of H⁻¹ is J·M⁻¹·J:
        # one Cholesky and one triangular inverse instead of forming H⁻¹ and factoring it again (~3x less
        # work at 8064 columns; torch's CPU cholesky_inverse is also pathologically slow in 2.13).
        Hd = torch.flip(H, (0, 1))
        Hd[idx, idx] += p * mean_diag
        M, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            U = torch.flip(torch.linalg.solve_triangular(M, eye, upper=False), (0, 1))
            if torch.isfinite(U).all() and bool((torch.diagonal(U) > 0).all()):
                return U
    return torch.diag(torch.rsqrt(torch.diag(H) + mean_diag))


def _add_to_mean(H: torch.Tensor, nsamples: float, x: torch.Tensor, w: torch.Tensor) -> float:
    """Fold tokens x (rows) with weights w into H = 2/N Σ w_t x_t x_tᵀ, a running mean over the token weight
    N = nsamples so far, in place; returns the new N."""
    mass = float(w.sum())
    if mass <= 0:
        return nsamples
    # Rescale the old mean before adding, so H never holds an unnormalised float32 sum over many tokens.
    H *= nsamples / (nsamples + mass)
    nsamples += mass
    x = x * torch.sqrt(2 * w / nsamples).unsqueeze(1)
    H += x.T @ x
    return nsamples


class HessianMean:
    """H = 2/N Σ w_t x_t x_tᵀ as a running mean over the token weight N seen so far."""

    def __init__(self, columns: int, device):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0.0

    def add(self, x: torch.Tensor, w: torch.Tensor) -> None:
        self.nsamples = _add_to_mean(self.H, self.nsamples, x, w)


class GPTQ:
    def __init__(self, weight: torch.Tensor, split: bool = False):
        """split: also keep the Hessians of the even and of the odd calibration sequences apart (`halves`), so
        that GPTQ fitted on one half can be scored on held-out tokens (gguf_sink's never-worse-than-RTN guard)."""
        self.W = weight.detach().to(torch.float32).clone()
        self.rows, self.columns = self.W.shape
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.W.device)
        self.nsamples = 0.0  # total token weight so far: H is kept as a running mean over it
        self.tokens = 0
        self.sequences = 0
        self.halves = (HessianMean(self.columns, self.W.device), HessianMean(self.columns, self.W.device)) \
            if split else None

    def add_batch(self, inp: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Accumulate H = 2/N Σ w_t x_t x_tᵀ over tokens x_t (rows of inp) with optional weights w_t ≥ 0
        (router probabilities for MoE experts); N = Σ w_t, so a weight of 2 counts a token twice.
        inp [sequences, tokens, columns] also feeds the even/odd halves when the solver splits."""
        x = inp.detach().reshape(-1, self.columns).to(self.W.device, torch.float32)
        self.tokens += x.shape[0]
        if weight is None:
            w = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        else:
            w = weight.detach().reshape(-1).to(x.device, torch.float32)
            if w.shape[0] != x.shape[0] or bool((w < 0).any()):
                raise ValueError(f"GPTQ.add_batch: need {x.shape[0]} non-negative token weights, got {tuple(w.shape)}")
        if self.halves is not None and inp.dim() == 3:
            per_seq = inp.shape[1]
            seq = self.sequences + torch.arange(x.shape[0], device=x.device) // per_seq
            for parity, half in enumerate(self.halves):
                rows = seq % 2 == parity
                half.add(x[rows], w[rows])
            self.sequences += inp.shape[0]
        self.nsamples = _add_to_mean(self.H, self.nsamples, x, w)

    def fasterquant(self, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = True,
                    static_groups: bool = True, search: bool = True,
                    grid: Callable[[torch.Tensor], ColumnGrid] | None = None, shrink: float = 0.0) -> GPTQResult:
        """Quantize on `spec`'s grid, or — given `grid`, which fits a per-column grid to the weights and the
        importance diag(H) up front — on that one (e.g. a GGUF K-quant's two-level scales).
        shrink: H ← (1 − shrink)·H + shrink·diag(H) first (see _take)."""
        spec.check(self.columns, "a GPTQ layer")
        cols, maxq, dev = self.columns, spec.maxq, self.W.device
        width, n_groups = spec.group_width(cols), spec.groups(cols)
        W, H, importance = self._take(shrink)

        if grid is not None:
            fixed = grid(W, importance)
            perm, W, U = _ordered(W, H, act_order, percdamp)
            del H  # a [cols, cols] float32 copy: 0.8 GB for an 8B model's down projection
            return _on_grid(perm, W, U, fixed, blocksize)
        # Act-order visits groups out of order, so it can only keep contiguous groups if they are fitted first.
        static = static_groups or act_order or n_groups == 1
        if static:
            scales, zeros = _static_params(W, spec, importance, search)
        else:  # each group fitted when the sweep reaches it
            scales = torch.zeros(self.rows, n_groups, dtype=torch.float32, device=dev)
            zeros = torch.zeros_like(scales)

        def fit(g: int, w: torch.Tensor) -> None:
            imp = importance[g * width:(g + 1) * width] if search else None
            scales[:, g:g + 1], zeros[:, g:g + 1] = fit_params(w, spec, search, imp)

        perm, W, U = _ordered(W, H, act_order, percdamp)
        del H
        group_of = (perm // width).tolist()

        def column(c: int, w: torch.Tensor, pending: Callable[[int], torch.Tensor]):
            g = group_of[c]
            if not static and c % width == 0:
                fit(g, pending(c + width))  # on the fully updated weights of the whole group
            s, z = scales[:, g], zeros[:, g]
            q = quantize(w.unsqueeze(1), s.unsqueeze(1), z.unsqueeze(1), maxq).squeeze(1)
            return q, s * (q - z)

        codes, loss = _sweep(W, U, blocksize, column)
        codes = codes[:, torch.argsort(perm)]
        weight = scales.repeat_interleave(width, 1) * (codes - zeros.repeat_interleave(width, 1))
        return GPTQResult(codes.to(torch.uint8), scales, zeros, weight, float(loss))

    def _take(self, shrink: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, H, diag(H)) ready for a sweep; H is handed over (freed here) since it is the big allocation.

        shrink ∈ [0, 1] shrinks H toward its diagonal, keeping the diagonal: the objective becomes
        (1 − shrink)·||ΔW X||² + shrink·Σ_j H_jj ||ΔW_:j||², between GPTQ's output error (0) and the
        importance-weighted error an imatrix quantizer minimises (1, where GPTQ propagates nothing: RTN on its
        grid). The off-diagonal correlations are what a few hundred calibration sequences estimate worst, and
        what a text unlike them changes most (measured on held-out text by bench/gguf_quality.py)."""
        if self.H is None:
            raise RuntimeError("GPTQ.fasterquant was already called; the Hessian has been freed")
        # No tokens: identity H makes GPTQ degenerate to RTN, so unrouted MoE experts still get quantized.
        H = self.H if self.nsamples > 0 else torch.eye(self.columns, dtype=torch.float32, device=self.W.device)
        self.H = None
        if not torch.isfinite(H).all():
            raise KananaQuantError("the GPTQ Hessian has NaN/inf entries: the calibration activations overflowed")
        W = self.W.clone()
        importance = torch.diag(H).clone()  # before the dead-column fix, so dead columns weigh nothing
        if shrink:
            H.mul_(1 - shrink)
            H.diagonal().add_(shrink * importance)
        dead = importance == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        return W, H, importance


def fasterquant_batched(solvers: list[GPTQ], spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                        act_order: bool = True, search: bool = True, shrink: float = 0.0) -> list[GPTQResult]:
    """Several GPTQ problems of one shape (MoE experts) in a single column sweep: fasterquant's arithmetic with
    static groups, each problem in its own order and Hessian, but the per-column Python work paid once for all
    of them instead of once per expert."""
    shapes = {(g.rows, g.columns) for g in solvers}
    if len(shapes) != 1:
        raise ValueError(f"fasterquant_batched needs problems of one shape, got {sorted(shapes)}")
    cols = solvers[0].columns
    spec.check(cols, "a GPTQ layer")
    width = spec.group_width(cols)
    Ws, Us, perms, scales, zeros = [], [], [], [], []
    for solver in solvers:
        W, H, importance = solver._take(shrink)
        s, z = _static_params(W, spec, importance, search)
        perm, W, U = _ordered(W, H, act_order, percdamp)
        del H
        for store, value in zip((Ws, Us, perms, scales, zeros), (W, U, perm, s, z)):
            store.append(value)
    W, U, P, S, Z = (torch.stack(v) for v in (Ws, Us, perms, scales, zeros))
    del Ws, Us
    group_of, batch = P // width, torch.arange(len(solvers), device=W.device)

    def column(c: int, w: torch.Tensor, _pending):
        g = group_of[:, c]
        s, z = S[batch, :, g], Z[batch, :, g]  # [problems, rows]
        q = quantize(w, s, z, spec.maxq)
        return q, s * (q - z)

    codes, loss = _sweep(W, U, blocksize, column)
    codes = torch.gather(codes, 2, torch.argsort(P, dim=1).unsqueeze(1).expand_as(codes))
    return [GPTQResult(codes[e].to(torch.uint8), S[e], Z[e],
                       S[e].repeat_interleave(width, 1) * (codes[e] - Z[e].repeat_interleave(width, 1)),
                       float(loss[e])) for e in range(len(solvers))]


def _static_params(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor, search: bool):
    """Every group's (scale, zero) [rows, groups], fitted up front on the original weights."""
    width, n_groups = spec.group_width(W.shape[1]), spec.groups(W.shape[1])
    params = [fit_params(W[:, g * width:(g + 1) * width], spec, search,
                         importance[g * width:(g + 1) * width] if search else None) for g in range(n_groups)]
    return torch.cat([p[0] for p in params], 1), torch.cat([p[1] for p in params], 1)

def _on_grid(perm: torch.Tensor, W: torch.Tensor, U: torch.Tensor, grid: ColumnGrid, blocksize: int) -> GPTQResult:
    S, Z = grid.scale[:, perm], grid.zero[:, perm]

    def column(c: int, w: torch.Tensor, _pending):
        return grid.round(w, S[:, c], Z[:, c])

    codes, loss = _sweep(W, U, blocksize, column)
    codes = codes[:, torch.argsort(perm)]
    return GPTQResult(codes.to(torch.uint8), grid.scale, grid.zero, grid.values(codes), float(loss))


def _ordered(W: torch.Tensor, H: torch.Tensor, act_order: bool, percdamp: float):
    """(perm, W[:, perm], upper Cholesky factor of the permuted (H + damp)⁻¹): act-order visits columns by
    descending diag(H)."""
    cols = W.shape[1]
    perm = (torch.argsort(torch.diag(H), descending=True, stable=True) if act_order
            else torch.arange(cols, device=W.device))
    return perm, W[:, perm], _hinv_cholesky(H[perm][:, perm], percdamp)


def _sweep(W: torch.Tensor, U: torch.Tensor, blocksize: int, column) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column sweep over W [..., rows, cols] (in visiting order, updated in place; leading dims are
    independent problems, U [..., cols, cols] their upper Cholesky factors of H⁻¹): column(c, w, pending)
    returns the codes and dequantized values of column c; pending(end) gives columns c..end with every update
    so far (for grids fitted lazily). Returns (codes, Σ err² / d² / 2 per problem)."""
    cols = W.shape[-1]
    codes = torch.zeros_like(W)
    loss = torch.zeros(W.shape[:-2], dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[..., i1:i2].clone(), U[..., i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i

            def pending(end: int, i: int = i, c: int = c) -> torch.Tensor:
                # the part of the group past this block has not yet received this block's lazy update
                part = [W1[..., i:min(end, i2) - i1]]
                if end > i2:
                    part.append(W[..., i2:end] - Err1[..., :i] @ U[..., i1:c, i2:end])
                return torch.cat(part, -1)

            w, d = W1[..., i], U1[..., i, i]
            q, dequantized = column(c, w, pending)
            codes[..., c] = q
            err = (w - dequantized) / d.unsqueeze(-1)
            loss += (err.double() ** 2).sum(-1) / 2
            W1[..., i:] -= err.unsqueeze(-1) * U1[..., i, i:].unsqueeze(-2)
            Err1[..., i] = err
        # Lazy batch update: the block's accumulated errors hit the remaining columns in one matmul.
        W[..., i2:] -= Err1 @ U[..., i1:i2, i2:]
    return codes, loss
