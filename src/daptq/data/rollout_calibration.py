"""Calibration on the states a quantized policy reaches: closed-loop rollouts on calibration seeds.

Drift means a quantized policy visits states the FP policy (and the expert demonstrations) never do, so an
expert calibration set never shows the quantizer the inputs it gets wrong. ``rollout_calibration`` rolls a
first quantized policy out closed loop on the suite's *calibration-split* seeds (never validation or
evaluation seeds: checked), keeps a few observations of every episode, labels each with the action chunk of
the model being quantized at that observation (the FP answer where the quantized policy went), optionally
mixes in a fraction of expert calibration samples, and returns a ``CalibrationSet`` whose provenance names the
rollout policy (spec, digest, record checksum), the suite, the seeds and the labels; ``quantize_policy``
copies it into the second quantization's record.

``daptq quantize MODEL --method daptq ... --calibration-from-policy DIR`` is this, through
``rollout_calibration_for``. It runs environments, so it lives with the other rollouts that make data (the
scripted-expert generator), below ``methods`` and ``eval``; it loads the rollout policy through
``daptq.sources``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq.data.calibration import CALIBRATION_SPLIT, CalibrationSet, _suite_for

OPTION = "--calibration-from-policy"


def _splits_holding(suite: Any, episode_id: int) -> list[str]:
    """The splits whose ids (up to where the next split starts: splits of seeded resets are unbounded)
    include ``episode_id``."""
    out = []
    for name, split in suite.splits.items():
        room = suite.split_room(name)
        if split.start <= episode_id and (room is None or episode_id < split.start + room):
            out.append(name)
    return out


def check_calibration_seeds(suite: Any, seeds: Sequence[int]) -> None:
    """Refuse any seed outside the suite's calibration split or inside another split (validation and
    evaluation episodes must stay unseen by calibration)."""
    if CALIBRATION_SPLIT not in suite.splits:
        raise ValueError(f"suite {suite.name} declares no {CALIBRATION_SPLIT!r} split to roll out on")
    for s in seeds:
        holding = _splits_holding(suite, int(s))
        if holding != [CALIBRATION_SPLIT] or suite.is_eval_episode(int(s)):
            raise ValueError(
                f"seed {s} is not a calibration seed of suite {suite.name} (it is in "
                f"{holding or 'no split'}); rollout calibration uses only the calibration split"
            )


def _snapshot(obs: Mapping[str, Any], with_images: bool) -> dict[str, Any]:
    sample = {"state": np.array(obs["state"], np.float32), "instruction": str(obs["instruction"])}
    if with_images:
        sample["image"] = np.array(obs["image"])  # a lazy image renders here, before the env moves on
    return sample


def _episode_frames(
    env: Any, policy: Any, seed: int, k: int, rng: np.random.Generator, with_images: bool
) -> tuple[list[tuple[int, dict[str, Any]]], bool, int]:
    """One closed-loop episode of ``policy``; ``k`` of its observations, uniformly over its steps by
    reservoir sampling (so a lazy image is rendered only for a kept candidate), with their step index."""
    obs, _ = env.reset(seed=int(seed))
    policy.reset(seed=int(seed))  # the sampling noise a paired evaluation of this seed would use
    dim = policy.action_space.dim
    kept: list[tuple[int, dict[str, Any]]] = []
    success, done, t = False, False, 0
    while not done:
        if len(kept) < k:
            kept.append((t, _snapshot(obs, with_images)))
        elif (j := int(rng.integers(0, t + 1))) < k:
            kept[j] = (t, _snapshot(obs, with_images))
        action = np.asarray(policy.select_action(obs), np.float32)
        if action.shape != (dim,) or not np.all(np.isfinite(action)):
            raise ValueError(
                f"the rollout policy returned action {action.tolist()} at step {t} of seed {seed}"
            )
        obs, _, terminated, truncated, info = env.step(action)
        success = success or bool(info.get("success", False))
        done = bool(terminated or truncated)
        t += 1
    return sorted(kept, key=lambda f: f[0]), success, t


def fp_labeler(policy: Any, seed: int = 0) -> Callable[[Mapping[str, Any]], np.ndarray]:
    """Labels from the model being quantized: its adapter's action chunk (B, K, D) for a dataset-style batch,
    noise from a generator seeded per call (deterministic for a given seed and call order)."""
    import torch

    adapter = getattr(policy, "adapter", policy)
    calls = [0]

    def label(batch: Mapping[str, Any]) -> np.ndarray:
        model_batch = next(iter(adapter.calibration_batches(iter([batch]))))
        generator = torch.Generator().manual_seed(int(seed) * 100_003 + calls[0])
        calls[0] += 1
        chunk = adapter.predict_chunk(model_batch, generator)
        return np.asarray(chunk.detach().cpu().numpy() if hasattr(chunk, "detach") else chunk, np.float32)

    return label


def _rows(calibration: CalibrationSet) -> list[dict[str, Any]]:
    rows = []
    for batch in calibration.batches:
        n = len(np.asarray(batch["state"] if "state" in batch else batch["actions"]))
        rows += [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return rows


def _batches(samples: Sequence[Mapping[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    out = []
    for start in range(0, len(samples), batch_size):
        part = samples[start : start + batch_size]
        batch = {k: np.stack([np.asarray(s[k]) for s in part]) for k in part[0] if k != "instruction"}
        batch["instruction"] = [str(s["instruction"]) for s in part]
        out.append(batch)
    return out


def rollout_calibration(
    policy: Any,
    labeler: Any,
    *,
    suite: str | None = None,
    tasks: Sequence[str] | None = None,
    episodes_per_task: int = 4,
    frames_per_episode: int = 4,
    max_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    expert: CalibrationSet | None = None,
    mix: float = 0.0,
    source: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> CalibrationSet:
    """Calibration batches from closed-loop rollouts of ``policy`` on calibration seeds.

    ``labeler``: the policy being quantized (FP); it sets the suite (when ``suite`` is None, as
    ``calibration_for_policy`` does), the image size and camera rendered, whether images are kept, and labels
    every kept observation with its action chunk (``fp_labeler``). ``episodes_per_task`` seeds of the
    calibration split per task (the first ones), ``frames_per_episode`` observations of each episode
    (uniform over its steps, seeded); ``max_steps`` caps episodes (default: the suite's limit per task).
    ``mix`` in [0, 1): that fraction of the returned samples is drawn (seeded, without replacement) from
    ``expert``, the rest are rollout samples. ``source``: the rollout policy's identity for the provenance
    (``spec``, ...); its ``info().digest`` is added.
    """
    for name, value in (("episodes_per_task", episodes_per_task), ("frames_per_episode", frames_per_episode)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_steps is not None and (type(max_steps) is not int or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    if not (isinstance(mix, int | float) and 0.0 <= mix < 1.0):
        raise ValueError(f"mix (the expert share) must be in [0, 1), got {mix!r}")
    if mix > 0 and expert is None:
        raise ValueError(f"mix={mix} needs an expert calibration set to draw from")
    bench = _suite_for(labeler, suite)
    space = labeler.action_space
    if list(policy.action_space.names) != list(space.names):
        raise ValueError(
            f"the rollout policy acts in {list(policy.action_space.names)}, the model being quantized in "
            f"{list(space.names)}"
        )
    names = bench.check_tasks(tasks or None)
    room = bench.split_room(CALIBRATION_SPLIT) if CALIBRATION_SPLIT in bench.splits else None
    if room is not None and episodes_per_task > room:
        raise ValueError(
            f"suite {bench.name}'s calibration split has {room} seeds; {episodes_per_task} episodes asked for"
        )
    seeds = list(bench.episode_ids(CALIBRATION_SPLIT, episodes_per_task))
    check_calibration_seeds(bench, seeds)
    with_images = hasattr(labeler, "image_size")
    image_size = int(getattr(labeler, "image_size", bench.observations.default_image_size))
    camera = str(getattr(labeler, "camera", bench.observations.default_camera))
    for attr, want in (("image_size", image_size), ("camera", camera)):
        have = getattr(policy, attr, None)
        if with_images and have is not None and have != want:
            raise ValueError(f"the rollout policy sees {attr} {have!r}, the model being quantized {want!r}")

    samples: list[dict[str, Any]] = []
    episodes: list[dict[str, Any]] = []
    for task_index, task in enumerate(names):
        env = bench.make_env(
            task,
            image_size=image_size,
            camera=camera,
            max_steps=int(max_steps or bench.max_steps[task]),
            lazy_images=True,  # rendered only when read: by the policy at a re-plan, or for a kept frame
        )
        try:
            for s in seeds:
                rng = np.random.default_rng([int(seed), int(s), task_index])
                kept, success, steps = _episode_frames(env, policy, s, frames_per_episode, rng, with_images)
                samples += [sample for _, sample in kept]
                episodes.append(
                    {
                        "task": task,
                        "seed": int(s),
                        "success": success,
                        "steps": steps,
                        "frames": [t for t, _ in kept],
                    }
                )
                if progress:
                    print(
                        f"rollout calibration: {task} seed {s}: {steps} steps, success {success}", flush=True
                    )
        finally:
            close = getattr(env, "close", None)
            if callable(close):
                close()

    label = fp_labeler(labeler, seed)
    batches = _batches(samples, batch_size)
    for i, batch in enumerate(batches):
        actions = label(batch)
        if actions.ndim != 3 or actions.shape[0] != len(batch["state"]) or actions.shape[-1] != space.dim:
            raise ValueError(
                f"labels of rollout batch {i} have shape {actions.shape}, expected (B, K, {space.dim})"
            )
        batch["actions"] = actions
    rollout_rows = sum(len(b["state"]) for b in batches)

    n_expert = 0
    expert_provenance = None
    if mix > 0:
        assert expert is not None
        pool = _rows(expert)
        n_expert = max(1, round(rollout_rows * mix / (1.0 - mix)))
        if n_expert > len(pool):
            raise ValueError(
                f"rollout mix {mix}: {n_expert} expert samples needed beside {rollout_rows} rollout samples, "
                f"the expert calibration set has {len(pool)} (ask for more trajectories, or a smaller mix)"
            )
        rollout_keys = set(batches[0])
        if set(pool[0]) != rollout_keys:
            raise ValueError(f"expert samples have {sorted(pool[0])}, rollout samples {sorted(rollout_keys)}")
        k_roll, k_exp = batches[0]["actions"].shape[1], np.asarray(pool[0]["actions"]).shape[0]
        if k_roll != k_exp:
            raise ValueError(f"expert chunks have {k_exp} actions, the labels {k_roll}")
        pick = np.sort(np.random.default_rng([int(seed), 1]).choice(len(pool), n_expert, replace=False))
        batches = _batches(
            [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["state"]))]
            + [pool[i] for i in pick],
            batch_size,
        )
        expert_provenance = dict(expert.provenance)

    provenance = {
        "source": "rollouts",
        "policy": {**dict(source or {}), "digest": policy.info().digest},
        "labels": "the quantized model's FP action chunk at each rollout observation",
        "suite": bench.name,
        "suite_version": bench.version,
        "split": CALIBRATION_SPLIT,
        "tasks": names,
        "seeds": seeds,
        "episodes": episodes,
        "success_rate": sum(e["success"] for e in episodes) / len(episodes),
        "frames_per_episode": frames_per_episode,
        "max_steps": {t: int(max_steps or bench.max_steps[t]) for t in names},
        "seed": seed,
        "rollout_samples": rollout_rows,
        "mix": float(mix),
        "expert_samples": n_expert,
        "expert": expert_provenance,
        "batches": len(batches),
        "action_space": {"names": list(space.names)},
    }
    return CalibrationSet(batches, provenance)


def rollout_source(spec: str) -> dict[str, Any]:
    """Check ``spec`` names a policy to roll out (a quantized policy directory, or a ``prefix:...`` spec) and
    return its identity for the provenance: a path that is not a quantized policy directory is an error
    naming the option and what the path is."""
    from daptq.integrity import sha256_file
    from daptq.paths import not_a_quantized_policy
    from daptq.sources import available_sources

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{OPTION}: needs a quantized policy directory or a model spec, got {spec!r}")
    prefix = spec.partition(":")[0] if ":" in spec else None
    if prefix in available_sources() or spec in available_sources():
        return {"spec": spec}
    path = Path(spec)
    qconfig = path / "quantization_config.json"
    if not qconfig.is_file():
        raise FileNotFoundError(f"{OPTION}: {not_a_quantized_policy(path)}")
    return {"spec": spec, "record_sha256": sha256_file(qconfig)}


def rollout_calibration_for(
    policy: Any,
    spec: str,
    *,
    episodes_per_task: int | None = None,
    trajectories: int = 64,
    mix: float = 0.0,
    expert: Callable[[Any], CalibrationSet] | None = None,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    suite: str | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """``rollout_calibration`` of the policy ``spec`` names, labelled by ``policy`` (the model being
    quantized).

    ``episodes_per_task`` defaults to ``trajectories`` spread over the tasks (as many episodes as the expert
    set has trajectories); ``expert(policy)`` builds the expert set when ``mix`` > 0."""
    from daptq.sources import load_policy

    source = rollout_source(spec)
    rollout_policy = load_policy(spec)
    bench = _suite_for(policy, suite)
    if episodes_per_task is None:
        episodes_per_task = max(1, math.ceil(trajectories / len(bench.check_tasks(tasks or None))))
    expert_set = None
    if mix > 0:
        if expert is None:
            raise ValueError(f"{OPTION}: a rollout mix of {mix} needs an expert calibration set")
        expert_set = expert(policy)
    return rollout_calibration(
        rollout_policy,
        policy,
        suite=bench.name,
        tasks=tasks,
        episodes_per_task=episodes_per_task,
        max_steps=max_steps,
        seed=seed,
        expert=expert_set,
        mix=mix,
        source=source,
        progress=progress,
    )
