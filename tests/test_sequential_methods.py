"""Sequential (block-by-block) calibration of the VLA methods (QuantVLA, QVLA, DA-PTQ): the block loop's
quantized model equals the whole-model path's on the tiny reference VLA (weights bitwise where the rounding
sees the same numbers; scales and corrections to float tolerance)."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import n_hooks, reference_calibration, tiny_reference_policy

from daptq.methods import quantize_policy
from daptq.methods.sequential import quantize_policy_sequential
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

pytestmark = pytest.mark.usefixtures("single_thread")
from baseline_helpers import single_thread  # noqa: E402,F401 (fixture)

STATIC = QuantSpec(
    WeightSpec(4, granularity="per_group", group_size=16), ActivationSpec(8, mode="static_per_tensor")
)


def _both(config, cal=None, **kwargs):
    cal = cal or reference_calibration()
    whole, seq = tiny_reference_policy(), tiny_reference_policy()
    whole_record = quantize_policy(whole, config, cal)
    record = quantize_policy_sequential(seq, config, cal, **kwargs)
    assert n_hooks(seq.model) == 0
    return whole, whole_record, seq, record


def _assert_same_model(whole, seq, exact=("qweight", "weight_scale")):
    a, b = whole.model.state_dict(), seq.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(exact):
            assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(b[k].double(), a[k].double(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("base", ["rtn", "smoothquant"])
def test_quantvla_sequential_equals_whole_model(base):
    from daptq.methods.quantvla import QuantVLAConfig

    config = QuantVLAConfig(spec=STATIC, base=base, neutral_band=0.0)  # every ratio folded
    whole, whole_record, seq, record = _both(config, max_in_memory_bytes=0)
    _assert_same_model(whole, seq)
    d, w = record.decisions, whole_record.decisions
    assert d["attention_modules"] == w["attention_modules"] and d["attention_modules"]
    for key in ("alpha", "fp_logit_std", "q_logit_std"):
        for name, values in w[key].items():
            torch.testing.assert_close(torch.tensor(d[key][name]), torch.tensor(values), rtol=1e-6, atol=0)
    for key in ("beta", "fp_out_rms", "q_out_rms"):
        for name, value in w[key].items():
            assert d[key][name] == pytest.approx(value, rel=1e-6)
    assert all(v != [1.0] * len(v) for v in d["alpha"].values()) and all(v != 1.0 for v in d["beta"].values())
    assert d["base_activation_scales"].keys() == w["base_activation_scales"].keys()


def test_whole_model_methods_refuse_a_streamed_loader():
    from daptq.methods.quantvla import QuantVLAConfig

    class Loader:
        def load_block(self, name, module):
            raise AssertionError("not reached")

        def free_block(self, name, module):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="must be in memory"):
        quantize_policy_sequential(
            tiny_reference_policy(), QuantVLAConfig(), reference_calibration(), loader=Loader()
        )


def test_qvla_sequential_equals_whole_model():
    """Sensitivities and the global allocation on the whole float model before the loop: the same rows."""
    from daptq.methods.qvla import QVLAConfig

    config = QVLAConfig(avg_bits=4.0, n_probes=1, exact_top_k=4)
    whole, whole_record, seq, record = _both(config)
    _assert_same_model(whole, seq, exact=("qweight", "weight_scale", "row_bits", "row_float"))
    for key in ("row_bits", "rows_by_bits", "average_bits", "weight_bytes"):
        assert record.decisions[key] == whole_record.decisions[key], key
    assert record.decisions["sequential"]["blocks"]
