"""The reference VLA quantized by every registered method gives bitwise the action chunks it gave before the
adapter-contract redesign (issue #24): a stored fixture, written once with the code before the change.

Regenerate (only when a change is *meant* to alter numerics, and say so in the commit)::

    .venv/bin/python tests/test_adapter_regression.py --regenerate
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from daptq.data.calibration import CalibrationSet
from daptq.methods import quantize_policy
from daptq.methods.awq import AWQConfig
from daptq.methods.daptq import DAPTQConfig
from daptq.methods.gptq import GPTQConfig
from daptq.methods.quantvla import QuantVLAConfig
from daptq.methods.qvla import QVLAConfig
from daptq.methods.rtn import RTNConfig
from daptq.methods.smoothquant import SmoothQuantConfig
from daptq.models.registry import load_policy
from daptq.quant import w4a8

FIXTURE = Path(__file__).parent / "data" / "adapter_regression.safetensors"
MODEL = "ref:metaworld-mt10"
INSTRUCTIONS = ["reach the red goal", "push the puck to the goal", "open the door", "close the drawer"]
PROVENANCE = {"split": "calibration", "action_space": {"names": ["dx", "dy", "dz", "grip"]}}


def configs() -> dict:
    """One small, fixed config per registered method (small enough to run in seconds each)."""
    return {
        "rtn_w4a8": RTNConfig(spec=w4a8()),
        "gptq_w4a8": GPTQConfig(spec=w4a8()),
        "smoothquant": SmoothQuantConfig(),
        "awq": AWQConfig(n_grid=4, max_samples=256),
        "quantvla": QuantVLAConfig(),
        "qvla": QVLAConfig(n_probes=1, exact_top_k=2),
        "daptq_paper": DAPTQConfig(sensitivity_batches=2, csrc_max_iter=20),
        "daptq_budget": DAPTQConfig(
            preset="budget", average_bits=4.0, sensitivity_batches=2, csrc_max_iter=20
        ),
    }


def _image(seed: int) -> np.ndarray:
    """A smooth synthetic 96x96 RGB image (gradients and a disc) so the encoders see structure, not noise."""
    y, x = np.mgrid[0:96, 0:96].astype(np.float32) / 95.0
    cx, cy = 0.3 + 0.1 * (seed % 4), 0.4 + 0.1 * (seed % 3)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < 0.02).astype(np.float32)
    rgb = np.stack([x, y * (1 - x), disc], axis=-1) * 255.0
    return np.clip(rgb + 8.0 * seed, 0, 255).astype(np.uint8)


def _raw_batch(index: int, size: int) -> dict:
    rng = np.random.default_rng(1000 + index)
    return {
        "image": np.stack([_image(index * size + b) for b in range(size)]),
        "state": np.stack(
            [rng.uniform([-0.2, 0.5, 0.05, 0.0], [0.2, 0.8, 0.25, 1.0]) for _ in range(size)]
        ).astype(np.float32),
        "instruction": [INSTRUCTIONS[(index + b) % len(INSTRUCTIONS)] for b in range(size)],
        "actions": rng.uniform(-1, 1, (size, 8, 4)).astype(np.float32),
    }


def calibration() -> CalibrationSet:
    return CalibrationSet([_raw_batch(i, 3) for i in range(2)], PROVENANCE)


def _chunks(policy) -> torch.Tensor:
    """Sampled action chunks on a held-out batch, fixed generator seed."""
    batch = next(policy.adapter.calibration_batches(iter([_raw_batch(7, 2)])))
    return policy.predict_chunk(batch, generator=torch.Generator().manual_seed(1234))


def quantized_chunks(base, name: str) -> torch.Tensor:
    policy = copy.deepcopy(base)
    quantize_policy(policy, configs()[name], calibration())
    return _chunks(policy)


@pytest.fixture(scope="module")
def base():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise results: a fixed reduction order
    yield load_policy(MODEL)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stored() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(FIXTURE)


def test_float_policy_is_unchanged(base, stored):
    assert torch.equal(_chunks(base), stored["fp"])


@pytest.mark.parametrize("name", list(configs()))
def test_quantized_outputs_are_bitwise_unchanged(base, stored, name):
    out = quantized_chunks(base, name)
    assert not torch.equal(out, stored["fp"]), f"{name}: the method changed nothing"
    assert torch.equal(out, stored[name]), (
        f"{name}: max |diff| {float((out - stored[name]).abs().max()):.3g} from the stored chunk"
    )


def _regenerate() -> None:
    from safetensors.torch import save

    from daptq.atomic import atomic_write_bytes

    torch.set_num_threads(1)
    base = load_policy(MODEL)
    tensors = {"fp": _chunks(base).contiguous()}
    for name in configs():
        tensors[name] = quantized_chunks(base, name).contiguous()
        print(name, tuple(tensors[name].shape), float((tensors[name] - tensors["fp"]).abs().max()))
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(FIXTURE, save(tensors))


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        _regenerate()
    else:
        sys.exit("usage: python tests/test_adapter_regression.py --regenerate")
