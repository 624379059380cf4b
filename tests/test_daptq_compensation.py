"""CSRC: gain/bias, the cross-channel map, low-rank truncation and folding before rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from daptq.methods.daptq.compensation import (
    Compensation,
    CSRCOptions,
    Stats,
    compensate,
    cross_channel_objective,
    dense_cross_channel_map,
    diagonal_gain_bias,
    fold_compensation,
    low_rank,
    output_stats,
)
from daptq.quant import QuantLinear, QuantSpec, WeightSpec

C = 6


def _stats(x: torch.Tensor) -> Stats:
    x = x.double()
    mu = x.mean(0)
    return Stats(mu, (x - mu).T @ (x - mu) / x.shape[0])


def _synthetic(n=4000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=gen, dtype=torch.float64)
    fp = torch.randn(n, C, generator=gen, dtype=torch.float64) @ mix.T + torch.arange(C)
    distort = torch.eye(C, dtype=torch.float64) + 0.2 * torch.randn(C, C, generator=gen, dtype=torch.float64)
    q = fp @ distort.T + 0.3  # a quantization-like distortion: cross-channel mixing, scaling and a shift
    return fp, q


def test_diagonal_gain_bias_is_eqs_4_to_6():
    fp, q = _synthetic()
    sf, sq = _stats(fp), _stats(q)
    g, d = diagonal_gain_bias(sf, sq, 0.9, 1.1, 1e-6)
    sig_fp, sig_q = fp.std(0, unbiased=False), q.std(0, unbiased=False)
    want = np.clip(sig_fp.numpy() / (sig_q.numpy() + 1e-6), 0.9, 1.1)
    np.testing.assert_allclose(g.numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(d.numpy(), fp.mean(0).numpy() - want * q.mean(0).numpy(), rtol=1e-10)
    assert (g == 0.9).any() or (g == 1.1).any()  # the clip is exercised


def test_full_rank_compensation_restores_fp_mean_and_covariance():
    fp, q = _synthetic()
    sf, sq = _stats(fp), _stats(q)
    opts = CSRCOptions(mode="cross_channel", rank=C, lambda_i=0.0, weighting="uniform")
    comp = compensate(sf, sq, opts)
    restored = _stats(comp.apply(q))
    np.testing.assert_allclose(restored.mean.numpy(), sf.mean.numpy(), atol=1e-9)
    np.testing.assert_allclose(restored.cov.numpy(), sf.cov.numpy(), atol=1e-8)
    # The closed form is S_FP^(1/2) S_Q^(-1/2), checked against scipy's matrix square root.
    from scipy.linalg import sqrtm

    want = np.real(sqrtm(sf.cov.numpy())) @ np.linalg.inv(np.real(sqrtm(sq.cov.numpy())))
    np.testing.assert_allclose(dense_cross_channel_map(sf, sq, opts).numpy(), want, atol=1e-8)


def test_regularized_fit_improves_on_gain_only_and_low_rank_is_between():
    fp, q = _synthetic()
    sf, sq = _stats(fp), _stats(q)

    def cov_error(comp):
        return float(torch.linalg.matrix_norm(_stats(comp.apply(q)).cov - sf.cov))

    diag = cov_error(compensate(sf, sq, CSRCOptions(mode="diagonal")))
    full = cov_error(compensate(sf, sq, CSRCOptions(rank=C, lambda_i=1e-4)))
    rank2 = cov_error(compensate(sf, sq, CSRCOptions(rank=2, lambda_i=1e-4)))
    assert full < 0.05 * diag
    assert full <= rank2 <= diag * 1.0001


def test_objective_gradient_matches_autograd():
    fp, q = _synthetic()
    sf, sq = _stats(fp), _stats(q)
    gen = torch.Generator().manual_seed(1)
    m = torch.eye(C, dtype=torch.float64) + 0.1 * torch.randn(C, C, generator=gen, dtype=torch.float64)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    omega = (w[:, None] * w[None, :]).sqrt()
    _, grad = cross_channel_objective(m, sf.cov, sq.cov, omega, 0.7, 0.01)
    mv = m.clone().requires_grad_(True)
    value = 0.7 * ((omega * (sf.cov - mv @ sq.cov @ mv.T)) ** 2).sum() / ((omega * sf.cov) ** 2).sum()
    value = value + 0.01 * ((mv - torch.eye(C, dtype=torch.float64)) ** 2).sum() / C
    value.backward()
    np.testing.assert_allclose(grad.numpy(), mv.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_low_rank_is_the_truncated_svd():
    gen = torch.Generator().manual_seed(2)
    m = torch.eye(C, dtype=torch.float64) + torch.randn(C, C, generator=gen, dtype=torch.float64)
    u, v = low_rank(m, 2)
    assert u.shape == v.shape == (C, 2)
    s = np.linalg.svd((m - torch.eye(C, dtype=torch.float64)).numpy(), compute_uv=False)
    err = np.linalg.norm((m - torch.eye(C, dtype=torch.float64) - u @ v.T).numpy())
    assert err == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-9)  # Eckart-Young


def _comp(seed=3) -> Compensation:
    gen = torch.Generator().manual_seed(seed)
    return Compensation(
        torch.rand(C, generator=gen, dtype=torch.float64) + 0.5,
        0.1 * torch.randn(C, 2, generator=gen, dtype=torch.float64),
        0.1 * torch.randn(C, 2, generator=gen, dtype=torch.float64),
        torch.randn(C, generator=gen, dtype=torch.float64),
    )


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, C), nn.GELU(), nn.Linear(C, 3))


def test_folded_output_equals_unfolded_compensation_before_rounding():
    net, comp = _net(), _comp()
    x = torch.randn(16, 5)
    want = net[2](net[1](comp.apply(net[0](x))))
    fold_compensation(net[0], comp)
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


def test_fold_keeps_module_types_and_parameter_count_and_rounds_the_folded_weight():
    net = _net()
    spec = QuantSpec(WeightSpec(4))
    net[0] = QuantLinear.from_float(net[0], spec)
    before = [type(m) for m in net.modules()], sum(p.numel() for p in net.parameters())
    comp = _comp()
    expected_float = comp.matrix.float() @ net[0].weight.detach()
    fold_compensation(net[0], comp)
    assert ([type(m) for m in net.modules()], sum(p.numel() for p in net.parameters())) == before
    torch.testing.assert_close(net[0].weight.detach(), expected_float)
    rounded = QuantLinear.from_float(nn.Linear(5, C), spec)  # round the folded float weight independently
    with torch.no_grad():
        rounded.weight.copy_(expected_float)
    rounded.requantize()
    torch.testing.assert_close(net[0].dequantized_weight(), rounded.dequantized_weight())


def test_output_stats_capture_the_layer_output():
    net = _net()
    xs = [torch.randn(32, 5) for _ in range(3)]
    stats = output_stats(net, lambda m: [m(x) for x in xs], ["0"])["0"]
    want = _stats(torch.cat([net[0](x) for x in xs]).detach())
    torch.testing.assert_close(stats.mean, want.mean)
    torch.testing.assert_close(stats.cov, want.cov)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="g_min"):
        CSRCOptions(g_min=1.5)
    with pytest.raises(ValueError, match="mode"):
        CSRCOptions(mode="full")
