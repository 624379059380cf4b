"""AWQ: activation-aware scales and clipping beat RTN on a layer with salient input channels."""

import pytest
import torch
from baseline_helpers import single_thread

from daptq.methods.awq import awq_search_clip, awq_search_scales, block_output_error
from daptq.quant import WeightSpec, fake_quantize_weight

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

SALIENT = [2, 11, 30, 57]


def salient_inputs(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=gen)
    x[:, SALIENT] *= 15.0  # a few input channels carry most of the activation energy
    return x


def layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(48, 64, generator=gen) * 0.05, torch.randn(32, 64, generator=gen) * 0.05


def rel_error(x, w, w_eff):
    """Output error of ``x W^T`` when the layer computes with ``w_eff`` instead."""
    return float((x @ (w - w_eff).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize(
    "spec",
    [WeightSpec(4, granularity="per_group", group_size=32), WeightSpec(3, symmetric=False)],
    ids=lambda s: s.short(),
)
def test_beats_rtn_on_salient_channels(spec):
    calib, held_out = salient_inputs(512, 0), salient_inputs(512, 1)
    w1, w2 = layer()
    scales, ratio, err = awq_search_scales(calib, [w1, w2], [spec, spec])
    assert ratio is not None and scales.shape == (64,)
    assert scales[SALIENT].min() > scales.median()  # the salient columns are the ones scaled up
    rtn_err = block_output_error(calib, [w1, w2], [spec, spec], torch.ones(64))
    assert err < rtn_err
    for w in (w1, w2):
        rtn = fake_quantize_weight(w, spec)
        clipped, ratios = awq_search_clip(calib / scales, w * scales, spec)
        awq = fake_quantize_weight(clipped, spec) / scales  # the effective weight on the unscaled input
        assert rel_error(held_out, w, awq) < 0.8 * rel_error(held_out, w, rtn)
        assert ratios.max() <= 1.0 and ratios.min() >= 0.5


def test_clip_search_never_worse_than_no_clip_on_its_data():
    x = salient_inputs(256, 2)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    spec = WeightSpec(3, granularity="per_group", group_size=16)
    clipped, ratios = awq_search_clip(x, w, spec)
    assert ratios.shape == (16, 4) and (ratios < 1).float().mean() > 0.25  # Gaussian tails: clipping pays
    assert rel_error(x, w, fake_quantize_weight(clipped, spec)) <= rel_error(
        x, w, fake_quantize_weight(w, spec)
    )


def test_identity_when_scaling_cannot_help():
    x = torch.zeros(8, 16)  # no signal: every candidate ties with RTN, which wins
    scales, ratio, _ = awq_search_scales(x, [torch.randn(4, 16)], [WeightSpec(4)])
    assert ratio is None and torch.equal(scales, torch.ones(16))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="does not take"):
        awq_search_scales(torch.randn(4, 8), [torch.randn(3, 9)], [WeightSpec(4)])
    with pytest.raises(ValueError, match="one spec per weight"):
        awq_search_scales(torch.randn(4, 8), [torch.randn(3, 8)], [])
    with pytest.raises(ValueError, match="NaN"):
        awq_search_scales(torch.full((4, 8), float("nan")), [torch.randn(3, 8)], [WeightSpec(4)])
    with pytest.raises(ValueError, match="max_shrink"):
        awq_search_clip(torch.randn(4, 8), torch.randn(3, 8), WeightSpec(4), max_shrink=1.0)


# ---- the method -------------------------------------------------------------------------------------------
def test_method_on_the_reference_vla():
    from baseline_helpers import chunk_error, n_hooks, reference_calibration, tiny_reference_policy

    from daptq.methods import quantize_policy
    from daptq.methods.awq import AWQConfig
    from daptq.methods.rtn import RTNConfig
    from daptq.quant import QuantLinear, QuantSpec

    spec = QuantSpec(WeightSpec(3, granularity="per_group", group_size=16))
    cal = reference_calibration(n_batches=1)
    fp, awq, rtn = (tiny_reference_policy() for _ in range(3))
    record = quantize_policy(awq, AWQConfig(spec=spec, max_samples=512, clip=True), cal)
    quantize_policy(rtn, RTNConfig(spec=spec), cal)
    assert n_hooks(awq.model) == 0 and record.method == "awq"
    scaling = record.decisions["scaling"]
    assert len(scaling) == 7 and any(g["ratio"] is not None for g in scaling.values())
    assert set(record.decisions["clipping"]) == set(record.modules)
    assert all(isinstance(awq.model.get_submodule(n), QuantLinear) for n in record.modules)
    assert chunk_error(awq, fp, cal) < chunk_error(rtn, fp, cal)
    assert type(record).from_json(record.to_json()) == record


def test_toy_and_hooks_gone_after_failure():
    from baseline_helpers import (
        ToyPolicy,
        assert_clean_after_failure,
        reference_calibration,
        tiny_reference_policy,
        toy_calibration,
    )

    from daptq.methods import quantize_policy
    from daptq.methods.awq import AWQConfig
    from daptq.quant import ActivationSpec, QuantSpec

    toy = ToyPolicy()
    record = quantize_policy(toy, AWQConfig(spec=QuantSpec(WeightSpec(4)), clip=True), toy_calibration())
    assert record.decisions["scaling"] == {} and set(record.decisions["clipping"]) == {
        "net.0",
        "net.2",
        "net.4",
    }
    cal = reference_calibration(n_batches=1)
    static = QuantSpec(WeightSpec(4), ActivationSpec(8, mode="static_per_tensor"))
    for fail_on_call in (1, 2):  # during calibrate; during apply (static scales observed after folding)
        assert_clean_after_failure(
            tiny_reference_policy(), AWQConfig(spec=static, clip=True), cal, fail_on_call
        )
    with pytest.raises(ValueError, match="max_shrink"):
        AWQConfig(max_shrink=1.0)


def test_scale_search_sees_activation_rounding():
    from daptq.quant import ActivationSpec
    from daptq.quant.fake import fake_quantize_activation

    x = salient_inputs(512, 4)
    w1, w2 = layer(1)
    spec, a4 = WeightSpec(4, granularity="per_group", group_size=32), ActivationSpec(4)
    s = torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.3)
    xq = fake_quantize_activation(x / s, a4, None, None, -1)
    manual = sum(
        float((x @ w.T - xq @ fake_quantize_weight(w * s, spec).T).pow(2).sum(1).mean()) for w in (w1, w2)
    )
    assert block_output_error(x, [w1, w2], [spec, spec], s, a4) == pytest.approx(manual, rel=1e-5)
    assert block_output_error(x, [w1, w2], [spec, spec], s) < manual  # activation rounding adds error
    blind, _, _ = awq_search_scales(x, [w1, w2], [spec, spec])
    aware, _, err = awq_search_scales(x, [w1, w2], [spec, spec], activation=a4)
    assert err == pytest.approx(block_output_error(x, [w1, w2], [spec, spec], aware, a4))
    assert err <= block_output_error(x, [w1, w2], [spec, spec], blind, a4)
