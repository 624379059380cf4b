"""Drift-weighted sensitivities (Eqs. 18-19) against an analytic gradient of a linear denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from daptq.methods.daptq.sensitivity import (
    action_deviation,
    bit_sensitivities,
    gradient_stats,
    rtn_error,
    sampled_chunks,
)
from daptq.quant import QuantSpec, WeightSpec

D, DZ = 3, 5


class LinearDenoiser:
    """eps_hat = head([z_proj(z); noise]); loss = mean_j w_j (eps_hat - noise)^2 (an adapter-shaped toy)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.ModuleDict({"z_proj": nn.Linear(DZ, 4, bias=False), "head": nn.Linear(4 + D, D)})
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _eps(self, z, noise):
        return self.model["head"](torch.cat([self.model["z_proj"](z), noise], dim=1))

    def objective(self, batch, dim_weights=None, generator=None):
        noise = torch.randn(batch["z"].shape[0], D, generator=generator)
        err = (self._eps(batch["z"], noise) - noise) ** 2
        if dim_weights is not None:
            err = err * dim_weights
        return err.mean()

    def predict_chunk(self, batch, generator=None):
        noise = torch.randn(batch["z"].shape[0], D, generator=generator)
        return torch.tanh(self._eps(batch["z"], noise)).unsqueeze(1)


def _batches(n=4, b=6):
    gen = torch.Generator().manual_seed(7)
    return [{"z": torch.randn(b, DZ, generator=gen)} for _ in range(n)]


def _analytic_head_grads(adapter, batches, w, seed):
    """dL/dW_head = 2/(B D) (w * r)^T X for each batch, in float64 numpy."""
    gen = torch.Generator().manual_seed(seed)
    A = adapter.model["z_proj"].weight.double().numpy()
    W = adapter.model["head"].weight.double().numpy()
    bias = adapter.model["head"].bias.double().numpy()
    grads = []
    for batch in batches:
        z = batch["z"].double().numpy()
        noise = torch.randn(z.shape[0], D, generator=gen).double().numpy()
        X = np.concatenate([z @ A.T, noise], axis=1)
        r = X @ W.T + bias - noise
        grads.append(2.0 / (z.shape[0] * D) * (r * w).T @ X)
    return grads


@pytest.mark.parametrize("weights", [None, torch.tensor([2.0, 0.5, 0.5])])
def test_phi_and_fisher_match_the_analytic_gradient(weights):
    adapter, batches = LinearDenoiser(), _batches()
    stats = gradient_stats(adapter, batches, ["head", "z_proj"], dim_weights=weights, seed=3)
    w = np.ones(D) if weights is None else weights.numpy()
    grads = _analytic_head_grads(adapter, batches, w, seed=3)
    assert stats.phi["head"] == pytest.approx(np.mean([np.abs(g).mean() for g in grads]), rel=1e-5)
    np.testing.assert_allclose(
        stats.grad_sq_mean["head"].numpy(), np.mean([g**2 for g in grads], 0), rtol=1e-4
    )
    np.testing.assert_allclose(stats.grad_mean["head"].numpy(), np.mean(grads, 0), rtol=1e-4, atol=1e-9)
    assert stats.n_batches == len(batches)
    assert not any(p.requires_grad for p in adapter.model.parameters())  # flags restored


def test_drift_weights_change_the_ranking_input():
    adapter, batches = LinearDenoiser(), _batches()
    plain = gradient_stats(adapter, batches, ["head"], seed=0)
    weighted = gradient_stats(adapter, batches, ["head"], dim_weights=torch.tensor([3.0, 0.0, 0.0]), seed=0)
    assert weighted.phi["head"] != pytest.approx(plain.phi["head"])
    # Output rows 1, 2 have zero weight: their gradient vanishes.
    assert float(weighted.grad_sq_mean["head"][1:].abs().max()) == 0.0


def test_bit_sensitivities_are_the_fisher_taylor_formula_and_fall_with_bits():
    adapter, batches = LinearDenoiser(), _batches()
    stats = gradient_stats(adapter, batches, ["head", "z_proj"])
    specs = {b: WeightSpec(b, symmetric=False) for b in (2, 3, 4, 8, 16)}
    fisher = bit_sensitivities(adapter.model, stats, specs)
    taylor = bit_sensitivities(adapter.model, stats, specs, proxy="taylor")
    for name in ("head", "z_proj"):
        weight = adapter.model[name].weight
        for b, spec in specs.items():
            dw = rtn_error(weight, spec).numpy()
            f = stats.grad_sq_mean[name].numpy()
            assert fisher[name][b] == pytest.approx(0.5 * (f * dw * dw).sum(), rel=1e-9, abs=1e-15)
            g = stats.grad_mean[name].numpy()
            assert taylor[name][b] == pytest.approx(fisher[name][b] + (g * dw).sum(), rel=1e-9, abs=1e-15)
        costs = [fisher[name][b] for b in (2, 3, 4, 8, 16)]
        assert costs == sorted(costs, reverse=True) and costs[-1] == 0.0


def test_action_deviation_grows_as_bits_fall_and_is_zero_for_float():
    adapter, batches = LinearDenoiser(), _batches()
    dev = {
        b: action_deviation(adapter, batches, ["head"], QuantSpec(WeightSpec(b, symmetric=False)))["head"]
        for b in (2, 4, 8, 16)
    }
    assert dev[16] == 0.0
    assert dev[2] > dev[4] > dev[8] > 0.0
    assert isinstance(adapter.model["head"], nn.Linear)  # restored
    ones = action_deviation(
        adapter, batches, ["head"], QuantSpec(WeightSpec(2, symmetric=False)), dim_weights=torch.ones(D)
    )["head"]
    assert ones == pytest.approx(dev[2])


def test_action_deviation_with_a_precomputed_float_reference_is_unchanged():
    adapter, batches = LinearDenoiser(), _batches()
    spec = QuantSpec(WeightSpec(3, symmetric=False))
    fresh = action_deviation(adapter, batches, ["head"], spec, seed=5)["head"]
    reference = sampled_chunks(adapter, batches, seed=5)
    assert action_deviation(adapter, batches, ["head"], spec, seed=5, reference=reference)["head"] == fresh
    assert fresh > 0.0
    other = sampled_chunks(adapter, batches, seed=6)  # other noise: a different (wrong) reference
    assert action_deviation(adapter, batches, ["head"], spec, seed=5, reference=other)["head"] != fresh
    with pytest.raises(ValueError, match="reference chunks"):
        action_deviation(adapter, batches, ["head"], spec, reference=reference[:1])


def test_bad_inputs_are_named():
    adapter = LinearDenoiser()
    with pytest.raises(ValueError, match="not a module"):
        gradient_stats(adapter, _batches(), ["nope"])
    with pytest.raises(ValueError, match="no calibration batches"):
        gradient_stats(adapter, [], ["head"])
