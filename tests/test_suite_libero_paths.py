"""LIBERO through the same paths as every suite: ``daptq data generate --suite libero`` (scripted experts,
DART noise, clean labels, the dataset format with 8-D state and 7-D actions), ``daptq eval --suite libero``
for any policy acting in 7 dimensions (a tiny random one, paired with itself: zero drift of the end effector
and of the manipulated object), and a quiet LIBERO import. Needs the ``libero`` extra (./setup.sh installs
it); skipped with that reason otherwise."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from daptq.cli import main

needs_libero = pytest.mark.skipif(
    importlib.util.find_spec("libero") is None or importlib.util.find_spec("robosuite") is None,
    reason="LIBERO is not installed (the libero extra: ./setup.sh, or pip install -e '.[libero]')",
)

# What dependencies print when they are noisy (as tests/test_quiet_output.py), and LIBERO's own notices.
NOISE = re.compile(r"Warning|WARNING|macro file|\[info\]|Failed to load|leaked semaphore", re.MULTILINE)

RANDOM_7D_POLICY = """
import torch
from torch import nn

import daptq

K, A, S = 2, 7, 8
NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "grip"]
KINDS = ["translation"] * 3 + ["rotation"] * 3 + ["gripper"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(S, 16)
        self.head = nn.Linear(16, K * A)

    def forward(self, state):
        return torch.tanh(self.head(torch.tanh(self.enc(state)))).view(-1, K, A)


def build():
    model = Tiny().eval()

    def sample(batch, generator=None):
        out = model(batch["state"])
        return 0.3 * out + 0.05 * torch.randn(out.shape, generator=generator)

    def objective(batch, dim_weights=None, generator=None):
        return ((sample(batch, generator) - batch["actions"]) ** 2).mean()

    def prepare(batch):
        keep = {"actions": batch["actions"]} if "actions" in batch else {}
        return {"state": torch.as_tensor(batch["state"]).float(), **keep}

    return daptq.adapt(
        model, roles={"enc": "backbone", "head": "action_head"}, objective=objective, sample=sample,
        action_space={"names": NAMES, "kinds": KINDS}, prepare=prepare, chunk_size=K,
    ).policy(2)
"""


@needs_libero
def test_importing_libero_prints_no_deprecation_warning_or_macro_notice():
    code = "from daptq.envs.libero_suite import import_libero; import_libero()"
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "macro file" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


@needs_libero
@pytest.mark.slow
def test_data_generate_suite_libero_makes_demonstrations_in_the_dataset_format(tmp_path, capsys):
    from daptq.data.format import open_dataset

    root = tmp_path / "libero"
    argv = ["data", "generate", "--suite", "libero", "--root", str(root), "--tasks", "object-1"]
    argv += ["--train", "1", "--calib", "0", "--val", "0", "--image-size", "32", "--episodes-per-shard", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    ds = open_dataset(root)
    info = ds.info
    assert info["suite"] == "libero" and info["tasks"] == ["object-1"] and info["config"]["noise_std"] == 0.1
    assert (
        info["state_dim"] == 8
        and info["action_dim"] == 7
        and info["action_names"][3:6]
        == [
            "droll",
            "dpitch",
            "dyaw",
        ]
    )
    (episode,) = list(ds.episodes("train"))
    assert episode.success and 0 <= episode.seed < 100_000  # a seeded reset, never an official init state
    steps = len(episode)
    assert episode.images.shape == (steps, 32, 32, 3) and episode.images.std() > 0
    assert episode.states.shape == (steps, 8) and episode.actions.shape == (steps, 7)
    assert not np.array_equal(episode.actions, episode.executed_actions)  # DART noise; clean labels
    np.testing.assert_allclose(episode.ee_pos, episode.states[:, :3])
    assert episode.step_success[-1]
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert len(stats["action"]["mean"]) == 7


@needs_libero
@pytest.mark.slow
def test_eval_suite_libero_runs_any_7d_policy_paired_at_zero_drift_and_quietly(tmp_path):
    """As a user runs it (a subprocess, default warning filters): exit 0, nothing from LIBERO or robosuite on
    stderr, and the FP policy against itself at exactly zero drift of the end effector and of the object."""
    module = tmp_path / "random7.py"
    module.write_text(RANDOM_7D_POLICY)
    spec = f"torch:{module}:build"
    argv = ["eval", spec, "--reference", spec, "--suite", "libero", "--tasks", "object-1", "--episodes", "1"]
    argv += ["--max-steps", "6", "--workers", "1", "--envs-per-worker", "1", "--no-progress"]
    argv += ["--no-reference-cache", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "daptq.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if NOISE.search(line)]
    assert noise == [], "\n".join(noise)
    assert "object cm" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    run, overall = summary["run"], summary["overall"]
    assert run["suite"] == "libero" and run["seed_start"] == 1_000_000  # LIBERO's official init state 0
    assert run["camera"] == "agentview" and run["image_size"] == 128
    assert overall["episodes"] == 1 and overall["steps_mean"] == 6
    assert overall["drift_mean"] == 0.0 and overall["object_drift_mean"] == 0.0
    assert overall["floor_drift_mean"] > 0.0  # the reseeded reference does move differently
