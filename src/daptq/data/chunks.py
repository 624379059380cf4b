"""Action chunks: (frame, state, instruction) -> the next K expert labels, for training and calibration.

All cached shards are held in memory as flat arrays (fp16 vision tokens), and a batch is drawn by sampling
frame indices uniformly. The chunk for frame t is the labels of t..t+K-1 within its episode; past the
episode's end the last label is repeated (episodes end a few steps after success, so those actions say
"stay").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


def chunk_steps(index: torch.Tensor, episode_end: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Frame indices ``(N, K)`` of the action chunk of each frame in ``index``: t..t+K-1, clamped to the last
    frame of its episode (``episode_end[i]``), so a chunk past the end repeats the final "stay" label."""
    steps = index[:, None] + torch.arange(chunk_size)[None, :]
    return torch.minimum(steps, episode_end[:, None])


def episode_chunks(actions: np.ndarray, frames: np.ndarray, chunk_size: int) -> np.ndarray:
    """``(len(frames), K, action_dim)`` chunks of one episode's ``actions`` (T, action_dim) at ``frames``."""
    index = torch.as_tensor(np.asarray(frames, dtype=np.int64))
    end = torch.full_like(index, len(actions) - 1)
    return np.asarray(actions)[chunk_steps(index, end, chunk_size).numpy()]


class ChunkDataset:
    """Frames of many cached shards with per-task language features; ``sample(B)`` gives a training batch."""

    def __init__(
        self,
        files: Sequence[Path],
        chunk_size: int,
        language: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        if not files:
            raise ValueError("no cached feature files to train on")
        self.chunk_size = chunk_size
        self.files = [Path(f).name for f in files]
        vision, states, actions, ends, instr = [], [], [], [], []
        self.instructions: list[str] = []
        n = 0
        for path in files:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            instruction = meta.get("instruction")
            if instruction not in language:
                raise ValueError(f"{path}: instruction {instruction!r} has no language features")
            if instruction not in self.instructions:
                self.instructions.append(instruction)
            offsets = t["episode_offsets"].numpy()
            vision.append(t["vision_features"])
            states.append(t["states"])
            actions.append(t["actions"])
            ends.append(
                np.repeat(offsets[1:] - 1, np.diff(offsets)) + n
            )  # last frame index of each frame's episode
            instr.append(np.full(offsets[-1], self.instructions.index(instruction)))
            n += int(offsets[-1])
        self.vision = torch.cat(vision)
        self.states = torch.cat(states).float()
        self.actions = torch.cat(actions).float()
        self.episode_end = torch.from_numpy(np.concatenate(ends))
        self.instruction_index = torch.from_numpy(np.concatenate(instr))
        feats = [language[s] for s in self.instructions]
        width = max(f.shape[0] for f, _ in feats)
        self.language_features = torch.zeros(len(feats), width, feats[0][0].shape[-1])
        self.language_mask = torch.zeros(len(feats), width, dtype=torch.bool)
        for i, (f, m) in enumerate(feats):
            self.language_features[i, : f.shape[0]] = f
            self.language_mask[i, : m.shape[0]] = m

    def __len__(self) -> int:
        return len(self.actions)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        steps = chunk_steps(index, self.episode_end[index], self.chunk_size)
        lang = self.instruction_index[index]
        return {
            "vision_features": self.vision[index],
            "language_features": self.language_features[lang],
            "language_mask": self.language_mask[lang],
            "state": self.states[index],
            "actions": self.actions[steps],
        }

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.batch(torch.randint(0, len(self), (batch_size,), generator=generator))
