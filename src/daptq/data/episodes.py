"""Calibration from the user's own recorded episodes: a LeRobotDataset or a directory of episode files.

``calibration_from_path(path, chunk_size, n, seed)`` detects the format and returns a ``CalibrationSet`` of
dataset-style batches (``image`` uint8 (B,H,W,3), ``state`` (B,S), ``instruction`` list[str], ``actions``
(B,K,A)), sampled like daptq's own calibration split: ``n`` episodes stratified over the 6 spatial bins
(``spatial_bins`` of each episode's mean state over ``position_dims``), then ``frames_per_episode`` seeded
frames of each with the next ``K`` actions. A chunk that runs past the episode's end repeats the last action
(the robot holds its final command), as daptq's own chunks do (``daptq.data.chunks``).

The episode-directory layout (one file per episode, sorted by name, ``*.npz`` or ``*.safetensors``):

- ``images``  uint8 (T, H, W, 3) RGB frames (optional for a policy that sees no images);
- ``state``   float (T, S) proprioceptive state;
- ``actions`` float (T, A) the action taken at each step;
- ``instruction`` the task's text: a 0-d string array in ``.npz``, a metadata entry in ``.safetensors``.

Other arrays are ignored. Nothing is unpickled (``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daptq.data.calibration import SPATIAL_BINS, CalibrationSet, spatial_bins, stratified_pick

EPISODE_SUFFIXES = (".npz", ".safetensors")
REQUIRED_KEYS = ("state", "actions")
PADDING = "last action repeated past the episode's end"


@dataclass
class EpisodeView:
    """One recorded episode as the sampler needs it; images are decoded only for the frames picked.

    ``frames(indices)`` returns uint8 (n, H, W, 3) for those steps, or is None when the source has no images.
    ``files`` are the files its table came from, ``frame_files`` those its frames are decoded from (both
    hashed into the provenance when read)."""

    key: str
    states: np.ndarray
    actions: np.ndarray
    instructions: Sequence[str]  # one per step
    frames: Callable[[np.ndarray], np.ndarray] | None = None
    files: tuple[Path, ...] = ()
    frame_files: tuple[Path, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _check_episode(ep: EpisodeView, where: str) -> None:
    states, actions = np.asarray(ep.states), np.asarray(ep.actions)
    if states.ndim != 2 or actions.ndim != 2:
        raise ValueError(
            f"{where}: state must be (T, S) and actions (T, A), got {states.shape}, {actions.shape}"
        )
    if len(states) != len(actions) or len(ep.instructions) != len(actions):
        raise ValueError(
            f"{where}: lengths differ: state has {len(states)} steps, actions {len(actions)}, "
            f"instructions {len(ep.instructions)}"
        )
    if len(actions) == 0:
        raise ValueError(f"{where}: the episode has no steps")
    for name, arr in (("state", states), ("actions", actions)):
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{where}: {name} must be numeric, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: {name} contains {int((~np.isfinite(arr)).sum())} NaN/Inf value(s)")


# ---- the episode directory ---------------------------------------------------------------------------------
ImageHeader = tuple[tuple[int, ...], np.dtype]  # shape and dtype of an episode's images, read without them


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], ImageHeader | None, str | None]:
    """The small arrays, the images' header (the images themselves are read only for picked frames)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "images"}
            header = None
            if "images" in z.files:
                with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
                    shape, _, dtype = (read or np.lib.format.read_array_header_2_0)(f)
                header = (tuple(shape), np.dtype(dtype))
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ValueError(f"{path}: not a readable .npz episode ({e})") from None
    instruction = arrays.pop("instruction", None)
    if instruction is not None:
        if instruction.ndim != 0 or instruction.dtype.kind != "U":
            raise ValueError(f"{path}: 'instruction' must be a 0-d string array, got {instruction.dtype}")
        instruction = str(instruction)
    return arrays, header, instruction


_SAFETENSORS_DTYPES = {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "F32": np.float32, "F64": np.float64}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], ImageHeader | None, str | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
            arrays = {k: f.get_tensor(k) for k in keys if k != "images"}
            header = None
            if "images" in keys:
                sl = f.get_slice("images")
                header = (tuple(sl.get_shape()), np.dtype(_SAFETENSORS_DTYPES.get(sl.get_dtype(), object)))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable .safetensors episode ({e})") from None
    return arrays, header, meta.get("instruction")


def _frames_reader(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Frames at given steps of an episode file, reading its images only then."""
    if path.suffix == ".npz":

        def frames(idx: np.ndarray) -> np.ndarray:
            with np.load(path, allow_pickle=False) as z:
                return z["images"][np.asarray(idx)]

        return frames

    def frames_st(idx: np.ndarray) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            sl = f.get_slice("images")
            return np.concatenate([sl[int(i) : int(i) + 1] for i in np.asarray(idx)])

    return frames_st


def read_episode_file(path: str | os.PathLike) -> tuple[EpisodeView, tuple[int, ...] | None]:
    """One episode file of the documented layout, validated (images by their header only); returns the
    episode (its ``frames`` reads the images of the steps asked for) and its image shape (H, W, 3) or None."""
    path = Path(path)
    arrays, header, instruction = _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path)
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        has = sorted([*arrays, *(["images"] if header else [])])
        raise ValueError(
            f"{path}: missing {missing} (has {has}); an episode file holds 'images' (T,H,W,3) "
            "uint8, 'state' (T,S), 'actions' (T,A) and an 'instruction' string"
        )
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(
            f"{path}: no 'instruction' (a 0-d string array in .npz, a metadata entry in .safetensors)"
        )
    actions = np.asarray(arrays["actions"])
    if header is not None:
        shape, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path}: 'images' must be uint8 (T, H, W, 3), got {dtype} {shape}")
        if shape[0] != len(actions):
            raise ValueError(f"{path}: lengths differ: images has {shape[0]} frames, actions {len(actions)}")
    ep = EpisodeView(
        key=path.name,
        states=np.asarray(arrays["state"]),
        actions=actions,
        instructions=[instruction] * len(actions),
        frames=None if header is None else _frames_reader(path),
        files=(path,),
    )
    _check_episode(ep, str(path))
    return ep, None if header is None else header[0][1:]


def episode_files(root: str | os.PathLike) -> list[Path]:
    """The episode files under ``root`` (recursively), in name order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix in EPISODE_SUFFIXES and p.is_file())


def read_episode_dir(root: str | os.PathLike) -> list[EpisodeView]:
    """Every episode of a directory of ``.npz``/``.safetensors`` files, checked to agree in shapes."""
    files = episode_files(root)
    if not files:
        raise ValueError(f"{root}: no .npz or .safetensors episode files")
    episodes = []
    first: tuple[Any, ...] | None = None
    for path in files:
        ep, image_shape = read_episode_file(path)
        shape = (ep.states.shape[1], ep.actions.shape[1], image_shape)
        if first is None:
            first = (path, shape)
        elif shape != first[1]:
            raise ValueError(
                f"{path}: (state dim, action dim, image shape) {shape} differs from "
                f"{first[0].name}'s {first[1]}"
            )
        ep.key = str(path.relative_to(root))
        episodes.append(ep)
    return episodes


# ---- sampling ----------------------------------------------------------------------------------------------
def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, h, w, 3) by antialiased bilinear resampling (no crop: aspect may change)."""
    import torch

    h, w = (size, size) if isinstance(size, int) else size
    if images.shape[1:3] == (h, w):
        return images
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def calibration_from_episodes(
    episodes: Sequence[EpisodeView],
    chunk_size: int,
    n: int,
    seed: int = 0,
    *,
    frames_per_episode: int = 4,
    batch_size: int = 32,
    with_images: bool = True,
    image_size: int | tuple[int, int] | None = None,
    position_dims: Sequence[int] = (0, 1),
    tasks: Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> CalibrationSet:
    """``n`` episodes stratified over the spatial bins of their mean state over ``position_dims``, then
    ``frames_per_episode`` seeded frames of each with the next ``chunk_size`` actions. Deterministic for a
    given source and seed. ``tasks`` keeps episodes whose instruction is one of them."""
    from daptq.data.chunks import episode_chunks

    for name, value in (("n", n), ("frames_per_episode", frames_per_episode), ("chunk_size", chunk_size)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    source = dict(provenance or {})
    where = source.get("source", "the episodes")
    if tasks is not None:
        wanted = set(tasks)
        episodes = [ep for ep in episodes if wanted & set(ep.instructions)]
    if len(episodes) < n:
        raise ValueError(
            f"asked for {n} calibration episodes; {where} has {len(episodes)}"
            f"{'' if tasks is None else f' with instructions {sorted(tasks)}'} (ask for fewer)"
        )
    dims = list(position_dims)
    state_dim = episodes[0].states.shape[1]
    if len(dims) != 2 or any(not 0 <= d < state_dim for d in dims):
        raise ValueError(
            f"position_dims must be 2 indices into the state (dimension {state_dim}), got {dims}"
        )
    if with_images and any(ep.frames is None for ep in episodes):
        missing = next(ep.key for ep in episodes if ep.frames is None)
        raise ValueError(f"{where}: episode {missing} has no images, and the policy needs them")
    means = np.stack([np.asarray(ep.states, np.float64)[:, dims].mean(axis=0) for ep in episodes])
    bins = spatial_bins(means)
    picked = stratified_pick(bins.tolist(), n, seed)
    rng = np.random.default_rng(seed + 1)
    samples: list[dict[str, Any]] = []
    frames_used: dict[str, list[int]] = {}
    files: set[Path] = set()
    for i in picked:
        ep = episodes[i]
        frames = np.sort(rng.choice(len(ep), min(frames_per_episode, len(ep)), replace=False))
        chunks = episode_chunks(np.asarray(ep.actions, np.float32), frames, chunk_size)
        images = None
        if with_images:
            images = np.asarray(ep.frames(frames))
            if images.dtype != np.uint8 or images.shape[:1] != frames.shape or images.shape[-1] != 3:
                raise ValueError(f"{ep.key}: decoded frames are {images.dtype} {images.shape}, not (n,H,W,3)")
            if image_size is not None:
                images = resize_images(images, image_size)
        for j, (f, chunk) in enumerate(zip(frames, chunks, strict=True)):
            sample = {
                "state": np.asarray(ep.states[f], np.float32),
                "instruction": ep.instructions[f],
                "actions": chunk,
            }
            if images is not None:
                sample["image"] = images[j]
            samples.append(sample)
        frames_used[ep.key] = [int(f) for f in frames]
        if with_images:
            files.update(ep.frame_files)
    for ep in episodes:  # every episode's table was read to bin it
        files.update(ep.files)
    batches = []
    for start in range(0, len(samples), batch_size):
        part = samples[start : start + batch_size]
        batch = {k: np.stack([s[k] for s in part]) for k in part[0] if k != "instruction"}
        batch["instruction"] = [s["instruction"] for s in part]
        batches.append(batch)
    root = Path(source.get("source", "."))
    counts = np.bincount(bins[picked], minlength=len(SPATIAL_BINS))
    source.update(
        {
            "files": {**source.get("files", {}), **{_rel(p, root): sha256_file(p) for p in sorted(files)}},
            "episodes": [episodes[i].key for i in picked],
            "frames": frames_used,
            "frames_per_episode": frames_per_episode,
            "trajectories": n,
            "bins": {b: int(c) for b, c in zip(SPATIAL_BINS, counts, strict=True)},
            "position_dims": dims,
            "seed": seed,
            "chunk_size": chunk_size,
            "chunk_padding": PADDING,
            "batches": len(batches),
            "tasks": sorted({s["instruction"] for s in samples}),
        }
    )
    if image_size is not None:
        source["image_size"] = list((image_size, image_size) if isinstance(image_size, int) else image_size)
    return CalibrationSet(batches, source)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ---- one entry point ---------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """``"lerobot"``, ``"daptq"`` (daptq's own demonstration dataset) or ``"episodes"``, else an error."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"calibration data not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{root}: calibration data must be a directory (a LeRobotDataset or episode files)")
    info = root / "meta" / "info.json"
    if info.is_file():
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{info}: not valid JSON ({e})") from None
        return "lerobot" if isinstance(meta, dict) and "codebase_version" in meta else "daptq"
    if (root / "meta").is_dir() or ((root / "data").is_dir() and any((root / "data").rglob("*.parquet"))):
        raise ValueError(f"{root}: looks like a LeRobotDataset but has no meta/info.json")
    if episode_files(root):
        return "episodes"
    raise ValueError(
        f"{root}: not a LeRobotDataset (no meta/info.json) and no .npz/.safetensors episode files in it"
    )


def calibration_from_path(
    path: str | os.PathLike,
    chunk_size: int,
    n: int = 64,
    seed: int = 0,
    *,
    frames_per_episode: int = 4,
    batch_size: int = 32,
    with_images: bool = True,
    image_size: int | tuple[int, int] | None = None,
    keys: Mapping[str, str] | None = None,
    position_dims: Sequence[int] = (0, 1),
    tasks: Sequence[str] | None = None,
    instruction: str | None = None,
) -> CalibrationSet:
    """A calibration set from a LeRobotDataset (v2.1 / v3.0), a directory of episode files or daptq's own
    demonstration dataset (its 'calib' split). ``keys`` maps ``image``/``state``/``actions`` to a LeRobot
    dataset's feature names (defaults: its first camera, ``observation.state``, ``action``); ``instruction``
    replaces a LeRobot dataset's task texts (for a dataset recorded without any)."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    common = dict(frames_per_episode=frames_per_episode, batch_size=batch_size, with_images=with_images)
    if fmt == "daptq":
        from daptq.data.calibration import sample_calibration

        if keys or instruction is not None:
            raise ValueError(
                f"{path}: a daptq dataset has fixed keys and instructions; keys and instruction apply to "
                "LeRobot datasets"
            )
        return sample_calibration(
            path,
            n,
            chunk_size=chunk_size,
            frames_per_trajectory=frames_per_episode,
            batch_size=batch_size,
            tasks=tasks,
            seed=seed,
            with_images=with_images,
        )
    if fmt == "lerobot":
        from daptq.data.lerobot import LeRobotReader

        reader = LeRobotReader(path, **dict(keys or {}), instruction=instruction)
        episodes, provenance = reader.episodes(with_images=with_images), reader.provenance()
    else:
        if instruction is not None:
            raise ValueError(f"{path}: episode files carry their own 'instruction'")
        if keys:
            raise ValueError(
                f"{path}: episode files have fixed keys; --calib-key applies to LeRobot datasets"
            )
        episodes = read_episode_dir(path)
        provenance = {"source": str(Path(path)), "format": "episodes"}
    return calibration_from_episodes(
        episodes,
        chunk_size,
        n,
        seed,
        image_size=image_size,
        position_dims=position_dims,
        tasks=tasks,
        provenance=provenance,
        **common,
    )


KEY_FIELDS = ("image", "state", "actions")


def parse_keys(items: Sequence[str] | None) -> dict[str, str]:
    """``["image=observation.images.wrist", ...]`` (the ``--calib-key`` option) -> a feature mapping."""
    keys: dict[str, str] = {}
    for item in items or ():
        field_name, sep, key = item.partition("=")
        if not sep or field_name not in KEY_FIELDS or not key:
            raise ValueError(f"--calib-key {item!r}: expected FIELD=KEY with FIELD one of {list(KEY_FIELDS)}")
        keys[field_name] = key
    return keys


def policy_calibration(
    policy: Any,
    path: str | os.PathLike | None,
    n: int = 64,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    keys: Mapping[str, str] | None = None,
    frames_per_episode: int = 4,
) -> CalibrationSet:
    """Calibration shaped for ``policy`` (its chunk size; its image size when it sees images) from the user's
    data at ``path``, or from daptq's own dataset / cache (``calibration_for_policy``) when it is one."""
    if path is None or detect_format(path) == "daptq":
        from daptq.data.calibration import calibration_for_policy

        if keys:
            raise ValueError("--calib-key applies to LeRobot datasets, not daptq's own dataset")
        return calibration_for_policy(policy, path, n, tasks, seed, frames_per_trajectory=frames_per_episode)
    image_size = getattr(policy, "image_size", None)
    return calibration_from_path(
        path,
        chunk_size_of(policy),
        n,
        seed,
        frames_per_episode=frames_per_episode,
        with_images=image_size is not None,
        image_size=None if image_size is None else int(image_size),
        keys=keys,
        tasks=tasks,
    )


def chunk_size_of(policy: Any) -> int:
    """The action-chunk length K a policy predicts: its own, its adapter's or its config's ``chunk_size``."""
    for owner in (policy, getattr(policy, "adapter", None), getattr(policy, "config", None)):
        k = getattr(owner, "chunk_size", None)
        if isinstance(k, int) and not isinstance(k, bool) and k > 0:
            return k
    raise ValueError(
        f"{type(policy).__name__}: cannot tell its action-chunk length (no chunk_size on the policy, its "
        "adapter or its config); calibration chunks need it"
    )
