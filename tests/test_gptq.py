"""GPTQ against RTN, against a naive column-by-column OBQ reference, and on degenerate Hessians."""

from __future__ import annotations

import pytest
import torch

from kanana_quant.quant.gptq import GPTQ
from kanana_quant.quant.grid import QuantSpec, fit_params, quantize, quantize_rtn

SPECS = [QuantSpec(4, 128, True), QuantSpec(3, 128, False), QuantSpec(4, -1, True)]


def correlated(seed: int, n: int = 2048, d: int = 256, rows: int = 128):
    """Inputs like an LLM's: channels mixed by a random matrix, a few with much larger variance."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    z[:, :8] *= 10
    x = z @ (torch.randn(d, d, generator=g) / d ** 0.5)
    return x, torch.randn(rows, d, generator=g) * 0.05


def unequal(seed: int, n: int = 2048, d: int = 256, rows: int = 128):
    """Channel scales spread over three decades, mildly correlated: where act-order should pay off."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, d)[torch.randperm(d, generator=g)]
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d ** 0.5
    return (torch.randn(n, d, generator=g) @ mix) * scale, torch.randn(rows, d, generator=g) * 0.05


def mild(seed: int, n: int = 1024, d: int = 256, rows: int = 32):
    """Correlated but well conditioned, so an undamped float32 Cholesky succeeds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / d ** 0.5)
    return x, torch.randn(rows, d, generator=g) * 0.05


def recon(x, w, q) -> float:
    return float(((x.double() @ (w - q).double().T) ** 2).sum())


def expand(t, spec, cols):
    return t.repeat_interleave(spec.group_width(cols), 1)


def run(x, w, spec, **kw):
    g = GPTQ(w)
    g.add_batch(x)
    return g.fasterquant(spec, **kw)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_shrink_goes_from_gptq_to_weighted_rtn(spec):
    """shrink 1 leaves only the Hessian's diagonal: GPTQ propagates nothing and is the importance-weighted RTN;
    in between, the calibration reconstruction error lies between the two (it is what shrink gives up)."""
    x, w = correlated(3)
    g = GPTQ(w)
    g.add_batch(x)
    importance = torch.diag(g.H).clone()
    errors = {s: recon(x, w, run(x, w, spec, shrink=s).weight) for s in (0.0, 0.5)}
    full = run(x, w, spec, shrink=1.0)
    codes, sc, z = quantize_rtn(w, spec, search=True, importance=importance)
    assert (full.codes.float() == codes).float().mean() > 0.999  # float32 ties at rounding midpoints aside
    torch.testing.assert_close(full.scales, sc)
    rtn = recon(x, w, expand(sc, spec, w.shape[1]) * (codes - expand(z, spec, w.shape[1])))
    assert errors[0.0] < errors[0.5] < rtn, (errors, rtn)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_beats_rtn_on_correlated_inputs(spec):
    x, w = correlated(0)
    res = run(x, w, spec)
    # The strongest RTN: same clipping search, weighted by the same per-channel importance.
    codes, s, z = quantize_rtn(w, spec, search=True, importance=(x * x).mean(0))
    rtn = expand(s, spec, w.shape[1]) * (codes - expand(z, spec, w.shape[1]))
    ratio = recon(x, w, res.weight) / recon(x, w, rtn)
    print(f"{spec}: GPTQ/RTN reconstruction error = {ratio:.3f}")
    assert ratio < 0.85, ratio  # measured ≈ 0.17


def test_loss_is_the_reconstruction_error():
    # Without damping Σ err²/d² / 2 equals ½·tr(Δ H Δᵀ) = ||X Δᵀ||² / N exactly (up to float32).
    x, w = mild(1)
    res = run(x, w, QuantSpec(4, 128, True), percdamp=0.0)
    assert res.loss == pytest.approx(recon(x, w, res.weight) / x.shape[0], rel=1e-3)


def naive_gptq(w, H, spec, percdamp, scales=None, zeros=None):
    """Textbook OBQ/GPTQ in float64: one column at a time, the full remaining row updated after each.
    With scales/zeros given they are used as is (static groups); otherwise each group is fitted when its
    first column is reached, on the weights updated so far."""
    w, H = w.double().clone(), H.double().clone()
    cols, width = w.shape[1], spec.group_width(w.shape[1])
    importance = torch.diag(H).clone()
    H += percdamp * importance.mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    fitted_s = torch.zeros(w.shape[0], spec.groups(cols), dtype=w.dtype)
    fitted_z = torch.zeros_like(fitted_s)
    q_all = torch.zeros_like(w)
    for i in range(cols):
        gi = i // width
        if scales is None and i % width == 0:
            s, z = fit_params(w[:, i:i + width].float(), spec, True, importance[i:i + width].float())
            fitted_s[:, gi], fitted_z[:, gi] = s[:, 0].double(), z[:, 0].double()
        s = (fitted_s if scales is None else scales.double())[:, gi:gi + 1]
        z = (fitted_z if zeros is None else zeros.double())[:, gi:gi + 1]
        q = s * (quantize(w[:, i:i + 1], s, z, spec.maxq) - z)
        q_all[:, i] = q[:, 0]
        err = (w[:, i] - q[:, 0]) / U[i, i]
        w[:, i:] -= torch.outer(err, U[i, i:])
    return q_all


@pytest.mark.parametrize("static", [True, False], ids=["static", "lazy-groups"])
@pytest.mark.parametrize("blocksize", [1, 7, 128])
def test_lazy_block_update_matches_naive_column_loop(blocksize, static):
    x, w = mild(2)
    spec = QuantSpec(4, 64, False)  # groups start mid-block for blocksizes 7 and 128
    gq = GPTQ(w)
    gq.add_batch(x)
    H = gq.H.clone()
    # The Hessian itself, independently: 2/N XᵀX.
    torch.testing.assert_close(H.double(), 2 / x.shape[0] * x.double().T @ x.double(), rtol=1e-4, atol=1e-5)
    res = gq.fasterquant(spec, blocksize=blocksize, act_order=False, static_groups=static)
    ref = naive_gptq(w, H, spec, 0.01, *((res.scales, res.zeros) if static else ()))
    if static:  # static params are fitted on the original weights, weighted by diag(H)
        s, z = fit_params(w[:, :64], spec, True, torch.diag(H)[:64])
        assert torch.equal(res.scales[:, :1], s) and torch.equal(res.zeros[:, :1], z)
    torch.testing.assert_close(res.weight.double(), ref, rtol=0, atol=1e-5)


def test_act_order_helps_with_unequal_channel_variances():
    spec = QuantSpec(3, 128, True)
    with_ao = without = 0.0
    for seed in (3, 4):
        x, w = unequal(seed)
        with_ao += recon(x, w, run(x, w, spec, act_order=True).weight)
        without += recon(x, w, run(x, w, spec, act_order=False).weight)
    print(f"act-order / no act-order error = {with_ao / without:.3f}")
    assert with_ao / without < 0.99  # measured ≈ 0.95


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [True, False])
def test_result_layout(spec, act_order):
    x, w = unequal(5, n=512, rows=48)
    res = run(x, w, spec, act_order=act_order)
    cols, width, n_groups = w.shape[1], spec.group_width(w.shape[1]), spec.groups(w.shape[1])
    assert res.codes.dtype == torch.uint8 and res.codes.shape == w.shape
    assert res.scales.shape == res.zeros.shape == (w.shape[0], n_groups)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= spec.maxq
    assert torch.equal(res.scales, res.scales.to(torch.float16).float())
    if spec.sym:
        assert bool((res.zeros == (spec.maxq + 1) // 2).all())
    # Contiguous groups in the original order: group g's columns are exactly g·width … (g+1)·width − 1.
    for g in range(n_groups):
        cols_g = slice(g * width, (g + 1) * width)
        s, z = res.scales[:, g:g + 1], res.zeros[:, g:g + 1]
        assert torch.equal(res.weight[:, cols_g], s * (res.codes[:, cols_g].float() - z))
        assert torch.equal(quantize(res.weight[:, cols_g], s, z, spec.maxq), res.codes[:, cols_g].float())
    assert res.weight.shape == (w.shape[0], cols) and bool(torch.isfinite(res.weight).all())
    # In original column order: the quantized weight tracks the original one, column for column.
    assert float((res.weight - w).abs().max()) < float(w.abs().max())
    assert recon(x, w, res.weight) < 0.5 * recon(x, w, torch.zeros_like(w))


@pytest.mark.parametrize("act_order", [True, False])
def test_dead_input_columns(act_order):
    x, w = correlated(6, n=512)
    dead = torch.tensor([0, 5, 130, 255])
    x[:, dead] = 0
    res = run(x, w, QuantSpec(3, 128, False), act_order=act_order)
    assert bool(torch.isfinite(res.weight).all()) and bool(torch.isfinite(res.scales).all())
    assert bool((res.weight[:, dead] == 0).all())  # an input that is always 0 gets weight 0
    assert res.loss == res.loss


@pytest.mark.parametrize("feed", ["never", "zero-tokens", "zero-weights"])
def test_empty_hessian_is_rtn(feed):
    _, w = correlated(7, n=8)
    spec = QuantSpec(4, 128, True)
    g = GPTQ(w)
    if feed == "zero-tokens":
        g.add_batch(torch.zeros(0, w.shape[1]))
    elif feed == "zero-weights":
        g.add_batch(torch.randn(5, w.shape[1]), torch.zeros(5))
    res = g.fasterquant(spec)
    assert g.H is None
    codes, s, z = quantize_rtn(w, spec, search=True)
    assert torch.equal(res.codes.float(), codes) and torch.equal(res.scales, s) and torch.equal(res.zeros, z)


def test_rank_deficient_hessian_without_damping_retries():
    g0 = torch.Generator().manual_seed(8)
    x = torch.randn(4, 256, generator=g0)  # 4 tokens: H has rank 4 of 256
    w = torch.randn(64, 256, generator=g0)
    gq = GPTQ(w)
    gq.add_batch(x)
    with pytest.raises(torch.linalg.LinAlgError):  # what an unguarded implementation would hit
        torch.linalg.cholesky(gq.H)
    spec = QuantSpec(4, 128, True)
    res = gq.fasterquant(spec, percdamp=0.0)
    assert bool(torch.isfinite(res.weight).all()) and res.loss == res.loss
    # Still real GPTQ (a retried, damped Cholesky), not a diagonal/RTN fallback: 4 tokens are fit ~exactly.
    codes, s, z = quantize_rtn(w, spec, search=True, importance=(x * x).mean(0))
    rtn = expand(s, spec, 256) * (codes - expand(z, spec, 256))
    assert recon(x, w, res.weight) < 0.1 * recon(x, w, rtn)  # measured ≈ 0.001


def test_token_weights_and_running_average():
    g0 = torch.Generator().manual_seed(9)
    x = torch.randn(3, 10, 16, generator=g0)  # leading dims are flattened
    w = torch.zeros(4, 16)
    flat = x.reshape(-1, 16)

    weighted = GPTQ(w)
    tw = torch.ones(30)
    tw[3], tw[17] = 2.0, 0.0
    weighted.add_batch(x, tw)
    # A weight of 2 counts the token twice; a weight of 0 drops it; batches split anywhere average the same.
    repeated = GPTQ(w)
    keep = torch.cat([flat[:17], flat[18:]])
    repeated.add_batch(keep[:11])
    repeated.add_batch(torch.cat([keep[11:], flat[3:4]]))
    torch.testing.assert_close(weighted.H, repeated.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weighted.H, 2 / 30 * (keep.T @ keep + flat[3:4].T @ flat[3:4]), rtol=1e-5, atol=1e-6)
    assert weighted.tokens == 30 and repeated.tokens == 30

    unweighted = GPTQ(w)
    unweighted.add_batch(x)
    assert not torch.allclose(weighted.H, unweighted.H)
    with pytest.raises(ValueError):
        weighted.add_batch(flat[:2], torch.tensor([1.0, -1.0]))


def test_batched_experts_equal_one_at_a_time():
    """fasterquant_batched (MoE experts in one sweep) computes what fasterquant does for each problem."""
    from kanana_quant.quant.gptq import fasterquant_batched

    problems = [correlated(seed, n=512, d=256, rows=48) for seed in range(4)]
    problems[3] = (problems[3][0][:0], problems[3][1])  # an expert no token reached: identity Hessian
    spec = QuantSpec(4, 64, False)

    def solver(x, w, tokens=True):
        g = GPTQ(w)
        if len(x):
            g.add_batch(x)
        return g

    single = [solver(x, w).fasterquant(spec, shrink=0.25) for x, w in problems]
    batched = fasterquant_batched([solver(x, w) for x, w in problems], spec, shrink=0.25)
    for a, b in zip(single, batched):
        assert (a.codes == b.codes).float().mean() > 0.999
        torch.testing.assert_close(a.scales, b.scales)
        torch.testing.assert_close(a.zeros, b.zeros)
        assert abs(a.loss - b.loss) <= 1e-3 * max(a.loss, 1e-9)
        assert torch.max(torch.abs(a.weight - b.weight)) <= float(a.scales.max()) * 1.001
