"""The resumable evaluation runner behind ``daptq eval``.

Workers (a spawn-context pool) rebuild env + policies from spec strings once and run many episodes; the parent
is the single writer of the run directory (see ``daptq.eval.store`` for why a crash never loses or duplicates
an episode). The parent is also one of the ``workers``: it has loaded the policies to validate the request
anyway, so M workers start M - 1 processes, and those start (import, load the policies) while the parent
validates. With ``workers=1`` every episode runs in the parent.

Everything about the benchmark comes from its suite (``daptq.envs.suite``, ``run["suite"]``): tasks, step
limits, the evaluation split, what to render by default, the environments and where the end effector and the
manipulated object are read for drift. A run written before suites existed is a Meta-World run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from daptq.envs.suite import DEFAULT_SUITE, Suite, get_suite, is_builtin
from daptq.eval import store
from daptq.eval.cache import ReferenceCache, base_key
from daptq.eval.local_pool import LocalPool, pool_results
from daptq.eval.metrics import DEFAULT_DIVERGENCE_THRESHOLD_M, DEFAULT_HF_CUTOFF
from daptq.eval.rollout import Rollout, episode_record, run_episode, run_episodes
from daptq.eval.summary import summarize
from daptq.models.adapter import PolicyInfo

_VERSIONED_PACKAGES = ("daptq", "torch", "torchao", "numpy", "metaworld", "mujoco", "gymnasium", "scipy")


# ----------------------------------------------------------------------------------------------- episodes


# The reseed floor: the reference re-sampled with its noise seed moved by this fixed offset.
FLOOR_SEED_OFFSET = 1 << 30
# Episodes per batch slot in one call of a worker: with N > 1 environments a group of up to 4N episodes of a
# task runs on the N environments, a finished episode's environment taking the next seed (``run_episodes``).
EPISODES_PER_SLOT = 4
# Threads per evaluation process (torch per call; ONNX Runtime sessions when built): workers share the cores.
WORKER_THREADS = 1


def group_size(envs_per_worker: int) -> int:
    """Episodes a worker runs in one call: 1 for the one-env rollout, else ``EPISODES_PER_SLOT`` per env."""
    return 1 if envs_per_worker == 1 else EPISODES_PER_SLOT * envs_per_worker


class EpisodeRunner:
    """Builds the policies once and the current task's envs on first use; runs (paired) episodes.

    Jobs arrive task by task, so only one task's envs are kept: switching task closes the previous ones (each
    env holds a renderer context). With ``envs_per_worker`` N > 1 a call runs a group of up to
    ``group_size(N)`` episodes of one task on N environments in lockstep (``run_episodes``: one batched
    policy call per step, fixed N batch slots, an ended episode's env refilled with the next seed); N = 1 is
    the one-env rollout. Reference rollouts (and the reseed floor) come from the reference cache when
    ``execution["reference_cache"]`` names one. Episodes run with one torch thread in every process, so 1 and
    M workers (and the cache) agree bitwise.
    """

    def __init__(
        self,
        run: dict[str, Any],
        execution: dict[str, Any] | None = None,
        policies: Mapping[str, Any] | None = None,
    ) -> None:
        self.run = run
        execution = execution or {}
        policies = policies or {}
        self.slots = int(execution.get("envs_per_worker", 1))
        self.group_size = group_size(self.slots)
        self.candidate = policies["candidate"] if "candidate" in policies else _load(run["candidate"])
        self.reference = self.shadow = None
        if run["reference"] is not None:
            # One instance serves as both: the shadow acts during the candidate's rollout, the reference
            # after it, and the batched path keeps every episode's queue and generator outside the policy.
            ref = policies["reference"] if "reference" in policies else _load(run["reference"])
            self.reference = self.shadow = ref
        if self.reference is self.candidate:
            raise ValueError("candidate and reference must be separate instances (a policy keeps state)")
        self.cache = None
        if execution.get("reference_cache") and self.reference is not None:
            self.cache = ReferenceCache(execution["reference_cache"], execution["cache_key"])
        self.suite = run_suite(run)
        self._task: str | None = None
        self._envs: list[Any] = []

    def envs(self, task: str, n: int) -> list[Any]:
        if task != self._task:
            self.close()
            self._task = task
        while len(self._envs) < n:
            env = self.suite.make_env(
                task,
                image_size=self.run["image_size"],
                camera=self.run["camera"],
                max_steps=self.run["max_steps"][task],
                lazy_images=True,  # rendered only when a policy reads the image (at a re-plan)
            )
            self._envs.append(env)
            env_dim = int(env.action_space.shape[0])
            if self.candidate.action_space.dim != env_dim:
                raise ValueError(
                    f"{self.run['candidate']} acts in {self.candidate.action_space.dim} dimensions, "
                    f"the {task} environment in {env_dim}"
                )
        return self._envs[:n]

    def _rollouts(self, policy: Any, task: str, seeds: list[int], offset: int, shadow: Any = None) -> list:
        envs = self.envs(task, min(len(seeds), self.slots))
        policy_seeds = [s + offset for s in seeds]
        observations = self.suite.observations
        if self.slots == 1:
            env = envs[0]
            return [
                run_episode(env, policy, s, shadow=shadow, policy_seed=p, observations=observations)
                for s, p in zip(seeds, policy_seeds, strict=True)
            ]
        return run_episodes(
            envs, policy, seeds, shadow=shadow, policy_seeds=policy_seeds, slots=self.slots,
            observations=observations,
        )  # fmt: skip

    def reference_rollouts(self, task: str, seeds: list[int], offset: int) -> list[tuple[Rollout, bool]]:
        """The reference's rollouts of (task, seed) with sampling seeds ``seed + offset``; True if cached."""
        keys = [None] * len(seeds)
        found: list[Rollout | None] = [None] * len(seeds)
        if self.cache is not None:
            keys = [self.cache.key(task, s, s + offset, self.run["max_steps"][task]) for s in seeds]
            found = [self.cache.get(k) for k in keys]
        missing = [i for i, r in enumerate(found) if r is None]
        if missing:
            computed = self._rollouts(self.reference, task, [seeds[i] for i in missing], offset)
            for i, rollout in zip(missing, computed, strict=True):
                found[i] = rollout
                if keys[i] is not None:
                    self.cache.put(keys[i], rollout)
        return [(r, i not in missing) for i, r in enumerate(found)]

    def __call__(self, jobs: list[tuple[str, int]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Run a group of episodes of one task (at most ``group_size``); one (record, arrays) each."""
        import torch

        task = jobs[0][0]
        if any(t != task for t, _ in jobs) or len(jobs) > self.group_size:
            raise ValueError(f"a group holds up to {self.group_size} episodes of one task, got {jobs}")
        seeds = [s for _, s in jobs]
        threads = torch.get_num_threads()
        torch.set_num_threads(WORKER_THREADS)
        try:
            self.envs(task, min(len(seeds), self.slots))
            start = time.perf_counter()
            cands = self._rollouts(self.candidate, task, seeds, 0, shadow=self.shadow)
            refs = floors = [(None, None)] * len(seeds)
            if self.reference is not None:
                refs = self.reference_rollouts(task, seeds, 0)
                if self.run["reseed_floor"]:
                    floors = self.reference_rollouts(task, seeds, FLOOR_SEED_OFFSET)
            wall = (time.perf_counter() - start) / len(seeds)
        finally:
            torch.set_num_threads(threads)
        out = []
        for seed, cand, (ref, ref_hit), (floor, floor_hit) in zip(seeds, cands, refs, floors, strict=True):
            record, arrays = episode_record(
                task, seed, cand, ref, self.run["divergence_threshold"], self.run["hf_cutoff"], floor=floor
            )
            record["env_steps"] = cand.steps + (ref.steps if ref is not None else 0)
            # How this episode was computed (differs between runs of the same episode; never a result).
            record["wall_s"] = wall  # episodes only (a group's time shared), env construction excluded
            hits = [h for h in (ref_hit, floor_hit) if h is not None]
            record["simulated_steps"] = cand.steps + sum(
                r.steps for r, h in ((ref, ref_hit), (floor, floor_hit)) if r is not None and not h
            )
            record["reference_cached"] = all(hits) if hits else None
            out.append((record, arrays))
        return out

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs, self._task = [], None


def run_suite(run: dict[str, Any]) -> Suite:
    """The suite a run evaluates on (runs written before suites existed are Meta-World runs)."""
    return get_suite(run.get("suite", DEFAULT_SUITE))


def _load(spec: str) -> Any:
    from daptq.models.registry import load_policy

    return load_policy(spec, onnx_threads=WORKER_THREADS)


_WORKER: EpisodeRunner | None = None
_WORKER_POLICIES: dict[str, Any] = {}
_WORKER_INIT_ERROR: BaseException | None = None


def set_process_defaults() -> None:
    """What a process that renders and loads encoders needs before it imports them: headless rendering
    (``MUJOCO_GL``, unless set) and an offline Hugging Face hub (the encoders' files are bundled)."""
    from daptq.envs import use_headless_rendering

    use_headless_rendering()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read when onnxruntime loads (see deploy.runtime)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from `--backend ray`


def _init_worker(specs: Mapping[str, str], suite: str = DEFAULT_SUITE) -> None:
    """Start a pool worker from the model specs alone (role -> spec, known before the parent's validation
    ends) and the suite's name: load the policies and import the simulator, so the first job only builds
    its envs."""
    global _WORKER_INIT_ERROR
    set_process_defaults()
    import torch

    torch.set_num_threads(WORKER_THREADS)  # one core per worker; several workers share the machine
    try:
        for role, spec in specs.items():
            _WORKER_POLICIES[role] = _load(spec)  # one instance per role, also for equal specs
        if suite == DEFAULT_SUITE:
            import daptq.envs.metaworld_env  # noqa: F401  (MuJoCo, Meta-World: the first job's envs)
        else:
            get_suite(suite).require()
    except (
        Exception
    ) as exc:  # re-raised from _run_job: a Pool would respawn a worker whose init raised, forever
        _WORKER_INIT_ERROR = exc


def _run_job(
    run: dict[str, Any], execution: dict[str, Any], job: list[tuple[str, int]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Run one group in a pool worker; its runner is built on the first job (every job of a pool carries
    the same validated ``run`` and ``execution``)."""
    global _WORKER
    if _WORKER_INIT_ERROR is not None:
        raise RuntimeError(
            f"evaluation worker failed to start: {_WORKER_INIT_ERROR!r}"
        ) from _WORKER_INIT_ERROR
    if _WORKER is None:
        _WORKER = EpisodeRunner(run, execution, policies=_WORKER_POLICIES)
    return _WORKER(job)


# ---------------------------------------------------------------------------------------------- run config


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["daptq"] is None:  # running from a source tree that is not pip-installed
        import daptq

        out["daptq"] = f"{daptq.__version__} (source tree)"
    return out


def _git(*args: str) -> str | None:
    """Output of a git command in the source checkout daptq runs from; None if installed or without git."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file() or not (root / "src" / "daptq").is_dir():
        return None  # installed (e.g. site-packages): an enclosing repository would not be daptq's
    try:
        res = subprocess.run(
            ["git", "-C", str(root), *args],
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # never take index.lock: someone may be committing
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _git_dirty() -> bool | None:
    """Whether the source tree has uncommitted changes (then the commit alone does not reproduce the run)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _jsonable(obj: Any) -> Any:
    """``obj`` if it survives a JSON round trip, else its repr (a recipe must never break config.json)."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError):
        return repr(obj)


def _file_digests(spec: str) -> dict[str, str] | None:
    """sha256 of every file of a model directory: a re-quantized model keeps its path but not its digests."""
    root = Path(spec)
    if not root.is_dir():
        return None
    from daptq.models.quantized import sha256_file

    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(p for p in root.rglob("*") if p.is_file())
    }


def _describe(policy: Any, info: PolicyInfo, spec: str) -> dict[str, Any]:
    """What a run records of a model: its action space, what it declares (``info``) and the digest of its
    weights and config (compared on resume), plus file digests when the spec is a directory."""
    return {
        "action_space": policy.action_space.to_dict(),
        "recipe": _jsonable(dict(info.recipe) if info.recipe is not None else None),
        "digest": info.digest,
        "declares": _jsonable({k: v for k, v in info.to_dict().items() if k not in ("digest", "recipe")}),
        "files_sha256": _file_digests(spec),
    }


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = True) -> float:
    """A finite real in (low, high] (or [low, high]): nan and inf would reach config.json and the metrics."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


def _run_spec(
    candidate: str,
    reference: str | None,
    tasks: Sequence[str] | None,
    episodes: int,
    seed_start: int | None,
    max_steps: int | None,
    image_size: int | None,
    camera: str | None,
    divergence_threshold: float,
    hf_cutoff: float,
    reseed_floor: bool = True,
    suite: str = DEFAULT_SUITE,
) -> dict[str, Any]:
    """Validate the request and resolve its defaults from the suite: the identity of a run (what --resume
    must match)."""
    if not isinstance(suite, str) or not suite:
        raise ValueError(f"suite must be a suite name, got {suite!r}")
    bench = get_suite(suite)
    if not isinstance(candidate, str) or not candidate:
        raise ValueError(f"candidate must be a model spec string, got {candidate!r}")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ValueError(f"reference must be a model spec string or None, got {reference!r}")
    tasks = bench.check_tasks(tasks)
    _check_int("episodes", episodes, 1)
    eval_split = bench.splits["eval"]
    seed_start = eval_split.start if seed_start is None else _check_int("seed_start", seed_start, 0)
    if seed_start + episodes > 2**32:
        raise ValueError(f"seeds {seed_start}..{seed_start + episodes - 1} exceed the 32-bit seed range")
    if eval_split.contains(seed_start) and not eval_split.contains(seed_start + episodes - 1):
        bench.episode_ids("eval", episodes, seed_start - eval_split.start)  # says how many there are
    if max_steps is not None:
        _check_int("max_steps", max_steps, 1)
    if image_size is not None:
        _check_int("image_size", image_size, 1)
    if camera is not None:
        bench.check_camera(camera)
    if not isinstance(reseed_floor, bool):
        raise ValueError(f"reseed_floor must be True or False, got {reseed_floor!r}")
    run = {
        "candidate": candidate,
        "reference": reference,
        "tasks": tasks,
        "episodes": episodes,
        "seed_start": seed_start,
        "max_steps": {t: int(max_steps or bench.max_steps[t]) for t in tasks},
        "image_size": image_size,
        "camera": camera,
        "divergence_threshold": _check_float("divergence_threshold (metres)", divergence_threshold, 0.0),
        "hf_cutoff": _check_float("hf_cutoff (cycles/step)", hf_cutoff, 0.0, 0.5),
        "scene_version": bench.scene_version,
        "reseed_floor": bool(reseed_floor) and reference is not None,
        "floor_seed_offset": FLOOR_SEED_OFFSET,
        "suite": bench.name,
        "suite_version": bench.version,
    }
    return run


def _warn_on_scene_mismatch(infos: list[PolicyInfo], scene_version: int) -> None:
    """A policy trained on images of another scene version sees an unfamiliar scene: say so."""
    for info in infos:
        if info.scene_version is not None and info.scene_version != scene_version:
            warnings.warn(
                f"a policy was trained on scene version {info.scene_version}, but the environments render "
                f"scene version {scene_version}; its success rates will not match its training",
                stacklevel=3,
            )


def _observation_settings(
    infos: list[PolicyInfo], image_size: int | None, camera: str | None, suite: Suite | None = None
) -> tuple[int, str]:
    """Render what the policies declare (``PolicyInfo.image_size`` / ``camera``), else the suite's defaults
    (Meta-World: 96 px, "corner3")."""
    suite = suite or get_suite(DEFAULT_SUITE)
    resolved: dict[str, Any] = {"image_size": image_size, "camera": camera}
    defaults = (
        ("image_size", suite.observations.default_image_size),
        ("camera", suite.observations.default_camera),
    )
    for name, default in defaults:
        declared = {getattr(i, name) for i in infos if getattr(i, name) is not None}
        if len(declared) > 1:
            raise ValueError(f"candidate and reference expect different {name}: {sorted(declared)}")
        if declared and resolved[name] is not None and resolved[name] not in declared:
            raise ValueError(
                f"{name}={resolved[name]!r} requested, but the policies expect {declared.pop()!r}"
            )
        if resolved[name] is None:
            resolved[name] = declared.pop() if declared else default
    if not isinstance(resolved["image_size"], int) or resolved["image_size"] <= 0:
        raise ValueError(f"image_size must be a positive integer, got {resolved['image_size']!r}")
    return resolved["image_size"], str(resolved["camera"])


def _check_environment(run: dict[str, Any], action_dim: int) -> None:
    """Build (and close) one environment as the workers will, so an unknown camera or an action-dimension
    mismatch fails before anything is written. Other suites than Meta-World are checked against what they
    declare (cameras in ``_run_spec``, the action width here) without building an environment: a LIBERO env
    takes 10-20 s to build, and the workers build their own (and check the width again)."""
    suite = run_suite(run)
    if suite.name != DEFAULT_SUITE:
        if action_dim != suite.action_space.dim:
            raise ValueError(
                f"{run['candidate']} acts in {action_dim} dimensions, the {suite.name} suite in "
                f"{suite.action_space.dim} ({', '.join(suite.action_space.names)})"
            )
        return
    task = run["tasks"][0]
    env = suite.make_env(
        task, image_size=run["image_size"], camera=run["camera"], max_steps=run["max_steps"][task]
    )
    try:
        env_dim = int(env.action_space.shape[0])
    finally:
        env.close()
    if action_dim != env_dim:
        raise ValueError(
            f"{run['candidate']} acts in {action_dim} dimensions, the {task} environment in {env_dim}"
        )


def _run_config(run: dict[str, Any], execution: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the policies once in the parent, resolve what to render and check everything a worker would,
    so a bad request fails before the first write. Returns the whole config.json and the loaded policies
    by role (the parent runs episodes with them; an equal reference spec is not loaded twice here)."""
    cand_policy = _load(run["candidate"])
    ref_policy = None
    if run["reference"] is not None:
        ref_policy = cand_policy if run["reference"] == run["candidate"] else _load(run["reference"])
    if ref_policy is not None and cand_policy.action_space != ref_policy.action_space:
        raise ValueError(
            f"candidate and reference have different action spaces: {cand_policy.action_space.to_dict()} vs "
            f"{ref_policy.action_space.to_dict()}"
        )
    # One digest per loaded model (hashing the weights is most of what info() costs).
    cand_info = cand_policy.info()
    ref_info = None
    if ref_policy is not None:
        ref_info = cand_info if ref_policy is cand_policy else ref_policy.info()
    infos = [i for i in (cand_info, ref_info) if i is not None]
    suite = run_suite(run)
    suite.require()
    run["image_size"], run["camera"] = _observation_settings(infos, run["image_size"], run["camera"], suite)
    _warn_on_scene_mismatch(infos, run["scene_version"])
    _check_environment(run, cand_policy.action_space.dim)
    policies = {"candidate": cand_policy}
    if ref_policy is not None and ref_policy is not cand_policy:
        policies["reference"] = ref_policy
    config = {
        "format": store.RUN_FORMAT,
        "format_version": store.RUN_FORMAT_VERSION,
        store.DIGEST_CONFIG_KEY: store.ARRAYS_DIGEST,  # every record carries its arrays' digest
        "run": run,
        "candidate": _describe(cand_policy, cand_info, run["candidate"]),
        "reference": _describe(ref_policy, ref_info, run["reference"]) if ref_policy is not None else None,
        "execution": execution,
        "provenance": {
            "versions": _versions(),
            "git_commit": _git("rev-parse", "HEAD") or None,
            "git_dirty": _git_dirty(),
            "platform": platform.platform(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
    }
    return config, policies


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What must match for a resume: the run settings and what the models resolved to (digests included)."""
    ident = {**config["run"], "candidate_model": config["candidate"], "reference_model": config["reference"]}
    if "suite" not in ident:  # written before suites existed: a Meta-World run
        meta = get_suite(DEFAULT_SUITE)
        ident.update(suite=meta.name, suite_version=meta.version)
    return json.loads(json.dumps(ident))  # compare in JSON form (tuples become lists, as on disk)


def _open_run_dir(out: Path, config: dict[str, Any], resume: bool) -> store.RunLock:
    """Lock ``out`` and create a fresh run there, or check that it holds this very run when resuming.

    Returns the held lock: the caller is the run directory's only writer until it releases it.
    """
    if out.is_symlink():
        raise ValueError(f"{out}: the run directory is a symbolic link; pass the real path")
    if resume:
        store.check_no_symlinks(out)
        store.read_config(out)  # a clear error for a missing or non-daptq directory, before locking
        lock = store.RunLock(out).acquire()
        try:
            _check_resumable(out, config)
        except BaseException:
            lock.release()
            raise
        return lock
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock = store.RunLock(out).acquire()
    try:
        if any(p.name != store.LOCK_NAME for p in out.iterdir()):
            hint = (
                " (it holds a daptq run: pass resume=True / --resume)"
                if (out / store.CONFIG_NAME).exists()
                else ""
            )
            raise ValueError(f"{out}: output directory is not empty{hint}; choose a new directory")
        store.atomic_write_json(out / store.CONFIG_NAME, config)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_resumable(out: Path, config: dict[str, Any]) -> None:
    existing = store.read_config(out)
    old, new = _identity(existing), _identity(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        stored = {k: old.get(k) for k in diff}
        requested = {k: new.get(k) for k in diff}
        raise ValueError(
            f"{out}: cannot resume, the run stored there differs from the requested one in: "
            f"{', '.join(diff)} (stored: {stored}, requested: {requested})"
        )
    if existing["provenance"]["versions"] != config["provenance"]["versions"]:
        warnings.warn(
            f"{out}: resuming with different package versions than the run started with", stacklevel=4
        )
    # Trajectories depend (in the last bits) on how episodes were spread over processes: record every session.
    sessions = [*existing.get("resumed", []), {**config["execution"], "at": config["provenance"]["created"]}]
    store.atomic_write_json(out / store.CONFIG_NAME, {**existing, "resumed": sessions})


def _finished_episodes(out: Path, log: store.EpisodeLog, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The usable records of a run: a record that is malformed or invalid (a NaN, a negative count), whose
    arrays are missing, damaged or another episode's, or whose metrics disagree with its arrays is dropped
    from the log (and its episode runs again); episodes outside the run or twice are an error."""
    config = store.read_config(out)
    records = log.read(repair=True)
    keep, damaged, seen = [], [], set()
    first, last = run["seed_start"], run["seed_start"] + run["episodes"]
    for i, r in enumerate(records):
        problem = store.record_problem(r, run["reference"] is not None)
        if problem is None:
            key = (r["task"], r["seed"])
            if r["task"] not in run["tasks"] or not first <= r["seed"] < last:
                raise ValueError(
                    f"{out}/{store.EPISODES_NAME}: line {i + 1} is an episode outside this run {key}"
                )
            if key in seen:
                raise ValueError(f"{out}/{store.EPISODES_NAME}: line {i + 1} repeats episode {key}")
            problem = store.episode_problem(out, {**config, "run": run}, r)
            seen.add(key)
        if problem is None:
            keep.append(r)
        else:
            damaged.append(f"{store.describe(r, i + 1)}: {problem}")
    if damaged:
        warnings.warn(
            f"{out}: {len(damaged)} damaged episode record(s) dropped and re-run: {'; '.join(damaged[:5])}",
            stacklevel=3,
        )
        log.rewrite(keep)
    return keep


def _pending_jobs(run: dict[str, Any], done: set[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    """The (task, seed) pairs still to run, generated lazily: a huge run never holds all its jobs."""
    for task in run["tasks"]:
        for seed in range(run["seed_start"], run["seed_start"] + run["episodes"]):
            if (task, seed) not in done:
                yield task, seed


# -------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    candidate: str,
    reference: str | None = None,
    tasks: Sequence[str] | str | None = None,
    episodes: int = 10,
    seed_start: int | None = None,
    workers: int = 1,
    out: str | Path = "runs/eval",
    resume: bool = False,
    max_steps: int | None = None,
    *,
    image_size: int | None = None,
    camera: str | None = None,
    divergence_threshold: float = DEFAULT_DIVERGENCE_THRESHOLD_M,
    hf_cutoff: float = DEFAULT_HF_CUTOFF,
    progress: bool = True,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    reference_cache: str | os.PathLike | None = None,
    reseed_floor: bool = True,
    envs_per_worker: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    suite: str = DEFAULT_SUITE,
) -> dict[str, Any]:
    """Evaluate ``candidate`` on ``episodes`` seeds per task; paired against ``reference`` when one is given.

    Seeds are ``seed_start .. seed_start + episodes - 1`` for every task (default start: the "eval" split).
    Results go to ``out`` (config.json, episodes.jsonl, episodes/*.npz, summary.json); ``resume=True``
    continues a run in ``out`` whose config (models' digests included) matches. ``on_episode(record)`` is
    called after each episode is committed to disk (a progress hook; tests raise from it to simulate an
    interruption). Returns the summary. ``image_size`` / ``camera`` default to what the policies declare
    (``Policy.info()``), else 96 px and "corner3"; a value that contradicts a declaration raises ValueError.
    ``reference_cache`` is a directory of cached reference rollouts (``daptq.eval.cache``; None: no cache,
    the CLI defaults to ``default_cache_dir()``). ``reseed_floor`` pairs the reference with itself re-sampled
    (noise seed + ``FLOOR_SEED_OFFSET``) in every paired episode: the drift that sampling noise alone makes.
    ``envs_per_worker`` N > 1 steps N environments per worker in lockstep with one batched policy call per
    step (fixed N batch slots; a worker takes ``group_size(N)`` episodes at a time and refills an env whose
    episode ended with the next seed); N = 1 is the one-env rollout. ``backend`` "local" runs
    ``workers`` processes, this one included (the others start while this one validates); "ray" runs
    ``workers`` Ray actors (``daptq.eval.ray_backend``; ``ray_address`` joins an existing cluster); either
    way this process is the run directory's only writer. ``suite`` names the benchmark (a registered
    ``daptq.envs.suite`` suite: "metaworld", "libero", or one registered in this process, which then runs
    in this process only: ``workers=1``).
    Everything is validated before the first write; the run directory is locked while this call writes it.
    """
    workers = _check_int("workers", workers, 1)
    envs_per_worker = _check_int("envs_per_worker", envs_per_worker, 1)
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    if ray_address is not None and backend != "ray":
        raise ValueError("ray_address needs backend='ray'")
    if backend == "ray":
        from daptq.eval.ray_backend import _import_ray

        _import_ray()  # a clear error before anything is written
    run = _run_spec(
        candidate, reference, tasks, episodes, seed_start, max_steps, image_size, camera,
        divergence_threshold, hf_cutoff, reseed_floor, suite,
    )  # fmt: skip
    if not is_builtin(run["suite"]) and (workers > 1 or backend == "ray"):
        raise ValueError(
            f"suite {run['suite']!r} is registered in this process only (not a built-in suite), so worker "
            "processes cannot build its environments; run it with workers=1 and the local backend"
        )
    if reference_cache is not None and Path(reference_cache).exists() and not Path(reference_cache).is_dir():
        raise ValueError(f"reference_cache {reference_cache}: exists and is not a directory")
    set_process_defaults()
    execution = {
        "backend": backend,
        "ray_address": ray_address,
        "workers": workers,
        "envs_per_worker": envs_per_worker,
        "reference_cache": None if reference_cache is None else str(Path(reference_cache).resolve()),
    }
    with contextlib.ExitStack() as stack:
        pool = None
        groups = len(run["tasks"]) * -(-run["episodes"] // group_size(envs_per_worker))
        processes = min(workers, groups) - 1  # this process is a worker too
        if backend == "local" and processes > 0:
            # Started now, so the workers load their policies while this process validates the request.
            specs = {"candidate": run["candidate"]}
            if run["reference"] is not None:
                specs["reference"] = run["reference"]
            pool = stack.enter_context(
                LocalPool(
                    mp.get_context("spawn"),
                    processes,
                    initializer=_init_worker,
                    initargs=(specs, run["suite"]),
                )
            )  # leaving the with-block (normally or by an exception) terminates the workers
        config, policies = _run_config(run, execution)
        context = {**execution}
        if config["reference"] is not None:
            context["cache_key"] = base_key(run, config["reference"], batch_slots=envs_per_worker)
        out = Path(out)
        lock = _open_run_dir(out, config, resume)
        try:
            return _run_and_summarize(out, run, context, progress, on_episode, policies, pool)
        finally:
            lock.release()


def _run_and_summarize(
    out: Path,
    run: dict[str, Any],
    context: dict[str, Any],
    progress: bool,
    on_episode: Callable[[dict[str, Any]], None] | None,
    policies: Mapping[str, Any],
    pool: LocalPool | None = None,
) -> dict[str, Any]:
    """Run the episodes ``out`` lacks, committing each as it finishes, then write summary.json."""
    log = store.EpisodeLog(out / store.EPISODES_NAME)
    records = _finished_episodes(out, log, run)
    total = len(run["tasks"]) * run["episodes"]
    paired = run["reference"] is not None
    done = {(r["task"], r["seed"]) for r in records}
    pending = _pending_jobs(run, done)
    left = {t: run["episodes"] - sum(d[0] == t for d in done) for t in run["tasks"]}
    jobs = _groups(pending, group_size(context["envs_per_worker"]), left)
    bar = tqdm(
        total=total, initial=len(records), desc="eval", unit="ep", disable=not progress, dynamic_ncols=True
    )
    results = _results(run, context, jobs, total - len(records), policies, pool)
    try:
        for record, arrays in results:
            digest = store.save_arrays(out, record["task"], record["seed"], arrays)
            record = {**record, store.DIGEST_KEY: digest}  # binds the file to this record
            log.append(record)
            records.append(record)
            bar.update(1)
            bar.set_postfix_str(_running_rates(records, paired), refresh=False)
            if on_episode is not None:
                on_episode(record)
    finally:
        results.close()  # stops the worker pool now, also when on_episode raised
        bar.close()
    summary = summarize(records, paired=paired, tasks=run["tasks"])
    summary["complete"] = len(records) == total
    summary["run"] = run
    store.atomic_write_json(out / store.SUMMARY_NAME, summary)
    return summary


def _running_rates(records: list[dict[str, Any]], paired: bool) -> str:
    n = len(records)
    text = f"succ={sum(r['success'] for r in records) / n:.0%}"
    if paired:
        text += f" ref={sum(r['ref_success'] for r in records) / n:.0%}"
    return text


def _groups(
    jobs: Iterator[tuple[str, int]], size: int, left: Mapping[str, int]
) -> Iterator[list[tuple[str, int]]]:
    """Consecutive jobs of one task in the fewest groups of at most ``size`` (a worker's batch of
    environments), of near-equal sizes (``left[task]`` jobs of the task are pending): 24 jobs at size 16
    make 12 + 12, not 16 + 8, so no group runs its envs half empty and the workers end together."""
    left = dict(left)
    group: list[tuple[str, int]] = []
    target = 0
    for job in jobs:
        if group and (len(group) == target or job[0] != group[0][0]):
            yield group
            group = []
        if not group:
            remaining = max(left[job[0]], 1)
            target = -(-remaining // -(-remaining // size))  # ceil(remaining / groups still to make)
        group.append(job)
        left[job[0]] -= 1
    if group:
        yield group


def _results(
    run: dict[str, Any],
    context: dict[str, Any],
    groups: Iterator[list[tuple[str, int]]],
    pending: int,
    policies: Mapping[str, Any],
    pool: LocalPool | None = None,
):
    """Yield (record, arrays) per episode as they finish: in this process alone, with the processes of
    ``pool`` besides (each holds one group at a time and is handed the next the moment it finishes, so
    none waits while this process runs a group of its own; a worker that dies has its groups re-run), or
    on Ray actors."""
    if pending <= 0:
        return
    workers = context["workers"]
    groups_needed = -(-pending // group_size(context["envs_per_worker"]))
    if context["backend"] == "ray":
        from daptq.eval.ray_backend import ray_results

        yield from ray_results(run, context, groups, min(workers, groups_needed), context["ray_address"])
        return
    if pool is not None and groups_needed == 1:
        pool.close()  # started for the whole run; what a resume left is one group, for this process alone
        pool = None
    runner = EpisodeRunner(run, context, policies)
    try:
        if pool is None:
            for group in groups:
                yield from runner(group)
        else:
            yield from pool_results(pool, _run_job, (run, context), groups, runner)
    finally:
        runner.close()
