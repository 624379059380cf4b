"""Open-loop evaluation: a policy's per-step action error against recorded demonstrations; no simulator.

Every step of a demonstration is shown to the policy as its observation and the returned action is compared
with the expert's clean action label. A chunked policy predicts at the steps where its queue runs empty and
plays the rest of the chunk, exactly as in closed loop, so the error includes what chunking costs. Open-loop
error says nothing about drift (the policy never sees the consequences of its own actions): it is the check
for users who have data but no simulator.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq.eval import metrics, store


def _aggregate(errors: list[np.ndarray], actions: list[np.ndarray], hf_cutoff: float) -> dict[str, Any]:
    err = np.concatenate(errors)
    return {
        "episodes": len(errors),
        "steps": int(err.shape[0]),
        "action_mae": np.abs(err).mean(axis=0).tolist(),
        "action_rmse": np.sqrt((err**2).mean(axis=0)).tolist(),
        "hf_share_mean": np.mean(
            [metrics.high_frequency_share(a, hf_cutoff) for a in actions], axis=0
        ).tolist(),
    }


def open_loop_eval(
    policy: str,
    dataset: str | Path,
    tasks: Sequence[str] | None = None,
    split: str = "val",
    max_episodes: int | None = None,
    out: str | Path | None = None,
    hf_cutoff: float = metrics.DEFAULT_HF_CUTOFF,
) -> dict[str, Any]:
    """Per-dimension action error of ``policy`` (a model spec) on ``split`` of the dataset at ``dataset``.

    ``max_episodes`` caps the episodes per task. The policy is reset with each demonstration's seed. Returns
    per-task and overall MAE / RMSE per action dimension; with ``out`` also writes ``out/open_loop.json``.
    """
    from daptq.data import open_dataset
    from daptq.models.registry import load_policy

    if max_episodes is not None and max_episodes <= 0:
        raise ValueError(f"max_episodes must be positive, got {max_episodes}")
    ds = open_dataset(dataset)
    model = load_policy(policy)
    action_dim = int(ds.info.get("action_dim", model.action_space.dim))
    if action_dim != model.action_space.dim:
        raise ValueError(
            f"policy {policy!r} acts in {model.action_space.dim} dimensions, "
            f"dataset {dataset} has {action_dim}"
        )
    per_task_err: dict[str, list[np.ndarray]] = {}
    per_task_act: dict[str, list[np.ndarray]] = {}
    for ep in ds.episodes(split, list(tasks) if tasks is not None else None):
        if max_episodes is not None and len(per_task_err.get(ep.task, [])) >= max_episodes:
            continue
        model.reset(seed=ep.seed)
        predicted = np.stack(
            [
                np.asarray(
                    model.select_action(
                        {"image": ep.images[t], "state": ep.states[t], "instruction": ep.instruction}
                    ),
                    dtype=np.float32,
                )
                for t in range(len(ep.actions))
            ]
        )
        per_task_err.setdefault(ep.task, []).append(predicted - ep.actions)
        per_task_act.setdefault(ep.task, []).append(predicted)
    if not per_task_err:
        raise ValueError(f"{dataset}: no episodes in split {split!r} for tasks {tasks}")
    result = {
        "policy": policy,
        "dataset": str(dataset),
        "split": split,
        "action_names": list(model.action_space.names),
        "hf_cutoff": hf_cutoff,
        "per_task": {t: _aggregate(per_task_err[t], per_task_act[t], hf_cutoff) for t in per_task_err},
        "overall": _aggregate(
            [e for v in per_task_err.values() for e in v],
            [a for v in per_task_act.values() for a in v],
            hf_cutoff,
        ),
    }
    if out is not None:
        store.atomic_write_json(Path(out) / "open_loop.json", result)
    return result
