"""Every registered method on the tiny CogACT at W8A8 (DA-PTQ also as its `budget` preset at 8 bits on
average), through `quantize_policy` on the policy, with dataset-style calibration batches in robot units."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from daptq.data.calibration import CalibrationSet
from daptq.methods import available_methods, quantize_policy
from daptq.models.cogact import CogACTPolicy, load_cogact
from daptq.models.cogact.testing import write_tiny_run

INSTRUCTIONS = ["pick the coke can", "open the drawer", "move the red block left", "put spoon on towel"]

# SQNR of the sampled chunk (same noise) at W8A8 against FP, dB; every method must reach it. Measured on the
# tiny CogACT (random weights, seed 0; `pytest -s` prints them): RTN 31.4, GPTQ 34.9, SmoothQuant 32.8,
# AWQ 34.0, QuantVLA 43.2, DA-PTQ paper 38.1 / budget 38.3.
MIN_SQNR_DB = 25.0


def _raw(seed: int, n: int = 4, chunk: int = 4) -> dict:
    r = np.random.default_rng(seed)
    actions = np.concatenate([r.uniform(-0.03, 0.03, (n, chunk, 6)), r.integers(0, 2, (n, chunk, 1))], -1)
    return {
        "image": r.integers(0, 256, (n, 36, 44, 3), dtype=np.uint8),
        "state": np.zeros((n, 4), np.float32),
        "instruction": INSTRUCTIONS[:n],
        "actions": actions.astype(np.float32),
    }


def small_configs() -> dict:
    from daptq.methods.daptq import DAPTQConfig
    from daptq.quant import QuantSpec, WeightSpec
    from daptq.quant.spec import ActivationSpec

    w8a8 = QuantSpec(WeightSpec(8), ActivationSpec(8))
    small = {
        "awq": {"n_grid": 4, "max_samples": 256},
        "qvla": {"n_probes": 1, "exact_top_k": 2, "avg_bits": 8.0},
        "daptq": {"sensitivity_batches": 2, "csrc_max_iter": 20},
    }
    out = {}
    for name, config_type in available_methods().items():
        if name.startswith("_"):
            continue
        fields = set(config_type.__dataclass_fields__)
        kwargs = {**small.get(name, {}), "spec": w8a8}
        out[name] = config_type(**{k: v for k, v in kwargs.items() if k in fields})
    out["daptq_budget"] = DAPTQConfig(preset="budget", average_bits=8.0, **small["daptq"])
    return out


@pytest.fixture(scope="module")
def fp_policy(tmp_path_factory) -> CogACTPolicy:
    return load_cogact(write_tiny_run(tmp_path_factory.mktemp("cogact") / "run"))


def _chunks(policy: CogACTPolicy) -> torch.Tensor:
    batch = next(policy.adapter.calibration_batches(iter([_raw(99)])))
    return policy.adapter.predict_chunk(batch, torch.Generator().manual_seed(7))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(small_configs()))
def test_every_method_runs_on_the_tiny_cogact(fp_policy, name):
    policy = copy.deepcopy(fp_policy)
    fp = _chunks(policy)
    record = quantize_policy(policy, small_configs()[name], CalibrationSet([_raw(100 + i) for i in range(2)]))
    q = _chunks(policy)
    sqnr = float(10 * torch.log10(fp.pow(2).sum() / (fp - q).pow(2).sum()))
    print(f"{name}: {len(record.modules)} modules, SQNR {sqnr:.1f} dB")
    assert record.modules, f"{name}: quantized nothing"
    assert not torch.equal(q, fp), f"{name}: the sampled chunk did not change"
    assert sqnr >= MIN_SQNR_DB, f"{name}: SQNR {sqnr:.1f} dB"
