import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig
from daptq.models.transformer import modulate
from daptq.quant import QuantLinear, fake_quantize_weight, weight_only
from daptq.quant.smoothing import SmoothingGroup, check_groups, smooth_


def random_scales(c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(c, generator=gen))  # spread over ~e^+-2


class NormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.a, self.b = nn.Linear(8, 5), nn.Linear(8, 3)
        self.v = nn.Linear(8, 12)  # rows 4..11 feed `out`
        self.out = nn.Linear(8, 2)
        with torch.no_grad():
            self.ln.weight.normal_()
            self.ln.bias.normal_()

    def forward(self, x):
        h = self.ln(x)
        return torch.cat([self.a(h), self.b(h), self.out(self.v(x)[..., 4:])], dim=-1)


class AdaLNBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8, elementwise_affine=False)
        self.mod = nn.Linear(6, 3 * 8)  # chunks: gate, shift, scale (non-default order on purpose)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, c):
        gate, shift, scale = self.mod(F.silu(c)).chunk(3, dim=1)
        return self.fc(modulate(self.ln(x), shift, scale)) * gate[:, None, :4]


def test_layernorm_and_linear_folds_are_exact():
    torch.manual_seed(0)
    block, x = NormBlock(), torch.randn(4, 5, 8)
    y0 = block(x)
    ln_group = SmoothingGroup("ln", ("a", "b"), "layernorm")
    v_group = SmoothingGroup("v", ("out",), "linear", offset=4)
    check_groups(block, [ln_group, v_group])
    smooth_(block, ln_group, random_scales(8, 1))
    smooth_(block, v_group, random_scales(8, 2))
    assert torch.allclose(block(x), y0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(block.a.weight, NormBlock().a.weight)  # something actually moved


def test_adaln_fold_is_exact():
    torch.manual_seed(0)
    block, x, c = AdaLNBlock(), torch.randn(3, 5, 8), torch.randn(3, 6)
    y0 = block(x, c)
    s = random_scales(8)
    smooth_(block, SmoothingGroup("mod", ("fc",), "adaln", offset=8, scale_offset=16), s)
    assert torch.allclose(block(x, c), y0, atol=1e-5, rtol=1e-5)
    # the consumer's input really is divided by s
    gate, shift, scale = block.mod(F.silu(c)).chunk(3, dim=1)
    torch.manual_seed(0)
    _, shift0, scale0 = AdaLNBlock().mod(F.silu(c)).chunk(3, dim=1)
    h = block.ln(x)
    assert torch.allclose(modulate(h, shift, scale), modulate(h, shift0, scale0) / s, atol=1e-5)


def test_fake_quant_modules_are_rerounded():
    torch.manual_seed(0)
    block = NormBlock()
    block.a = QuantLinear.from_float(block.a, weight_only(4), "a")
    old = block.a.dequantized_weight().clone()
    smooth_(block, SmoothingGroup("ln", ("a", "b"), "layernorm"), random_scales(8))
    expected = fake_quantize_weight(block.a.weight, block.a.spec.weight)
    assert torch.equal(block.a.dequantized_weight(), expected)
    assert not torch.allclose(expected, old)


def test_bad_groups_and_scales_are_clear_errors():
    block = NormBlock()
    with pytest.raises(ValueError, match="consumes two smoothing groups"):
        check_groups(
            block,
            [SmoothingGroup("ln", ("a",), "layernorm"), SmoothingGroup("v", ("a",), "linear", offset=4)],
        )
    with pytest.raises(ValueError, match="outside"):
        check_groups(block, [SmoothingGroup("v", ("out",), "linear", offset=6)])
    with pytest.raises(ValueError, match="not Linear"):
        check_groups(block, [SmoothingGroup("ln", ("ln",), "layernorm")])
    with pytest.raises(ValueError, match="must be a LayerNorm"):
        check_groups(block, [SmoothingGroup("a", ("b",), "layernorm")])
    with pytest.raises(ValueError, match="scale_offset"):
        SmoothingGroup("mod", ("fc",), "adaln")
    w = block.a.weight.clone()
    with pytest.raises(ValueError, match="> 0"):
        smooth_(block, SmoothingGroup("ln", ("a", "b"), "layernorm"), -torch.ones(8))
    with pytest.raises(ValueError, match="8 channels"):
        smooth_(block, SmoothingGroup("ln", ("a", "b"), "layernorm"), torch.ones(7))
    assert torch.equal(block.a.weight, w)  # nothing half-done


TINY = ReferenceVLAConfig(
    image_size=32, d_model=32, n_layer=2, n_head=2, dit_d_model=24, dit_n_layer=2, dit_n_head=2
)


def test_reference_vla_groups_fold_exactly():
    torch.manual_seed(0)
    model = ReferenceVLA(TINY)
    with torch.no_grad():  # adaLN-Zero starts at zero: randomize so every fold matters
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    policy = ReferencePolicy(model)
    groups = policy.adapter.smoothing_groups()
    check_groups(model, groups)
    assert len(groups) == 3 * TINY.n_layer + 3 * TINY.dit_n_layer + 1
    batch = {
        "vision_features": torch.randn(2, TINY.num_vision_tokens, model.vision.out_channels),
        "language_features": torch.randn(2, 5, 384),
        "language_mask": torch.ones(2, 5, dtype=torch.bool),
        "state": torch.randn(2, 4),
    }
    t, x = torch.tensor([3, 70]), torch.randn(2, TINY.chunk_size, 4)
    with torch.no_grad():
        z0 = model.condition(batch)
        eps0 = model.head(x, t, z0)
        for i, group in enumerate(groups):
            smooth_(model, group, random_scales(model.get_submodule(group.input_of).in_features, i))
        z1 = model.condition(batch)
        eps1 = model.head(x, t, z1)
    assert torch.allclose(z1, z0, atol=1e-4, rtol=1e-4)
    assert torch.allclose(eps1, eps0, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.blocks[0].ln_1.weight, torch.ones(TINY.d_model))
