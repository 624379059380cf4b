import numpy as np
import pytest
import torch
from torch import nn

from daptq.quant.capture import (
    ChannelStats,
    Covariance,
    Hessian,
    Samples,
    capture,
    capturing,
    channel_rows,
    fan_in_rows,
)


def n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(4, 7, 6) * 3 + 1 for _ in range(3)]  # (B, T, C): rows are tokens
    return model, batches


def run_all(batches):
    return lambda m: [m(b) for b in batches]


def test_reductions_match_numpy_on_all_rows():
    model, batches = model_and_batches()
    h, stats, cov, out_stats = Hessian(), ChannelStats(), Covariance(), ChannelStats()
    capture(model, run_all(batches), inputs={"0": h, "2": stats}, outputs={"0": cov, "2": out_stats})
    assert n_hooks(model) == 0
    x0 = np.concatenate([b.reshape(-1, 6).numpy() for b in batches]).astype(np.float64)
    with torch.no_grad():
        y0 = np.concatenate([model[0](b).reshape(-1, 5).numpy() for b in batches]).astype(np.float64)
        x2 = np.concatenate([torch.relu(model[0](b)).reshape(-1, 5).numpy() for b in batches]).astype(
            np.float64
        )
        y2 = np.concatenate([model(b).reshape(-1, 3).numpy() for b in batches]).astype(np.float64)
    assert h.count == x0.shape[0] == 84
    np.testing.assert_allclose(h.hessian.numpy(), x0.T @ x0 / len(x0), rtol=1e-6)
    np.testing.assert_allclose(stats.mean.numpy(), x2.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.std.numpy(), x2.std(0), rtol=1e-5)
    np.testing.assert_allclose(stats.absmax.numpy(), np.abs(x2).max(0), rtol=1e-6)
    np.testing.assert_allclose(stats.min.numpy(), x2.min(0), rtol=1e-6)
    np.testing.assert_allclose(cov.mean.numpy(), y0.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov.cov.numpy(), np.cov(y0.T, bias=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_stats.max.numpy(), y2.max(0), rtol=1e-6)
    assert h.hessian.dtype == torch.float64 and cov.cov.dtype == torch.float64


def test_float64_accumulation_keeps_small_variance_on_large_mean():
    # float32 sums of x^2 would lose the 1e-3 spread entirely around a mean of 1e4
    stats, cov = ChannelStats(), Covariance()
    gen = torch.Generator().manual_seed(0)
    chunks = [1e4 + 1e-3 * torch.randn(1000, 2, generator=gen, dtype=torch.float64) for _ in range(20)]
    for c in chunks:
        stats.update(c)
        cov.update(c)
    full = torch.cat(chunks)
    assert torch.allclose(stats.std, full.std(0, unbiased=False), rtol=1e-6)
    assert torch.allclose(cov.cov.diagonal(), full.var(0, unbiased=False), rtol=1e-6)


def test_samples_cap_and_uniformity():
    s = Samples(cap=50, seed=1)
    for i in range(10):  # 10 batches of 100 rows; row value = its global index
        s.update(torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None])
    assert s.count == 1000 and s.value.shape == (50, 1)
    assert len(set(s.value[:, 0].tolist())) == 50  # without replacement
    # uniform over the stream: samples come from every part of it, not just the first or last batch
    assert s.value.min() < 300 and s.value.max() > 700
    small = Samples(cap=50)
    small.update(torch.ones(7, 3))
    assert small.value.shape == (7, 3)


def test_hooks_removed_when_forward_raises():
    model, batches = model_and_batches()
    h = Hessian()

    def run(m):
        m(batches[0])
        raise RuntimeError("batch 2 broke")

    with pytest.raises(RuntimeError, match="batch 2 broke"):
        capture(model, run, inputs={"0": h}, outputs={"2": ChannelStats()})
    assert n_hooks(model) == 0
    assert h.count == 28  # what was seen before the error is kept


def test_bad_input_is_a_clear_error():
    model, batches = model_and_batches()
    with pytest.raises(ValueError, match="no module named 'nope'"):
        capture(model, run_all(batches), inputs={"nope": Hessian()})
    assert n_hooks(model) == 0
    with pytest.raises(ValueError, match="at least one module"):
        with capturing(model):
            pass
    with pytest.raises(ValueError, match="NaN/Inf"):
        capture(model, lambda m: m(torch.full((2, 6), float("nan"))), inputs={"0": Hessian()})
    assert n_hooks(model) == 0
    with pytest.raises(RuntimeError, match="no activation"):
        _ = Hessian().hessian
    with pytest.raises(ValueError, match="cap"):
        Samples(cap=0)
    h = Hessian()
    h.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="channels"):
        h.update(torch.randn(3, 5))


def test_conv_rows_are_channels_or_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 8, 8)
    stats, h = ChannelStats(), Hessian()
    capture(conv, lambda m: m(x), inputs={"": stats})
    assert stats.channels == 3
    np.testing.assert_allclose(stats.max.numpy(), x.amax(dim=(0, 2, 3)).double().numpy(), rtol=1e-6)
    # fan_in rows: the conv output equals rows @ W^T, so X^T X is the layer's Hessian
    capture(conv, lambda m: m(x), inputs={"": h}, rows=fan_in_rows)
    rows = fan_in_rows(conv, x)
    with torch.no_grad():
        y = conv(x).movedim(1, -1).reshape(-1, 4)
        y_rows = rows @ conv.weight.reshape(4, -1).T + conv.bias
    assert torch.allclose(y, y_rows, atol=1e-5)
    assert h.hessian.shape == (27, 27) and h.count == rows.shape[0]


def test_one_pass_feeds_input_patches_and_output_channels():
    """``output_rows`` lets one pass capture a conv's input Hessian (patches) and output statistics
    (channels), as two separate passes would."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    h, cov = Hessian(), Covariance()
    capture(
        conv, lambda m: m(x), inputs={"": h}, outputs={"": cov}, rows=fan_in_rows, output_rows=channel_rows
    )
    h2, cov2 = Hessian(), Covariance()
    capture(conv, lambda m: m(x), inputs={"": h2}, rows=fan_in_rows)
    capture(conv, lambda m: m(x), outputs={"": cov2})
    assert h.hessian.shape == (27, 27) and torch.equal(h.hessian, h2.hessian)
    assert cov.mean.shape == (4,) and torch.equal(cov.mean, cov2.mean) and torch.equal(cov.cov, cov2.cov)
    assert n_hooks(conv) == 0


def test_grouped_conv_rows_and_block_hessians():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)  # 2 groups: 3 output rows each read 2 input channels
    x = torch.randn(2, 4, 5, 5)
    rows = fan_in_rows(conv, x)
    assert rows.shape == (50, 2 * 18)
    w = conv.weight.reshape(6, 18)
    with torch.no_grad():
        y = conv(x).movedim(1, -1).reshape(-1, 6)
        for j in range(2):  # group j: output rows 3j..3j+2 multiply columns 18j..18j+17
            xj = rows[:, 18 * j : 18 * (j + 1)]
            assert torch.allclose(
                y[:, 3 * j : 3 * j + 3], xj @ w[3 * j : 3 * j + 3].T + conv.bias[3 * j : 3 * j + 3], atol=1e-5
            )
    h = Hessian(blocks=2)
    h.update(rows)
    r64 = rows.double()
    for j in range(2):
        xj = r64[:, 18 * j : 18 * (j + 1)]
        assert torch.allclose(h.hessian[j], xj.T @ xj / 50)
    with pytest.raises(ValueError, match="blocks"):
        Hessian(blocks=4).update(torch.randn(3, 6))


class Conv2dStaticSamePadding(nn.Conv2d):
    """EfficientNet's TF-style "same" conv: a padding module, then an unpadded conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return super().forward(self.static_padding(x))


def test_fan_in_rows_apply_static_same_padding():
    torch.manual_seed(0)
    conv = Conv2dStaticSamePadding(3, 4, 3, stride=2)
    x = torch.randn(2, 3, 9, 9)
    rows = fan_in_rows(conv, x)
    with torch.no_grad():
        y = conv(x).movedim(1, -1).reshape(-1, 4)
        assert torch.allclose(y, rows @ conv.weight.reshape(4, -1).T + conv.bias, atol=1e-5)
