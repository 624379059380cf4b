"""Read a LeRobotDataset (codebase v2.0/v2.1 or v3.0) without lerobot: pyarrow for tables, PyAV for frames.

The layouts (``meta/info.json`` names the version and the path templates):

- v2.x: one parquet file per episode (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``),
  one MP4 per episode and camera, ``meta/episodes.jsonl`` (index, tasks, length), ``meta/tasks.jsonl``.
- v3.0: many episodes per parquet file and per MP4 (``data/chunk-{chunk_index:03d}/file-{file_index:03d}``),
  ``meta/episodes/chunk-*/file-*.parquet`` saying where each episode lives (its data file, its video files and
  its ``from_timestamp`` in each), ``meta/tasks.parquet`` (task string -> ``task_index``).

Features are read by the dataset's own keys: the camera (``observation.images.*``, a ``video`` or ``image``
feature; default the first in ``info.json``), the state (``observation.state``) and the action (``action``),
each overridable. A frame's instruction is the task of its ``task_index``. Frames are decoded only for the
steps the calibration sampler picks, at ``from_timestamp + timestamp`` of each, within half a frame period.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from daptq.data.episodes import EpisodeView, _check_episode, sha256_file

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
IMAGE_DTYPES = ("video", "image")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a LeRobotDataset (or an incomplete copy of one)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (a v2.x LeRobotDataset lists its episodes and tasks there)"
        )
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _read_parquet(
    path: Path,
    columns: list[str] | None = None,
    optional: tuple[str, ...] = (),
    keep: Callable[[str], bool] | None = None,
):
    """``columns`` (each required) plus those of ``optional`` present, or every column ``keep`` accepts
    (all when both are None): only what is needed is read (a table may hold encoded images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (named by meta/info.json's path template)")
    try:
        schema = pq.read_schema(path)
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise ValueError(f"{path}: no column(s) {missing} (has {schema.names})")
            columns = columns + [c for c in optional if c in schema.names and c not in columns]
        elif keep is not None:
            columns = [c for c in schema.names if keep(c)]
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def _column_2d(table, key: str, width: int, path: Path) -> np.ndarray:
    """A list-of-numbers column as (rows, width)."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    if (
        pa.types.is_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
        or pa.types.is_large_list(col.type)
    ):
        values = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
    else:
        values = np.asarray(col.to_numpy(zero_copy_only=False))
    if col.null_count or values.size != len(col) * width:
        raise ValueError(f"{path}: column {key!r} does not hold {width} numbers per row (info.json's shape)")
    return values.reshape(len(col), width)


def decode_video_frames(path: Path, timestamps: np.ndarray, fps: float) -> np.ndarray:
    """RGB uint8 (n, H, W, 3) frames of an MP4 at ``timestamps`` (seconds), each the frame presented within
    half a frame period of it; a timestamp past the video's end is an error naming both."""
    import av

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (named by meta/info.json's video_path template)")
    tolerance = 0.5 / fps
    want = np.asarray(timestamps, np.float64)
    order = np.argsort(want, kind="stable")
    out: list[np.ndarray | None] = [None] * len(want)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = None
            best: tuple[float, Any] | None = None  # the last decoded frame and its presentation time
            for i in order:
                ts = float(want[i])
                if frames is None or best is None or ts - best[0] > 2.0:  # far ahead: seek to a key frame
                    container.seek(
                        max(0, int((ts - tolerance) / stream.time_base)), stream=stream, backward=True
                    )
                    frames, best = container.decode(stream), None
                while best is None or best[0] < ts - tolerance:
                    frame = next(frames, None)
                    if frame is None:
                        break
                    if frame.time is not None:
                        best = (float(frame.time), frame)
                if best is None or abs(best[0] - ts) > tolerance:
                    end = "no frame" if best is None else f"the nearest decoded frame is at {best[0]:.3f} s"
                    raise ValueError(
                        f"{path}: no frame at {ts:.3f} s ({end}): the video is shorter than the dataset's "
                        "table, or its timestamps disagree"
                    )
                out[i] = best[1].to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None
    return np.stack(out)


def _decode_images(cells: list[Any], path: Path, key: str) -> np.ndarray:
    """``image`` features: PNG/JPEG bytes stored in the parquet table ({'bytes', 'path'} per row)."""
    import io

    from PIL import Image, UnidentifiedImageError

    frames = []
    for cell in cells:
        data = cell.get("bytes") if isinstance(cell, Mapping) else None
        if not data:
            raise ValueError(
                f"{path}: column {key!r} holds no image bytes (images stored outside the table?)"
            )
        try:
            frames.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: column {key!r}: not a readable image ({e})") from None
    return np.stack(frames)


class LeRobotReader:
    """A LeRobotDataset on disk: its metadata checked at construction, episodes read by ``episodes()``."""

    def __init__(
        self,
        root: str | os.PathLike,
        image: str | None = None,
        state: str = "observation.state",
        actions: str = "action",
        instruction: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.info_path = self.root / "meta" / "info.json"
        info = _read_json(self.info_path)
        if not isinstance(info, dict):
            raise ValueError(f"{self.info_path}: expected a JSON object")
        self.info = info
        self.version = str(info.get("codebase_version"))
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{self.info_path}: codebase_version {self.version!r} is not supported (reads "
                f"{', '.join(SUPPORTED_VERSIONS)}; convert older datasets with lerobot's converters)"
            )
        for key in ("features", "fps", "data_path"):
            if key not in info:
                raise ValueError(f"{self.info_path}: no {key!r}")
        self.features: dict[str, dict[str, Any]] = info["features"]
        self.fps = float(info["fps"])
        cameras = [k for k, f in self.features.items() if f.get("dtype") in IMAGE_DTYPES]
        if image is None:
            image = cameras[0] if cameras else None
        elif image not in cameras:
            raise ValueError(f"{self.info_path}: no camera feature {image!r} (cameras: {cameras})")
        for name, key in (("state", state), ("actions", actions)):
            if key not in self.features:
                numeric = [k for k, f in self.features.items() if f.get("dtype") not in IMAGE_DTYPES]
                raise ValueError(f"{self.info_path}: no {name} feature {key!r} (features: {numeric})")
        self.keys = {"image": image, "state": state, "actions": actions}
        self.cameras = cameras
        self.instruction = instruction
        self._meta_files = [self.info_path]
        self.tasks = self._read_tasks()
        self.episode_meta = self._read_episode_meta()

    # ---- metadata --------------------------------------------------------------------------------------
    @property
    def v3(self) -> bool:
        return self.version.startswith("v3")

    def _width(self, key: str) -> int:
        shape = self.features[key].get("shape") or [1]
        return int(np.prod(shape))

    def _read_tasks(self) -> dict[int, str]:
        if self.v3:
            path = self.root / "meta" / "tasks.parquet"
            if not path.is_file():
                return {}
            table = _read_parquet(path)
            names = "task" if "task" in table.column_names else "__index_level_0__"
            if "task_index" not in table.column_names or names not in table.column_names:
                raise ValueError(f"{path}: needs columns 'task_index' and 'task' (has {table.column_names})")
            self._meta_files.append(path)
            pairs = zip(table.column("task_index").to_pylist(), table.column(names).to_pylist(), strict=True)
        else:
            path = self.root / "meta" / "tasks.jsonl"
            if not path.is_file():
                return {}
            self._meta_files.append(path)
            pairs = ((r.get("task_index"), r.get("task")) for r in _read_jsonl(path))
        return {int(i): str(t) for i, t in pairs}

    def _read_episode_meta(self) -> list[dict[str, Any]]:
        if self.v3:
            files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise FileNotFoundError(
                    f"{self.root / 'meta' / 'episodes'}: no episode metadata (v3.0 layout)"
                )
            rows: list[dict[str, Any]] = []
            for path in files:
                table = _read_parquet(path, keep=lambda c: not c.startswith("stats/"))
                rows += table.to_pylist()
                self._meta_files.append(path)
            need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
            if self.keys["image"] and self.features[self.keys["image"]]["dtype"] == "video":
                need += [
                    f"videos/{self.keys['image']}/{c}"
                    for c in ("chunk_index", "file_index", "from_timestamp")
                ]
            for row in rows[:1]:
                missing = [c for c in need if c not in row]
                if missing:
                    raise ValueError(f"{files[0]}: episode metadata has no column(s) {missing}")
        else:
            path = self.root / "meta" / "episodes.jsonl"
            rows = _read_jsonl(path)
            self._meta_files.append(path)
            for n, row in enumerate(rows, 1):
                if "episode_index" not in row or "length" not in row:
                    raise ValueError(f"{path}:{n}: an episode needs 'episode_index' and 'length'")
        if not rows:
            raise ValueError(f"{self.root}: the dataset has no episodes")
        return sorted(rows, key=lambda r: int(r["episode_index"]))

    def stats(self) -> dict[str, Any]:
        """``meta/stats.json`` (per-feature mean/std/min/max), for users who normalize with it."""
        return _read_json(self.root / "meta" / "stats.json")

    def provenance(self) -> dict[str, Any]:
        names = self.features[self.keys["actions"]].get("names")
        return {
            "source": str(self.root),
            "format": f"lerobot-{self.version}",
            "keys": dict(self.keys),
            "fps": self.fps,
            "action_names": names if isinstance(names, list | dict) else None,
            "files": {str(p.relative_to(self.root)): sha256_file(p) for p in self._meta_files},
        }

    # ---- episodes --------------------------------------------------------------------------------------
    def _data_path(self, meta: Mapping[str, Any]) -> Path:
        template = self.info["data_path"]
        if self.v3:
            rel = template.format(
                chunk_index=int(meta["data/chunk_index"]), file_index=int(meta["data/file_index"])
            )
        else:
            ep = int(meta["episode_index"])
            rel = template.format(
                episode_chunk=ep // int(self.info.get("chunks_size", 1000)), episode_index=ep
            )
        return self.root / rel

    def _video(self, meta: Mapping[str, Any]) -> tuple[Path, float]:
        key, template = self.keys["image"], self.info.get("video_path")
        if not template:
            raise ValueError(f"{self.info_path}: feature {key!r} is a video but there is no 'video_path'")
        if self.v3:
            rel = template.format(
                video_key=key,
                chunk_index=int(meta[f"videos/{key}/chunk_index"]),
                file_index=int(meta[f"videos/{key}/file_index"]),
            )
            return self.root / rel, float(meta[f"videos/{key}/from_timestamp"])
        ep = int(meta["episode_index"])
        chunk = ep // int(self.info.get("chunks_size", 1000))
        return self.root / template.format(episode_chunk=chunk, video_key=key, episode_index=ep), 0.0

    def episodes(self, with_images: bool = True) -> list[EpisodeView]:
        """Every episode's state, actions and instructions (tables read once), frames decoded on demand."""
        state_key, action_key, image_key = self.keys["state"], self.keys["actions"], self.keys["image"]
        if with_images and image_key is None:
            raise ValueError(
                f"{self.info_path}: the dataset has no camera feature, and the policy sees images"
            )
        tables: dict[Path, Any] = {}
        out = []
        for meta in self.episode_meta:
            ep = int(meta["episode_index"])
            path = self._data_path(meta)
            if path not in tables:
                extra = ("episode_index", "frame_index", "timestamp", "task_index")
                tables[path] = _read_parquet(path, [state_key, action_key], optional=extra)
            table = tables[path]
            rows = np.arange(table.num_rows)
            if "episode_index" in table.column_names:
                rows = np.flatnonzero(table.column("episode_index").to_numpy() == ep)
            elif self.v3:
                raise ValueError(f"{path}: no 'episode_index' column to find episode {ep} in")
            if "frame_index" in table.column_names:
                frame_index = table.column("frame_index").to_numpy()[rows]
                rows = rows[np.argsort(frame_index, kind="stable")]
            length = int(meta["length"])
            if len(rows) != length:
                raise ValueError(
                    f"{path}: episode {ep} has {len(rows)} rows, the episode metadata says {length} frames"
                )
            part = table.take(rows)
            states = _column_2d(part, state_key, self._width(state_key), path)
            actions = _column_2d(part, action_key, self._width(action_key), path)
            instructions = self._instructions(part, meta, path)
            if "timestamp" in part.column_names:
                timestamps = part.column("timestamp").to_numpy().astype(np.float64)
            else:
                timestamps = np.arange(length) / self.fps
            view = EpisodeView(
                key=f"episode_{ep:06d}",
                states=states,
                actions=actions,
                instructions=instructions,
                files=(path,),
                meta={"episode_index": ep},
            )
            _check_episode(view, f"{path} (episode {ep})")
            if with_images:
                self._attach_frames(view, meta, path, rows, timestamps)
            out.append(view)
        return out

    def _instructions(self, part, meta: Mapping[str, Any], path: Path) -> list[str]:
        n = part.num_rows
        if self.instruction is not None:
            return [self.instruction] * n
        if "task_index" in part.column_names and self.tasks:
            index = part.column("task_index").to_numpy()
            unknown = sorted({int(i) for i in index} - set(self.tasks))
            if unknown:
                raise ValueError(f"{path}: task_index {unknown} not in the dataset's tasks")
            return [self.tasks[int(i)] for i in index]
        tasks = meta.get("tasks")
        if isinstance(tasks, list) and tasks and isinstance(tasks[0], str):
            return [tasks[0]] * n
        raise ValueError(
            f"{self.root}: episode {meta['episode_index']} has no task text (no meta/tasks and no 'tasks' in "
            "its metadata); give the instruction explicitly"
        )

    def _attach_frames(self, view: EpisodeView, meta, path: Path, rows: np.ndarray, timestamps) -> None:
        key = self.keys["image"]
        if self.features[key]["dtype"] == "video":
            video, start = self._video(meta)
            view.frame_files = (video,)
            view.frames = lambda idx: decode_video_frames(
                video, start + timestamps[np.asarray(idx)], self.fps
            )
        else:

            def frames(idx: np.ndarray) -> np.ndarray:
                table = _read_parquet(path, [key])
                return _decode_images(table.column(key).take(rows[np.asarray(idx)]).to_pylist(), path, key)

            view.frames = frames
