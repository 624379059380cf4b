"""DA-PTQ `budget` with per-layer activation widths: the activation-rounding estimate against a direct
computation, the allocator's (w, a) choice under the byte budget and the latency model, what is recorded, and
the CLI (`daptq quantize MODEL --method daptq --avg-bits 4 --a-bits 4`, `--a-bits-choices`, `--formats`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from daptq.methods import config_from_dict, quantize_policy
from daptq.methods.daptq import DAPTQConfig
from daptq.methods.daptq.sensitivity import activation_costs
from daptq.quant import QuantLinear
from daptq.quant.fake import fake_quantize_activation
from daptq.quant.spec import ActivationSpec

sys.path.insert(0, str(Path(__file__).parent))
from baseline_helpers import single_thread  # noqa: E402
from test_daptq_method import _calibration, _policy  # noqa: E402  (the small reference VLA and its data)

pytestmark = pytest.mark.usefixtures(single_thread.__name__)  # one torch thread: the cores are shared


def _batches(policy, n=2):
    return list(policy.adapter.calibration_batches(iter(_calibration(n_batches=n).batches)))


@pytest.mark.parametrize("layer", ["head.blocks.1.mlp.fc", "blocks.0.attn.proj"])
def test_activation_cost_equals_a_direct_computation(layer):
    policy = _policy()
    adapter, batches = policy.adapter, _batches(policy)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5])
    spec = ActivationSpec(4)
    got = activation_costs(adapter, batches, [layer], {4: spec, 16: None}, weights, seed=3)[layer]
    assert got[16] == 0.0
    # direct: retain the output's gradient, re-run the layer on the rounded input, 0.5 sum (g dy)^2
    module = adapter.model.get_submodule(layer)
    seen = []

    def hook(_m, args, out):
        if out.requires_grad:  # calls outside the loss's graph do not count
            out.retain_grad()
            seen.append((args[0].detach(), out))

    generator = torch.Generator().manual_seed(3)
    total = 0.0
    handle = module.register_forward_hook(hook)
    module.weight.requires_grad_(True)
    try:
        for batch in batches:
            seen.clear()
            adapter.objective(batch, dim_weights=weights, generator=generator).backward()
            assert seen
            for x, y in seen:
                with torch.no_grad():
                    dy = module(fake_quantize_activation(x, spec, None, None, -1)) - y
                total += 0.5 * float((y.grad.double() * dy.double()).pow(2).sum())
            adapter.model.zero_grad()
    finally:
        handle.remove()
        module.weight.requires_grad_(False)
    assert got[4] == pytest.approx(total / len(batches), rel=1e-6)
    a8 = activation_costs(adapter, batches, [layer], {8: ActivationSpec(8)}, weights, seed=3)[layer][8]
    assert 0 < a8 < got[4]  # finer rounding, smaller estimated damage


def _check_choices(record, policy, cfg):
    """Each layer's activation width is the cheapest for its weight choice (bytes do not depend on it)."""
    alloc = record.decisions["allocation"]
    costs, act_costs = alloc["costs"], alloc["activation_costs"]
    amap, wa = record.decisions["activation_map"], record.decisions["wa_map"]
    assert set(amap) == set(wa) == set(record.decisions["bit_map"])
    for name, a in amap.items():
        w = record.decisions["bit_map"][name]
        n_w = policy.model.get_submodule(name).weight.numel()

        def total(b, w=w, name=name, n_w=n_w):
            lat = cfg.latency_weight * cfg.latency_compute * n_w * b / 8 / 2**20
            return costs[name][f"{w}/a{b}"] + lat

        assert wa[name] == f"w{w}a{a}"
        best = min(cfg.activation_choices, key=total)
        assert total(a) <= total(best) + 1e-12
        module = policy.model.get_submodule(name)
        if a == 16:
            assert module.spec.activation is None if isinstance(module, QuantLinear) else True
        else:
            assert module.spec.activation.bits == a and module.spec.activation.mode == cfg.activation_mode
        expected = alloc["costs"][name][f"{w}/a{a}"]
        w_only = expected - cfg.activation_cost_weight * act_costs[name][f"a{a}"]
        assert w_only >= -1e-12  # the weight term (Fisher, >= 0) plus the activation term


def test_latency_model_trades_activation_widths_under_the_byte_budget():
    calib = _calibration(n_batches=2)
    free = DAPTQConfig.budget(average_bits=4, activation_choices=(4, 8, 16), use_csrc=False)
    record = quantize_policy(_policy(), free, calib)
    assert set(record.decisions["activation_map"].values()) == {16}  # nothing makes rounding worth it
    cheap = DAPTQConfig.budget(
        average_bits=4, activation_choices=(4, 8, 16), latency_weight=3.0, use_csrc=False
    )
    policy = _policy()
    record = quantize_policy(policy, cheap, calib)
    widths = set(record.decisions["activation_map"].values())
    assert {4, 8} <= widths  # a mixed plan: A4 where its estimated damage is small, A8 elsewhere
    _check_choices(record, policy, cheap)
    alloc = record.decisions["allocation"]
    assert alloc["average_bits"] <= 4 and alloc["total_bytes"] <= alloc["budget_bytes"]
    assert config_from_dict(cheap.to_dict()) == cheap


def test_fixed_a4_everywhere_including_float_weight_layers_and_static_scales():
    policy = _policy()
    cfg = DAPTQConfig.budget(
        average_bits=5, activation_choices=(4,), activation_mode="static_per_tensor", use_csrc=False
    )
    record = quantize_policy(policy, cfg, _calibration(n_batches=2))
    bits = record.decisions["bit_map"]
    assert 16 in bits.values()  # 5 bits on average: some layers keep float weights...
    for name in bits:
        module = policy.model.get_submodule(name)
        assert isinstance(module, QuantLinear)  # ...and still round their input at 4 bits
        assert module.spec.activation.bits == 4 and module.act_scale is not None
    assert set(record.decisions["activation_map"].values()) == {4}


def test_options_are_validated():
    with pytest.raises(ValueError, match="activation_choices must be distinct values"):
        DAPTQConfig.budget(activation_choices=(2, 8))
    with pytest.raises(ValueError, match="needs preset='budget'"):
        DAPTQConfig.paper(activation_choices=(4, 8))
    with pytest.raises(ValueError, match="action_deviation"):
        DAPTQConfig.budget(activation_choices=(4, 8), estimator="action_deviation")


def test_cli_options_map_to_the_budget_config():
    from daptq.methods.workflow import config_from_options

    cfg = config_from_options("daptq", avg_bits=4, a_bits=4)  # was: "--a-bits ... need --w-bits"
    assert cfg.preset == "budget" and cfg.average_bits == 4 and cfg.spec.activation.bits == 4
    assert cfg == DAPTQConfig.budget(average_bits=4, activation_bits=4)
    opts = {"activation_choices": (4, 8, 16), "formats": ("sub2",), "latency_weight": 2.0}
    cfg = config_from_options("daptq", avg_bits=1.5, group_size=64, method_options=opts)
    assert cfg.activation_choices == (4, 8, 16) and cfg.formats == ("sub2",) and cfg.latency_weight == 2.0
    assert cfg.spec.weight.group_size == 64
    with pytest.raises(ValueError, match="asymmetric min-max"):
        config_from_options("daptq", avg_bits=4, observer="mse")
    with pytest.raises(ValueError, match="has no option 'activation_choices'"):
        config_from_options("rtn", w_bits=4, method_options={"activation_choices": (4,)})
    with pytest.raises(ValueError, match="need --w-bits"):
        config_from_options("rtn", a_bits=4)


@pytest.mark.slow
def test_quantize_cli_with_avg_bits_and_activation_widths(tmp_path, capsys):
    from test_cogact_cli import _write_episodes

    from daptq.cli import main
    from daptq.models.cogact.testing import write_tiny_run

    run = write_tiny_run(tmp_path / "run")
    _write_episodes(tmp_path / "episodes")
    base = ["quantize", f"cogact:{run}", "--method", "daptq", "--calibration", str(tmp_path / "episodes")]
    base += ["--trajectories", "6"]
    assert main([*base, "--avg-bits", "4", "--a-bits", "4", "--out", str(tmp_path / "a4")]) in (0, None)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "a4")]) in (0, None)
    shown = capsys.readouterr().out
    assert "A4-dyn-tok" in shown and "A8" not in shown
    argv = [*base, "--avg-bits", "1.5", "--formats", "sub2", "--a-bits-choices", "4,8,16"]
    argv += ["--latency-weight", "50", "--out", str(tmp_path / "mixed")]
    assert main(argv) in (0, None)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "mixed")]) in (0, None)
    shown = capsys.readouterr().out
    assert "A4-dyn-tok" in shown and ("Wbin" in shown or "Wtern" in shown)
    assert main([*base, "--avg-bits", "4", "--a-bits-choices", "4,2", "--out", str(tmp_path / "bad")]) == 2
    assert "activation bits must be one of 4, 8, 16" in capsys.readouterr().err


def test_a_layer_outside_the_objective_is_an_error_not_a_free_width():
    class Detached:  # the objective never back-propagates into layer "0": its cost would read as 0
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))

        def objective(self, batch, dim_weights=None, generator=None):
            return self.model[1](self.model[0](batch["x"]).detach()).pow(2).mean()

    adapter, batches = Detached(), [{"x": torch.randn(4, 6)}]
    costs = activation_costs(adapter, batches, ["1"], {4: ActivationSpec(4)})
    assert costs["1"][4] > 0
    with pytest.raises(ValueError, match=r"does not depend on the output of \['0'\]"):
        activation_costs(adapter, batches, ["0", "1"], {4: ActivationSpec(4)})
