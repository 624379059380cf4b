"""Task names, instructions, seed splits and step limits for the Meta-World MT10 tasks.

Kept free of mujoco imports so it can be read (e.g. by the CLI or docs tooling) without a renderer.
"""

from __future__ import annotations

import argparse

# Task name (Meta-World name without "-v3") -> natural-language instruction. Reach, push and pick-place share
# one scene (a puck and a goal marker): only the instruction tells the policy which task it is doing.
TASKS: dict[str, str] = {
    "reach": "reach the green goal marker with the gripper",
    "push": "push the puck to the green goal marker",
    "pick-place": "pick up the puck and place it at the green goal marker",
    "door-open": "open the door",
    "drawer-open": "open the drawer",
    "drawer-close": "close the drawer",
    "button-press-topdown": "press the button from the top",
    "peg-insert-side": "insert the peg into the hole from the side",
    "window-open": "slide the window open",
    "window-close": "slide the window closed",
}
MT10: tuple[str, ...] = tuple(TASKS)

# First seed of each split's range: seeds never overlap between splits as long as a split uses fewer than
# 100_000 episodes per task, so no evaluation seed is ever seen in training or calibration.
SEED_SPLITS: dict[str, int] = {"train": 0, "calib": 100_000, "val": 200_000, "eval": 1_000_000}

# Bumped whenever what the camera sees changes, so datasets, checkpoints and evaluation runs record which
# scene they were made with. 1: one colour for the reach/push/pick-place goal marker, enlarged. Data and
# checkpoints without the field predate it and were made with version 1. (A version with a stem under the goal
# marker was tried and not adopted: docs/benchmark.md, "Goal stem".)
SCENE_VERSION = 1

# Bumped whenever anything about a rollout changes without a package version changing (reset, stepping,
# rendering, observations, step limits); cached reference rollouts are keyed by it.
ENV_VERSION = 1

# Meta-World's own horizon; our step limits never exceed it (its env raises past it).
METAWORLD_MAX_STEPS = 500

# Step limit per task: about 2x the noisy expert's 95th-percentile episode length, rounded up to a multiple
# of 10 and capped at 500 (measured on the generated dataset; see "Step limits" in docs/benchmark.md).
# Measured p95 steps-to-success (successful episodes, noise std 0.2) in the comment after each limit.
DEFAULT_MAX_STEPS: dict[str, int] = {
    "reach": 180,  # p95 88
    "push": 170,  # p95 80
    "pick-place": 130,  # p95 62
    "door-open": 250,  # p95 122
    "drawer-open": 210,  # p95 101
    "drawer-close": 170,  # p95 85
    "button-press-topdown": 170,  # p95 81
    "peg-insert-side": 470,  # p95 233
    "window-open": 210,  # p95 103
    "window-close": 190,  # p95 94
}


def check_task(task: str) -> str:
    """Return ``task`` if it is an MT10 task name, else raise a ValueError listing the valid names."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are: {', '.join(MT10)}")
    return task


def task_name(text: str) -> str:
    """An MT10 task name, as an argparse ``type`` (lives beside the task list: ``daptq.cli_args`` stays a
    leaf that imports no suite)."""
    try:
        check_task(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def check_tasks(tasks) -> list[str]:
    """A non-empty list of distinct MT10 task names, else a ValueError naming the problem."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("at least one task is required")
    for task in tasks:
        check_task(task)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate tasks in {tasks}")
    return tasks


def seed_range(split: str, count: int) -> range:
    """The ``count`` seeds of a split, starting at ``SEED_SPLITS[split]``."""
    if split not in SEED_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are: {', '.join(SEED_SPLITS)}")
    if count < 0:
        raise ValueError(f"episode count must be >= 0, got {count}")
    start = SEED_SPLITS[split]
    return range(start, start + count)
