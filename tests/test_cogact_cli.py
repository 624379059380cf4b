"""End to end on the tiny CogACT: `daptq quantize cogact:RUN --method daptq --calibration EPISODES`, `daptq
inspect`, and loading the quantized directory back (its base pinned by the run's files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from daptq.cli import main
from daptq.models.cogact.testing import write_tiny_run

INSTRUCTIONS = ["pick the coke can", "open the drawer", "move the red block left", "put spoon on towel"]


def _write_episodes(directory, n: int = 6, steps: int = 12) -> None:
    """Episodes in daptq's documented .npz layout, with 7-D delta-EEF actions in robot units."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    for e in range(n):
        actions = np.concatenate([rng.uniform(-0.03, 0.03, (steps, 6)), rng.integers(0, 2, (steps, 1))], 1)
        np.savez(
            directory / f"ep{e:02d}.npz",
            images=rng.integers(0, 256, (steps, 32, 32, 3), dtype=np.uint8),
            state=rng.normal(size=(steps, 4)).astype(np.float32),
            actions=actions.astype(np.float32),
            instruction=np.array(INSTRUCTIONS[e % 4]),
        )


@pytest.mark.slow
def test_quantize_inspect_and_load_a_cogact_run(tmp_path, capsys):
    from daptq.sources import load_policy

    run = write_tiny_run(tmp_path / "run")
    _write_episodes(tmp_path / "episodes")
    out = tmp_path / "q"
    spec = f"cogact:{run}"
    argv = ["quantize", spec, "--method", "daptq", "--calibration", str(tmp_path / "episodes")]
    assert main([*argv, "--trajectories", "6", "--out", str(out)]) in (0, None)
    capsys.readouterr()
    assert main(["inspect", str(out)]) in (0, None)
    shown = capsys.readouterr().out
    assert "action_model.net.z_embedder.linear | interface" in shown and spec in shown

    quantized, fp = load_policy(str(out)), load_policy(spec)
    assert type(quantized).__name__ == "CogACTPolicy"
    assert quantized.info().recipe["method"] == "daptq" and fp.info().recipe is None
    assert quantized.info().digest != fp.info().digest
    batch = fp.adapter.model_inputs(
        np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), np.uint8), INSTRUCTIONS
    )
    a = fp.adapter.predict_chunk(batch, torch.Generator().manual_seed(0))
    b = quantized.adapter.predict_chunk(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert 10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum()) > 10  # W4A8, some layers kept float
    obs = {"image": np.zeros((32, 32, 3), np.uint8), "instruction": INSTRUCTIONS[0], "state": np.zeros(4)}
    quantized.reset(0)
    assert quantized.select_action(obs).shape == (7,)

    # the base is pinned by the run's files: a changed statistics file is refused at load
    stats = json.loads((run / "dataset_statistics.json").read_text())
    stats["bridge_orig"]["action"]["q99"][0] = 0.05
    (run / "dataset_statistics.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="dataset_statistics.json"):
        load_policy(str(out))
