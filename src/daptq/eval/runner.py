"""The resumable evaluation runner behind ``daptq eval``.

Workers (a spawn-context pool) rebuild env + policies from spec strings once and run many episodes; the parent
is the single writer of the run directory (see ``daptq.eval.store`` for why a crash never loses or duplicates
an episode). With ``workers=1`` episodes run in the parent process, which is simpler to debug and avoids the
start-up cost of a process.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from daptq.eval import store
from daptq.eval.metrics import DEFAULT_DIVERGENCE_THRESHOLD_M, DEFAULT_HF_CUTOFF
from daptq.eval.rollout import episode_record, run_episode
from daptq.eval.summary import summarize

_VERSIONED_PACKAGES = ("daptq", "torch", "torchao", "numpy", "metaworld", "mujoco", "gymnasium", "scipy")


# ----------------------------------------------------------------------------------------------- episodes


class EpisodeRunner:
    """Builds the policies once and the current task's env on first use; runs one (paired) episode per call.

    Jobs arrive task by task, so only one env is kept: switching task closes the previous one (each env holds
    a renderer context, and ten of them per worker would be wasted memory).
    """

    def __init__(self, run: dict[str, Any]) -> None:
        from daptq.models.registry import load_policy

        self.run = run
        self.candidate = load_policy(run["candidate"])
        self.reference = self.shadow = None
        if run["reference"] is not None:
            self.reference = load_policy(run["reference"])
            self.shadow = load_policy(run["reference"])
        self._task: str | None = None
        self._env: Any = None

    def env(self, task: str) -> Any:
        if task != self._task:
            from daptq.envs import make_env

            self.close()
            self._env = make_env(
                task,
                image_size=self.run["image_size"],
                camera=self.run["camera"],
                max_steps=self.run["max_steps"][task],
            )
            self._task = task
            env_dim = int(self._env.action_space.shape[0])
            if self.candidate.action_space.dim != env_dim:
                raise ValueError(
                    f"{self.run['candidate']} acts in {self.candidate.action_space.dim} dimensions, "
                    f"the {task} environment in {env_dim}"
                )
        return self._env

    def __call__(self, job: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        task, seed = job
        env = self.env(task)
        start = time.perf_counter()
        cand = run_episode(env, self.candidate, seed, shadow=self.shadow)
        ref = run_episode(env, self.reference, seed) if self.reference is not None else None
        record, arrays = episode_record(
            task, seed, cand, ref, self.run["divergence_threshold"], self.run["hf_cutoff"]
        )
        record["env_steps"] = cand.steps + (ref.steps if ref is not None else 0)
        record["wall_s"] = time.perf_counter() - start  # episodes only, env construction excluded
        return record, arrays

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._task = None, None


_WORKER: EpisodeRunner | None = None
_WORKER_INIT_ERROR: BaseException | None = None


def _init_worker(run: dict[str, Any]) -> None:
    global _WORKER, _WORKER_INIT_ERROR
    import torch

    torch.set_num_threads(1)  # one core per worker; several workers share the machine
    try:
        _WORKER = EpisodeRunner(run)
    except (
        Exception
    ) as exc:  # re-raised from _run_job: a Pool would respawn a worker whose init raised, forever
        _WORKER_INIT_ERROR = exc


def _run_job(job: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    if _WORKER is None:
        raise RuntimeError(
            f"evaluation worker failed to start: {_WORKER_INIT_ERROR!r}"
        ) from _WORKER_INIT_ERROR
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
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        digests[path.relative_to(root).as_posix()] = h.hexdigest()
    return digests


def _describe(policy: Any, spec: str) -> dict[str, Any]:
    return {
        "action_space": policy.action_space.to_dict(),
        "recipe": _jsonable(getattr(policy, "recipe", None)),
        "files_sha256": _file_digests(spec),
    }


def _run_spec(
    candidate: str,
    reference: str | None,
    tasks: Sequence[str] | None,
    episodes: int,
    seed_start: int | None,
    max_steps: int | None,
    image_size: int,
    camera: str,
    divergence_threshold: float,
    hf_cutoff: float,
) -> dict[str, Any]:
    """Validate the request and resolve its defaults: the identity of a run (what --resume must match)."""
    from daptq.envs import DEFAULT_MAX_STEPS, MT10, SCENE_VERSION, SEED_SPLITS, check_tasks

    if not isinstance(candidate, str) or not candidate:
        raise ValueError(f"candidate must be a model spec string, got {candidate!r}")
    if reference is not None and (not isinstance(reference, str) or not reference):
        raise ValueError(f"reference must be a model spec string or None, got {reference!r}")
    tasks = check_tasks(MT10 if tasks is None else ([tasks] if isinstance(tasks, str) else tasks))
    if not isinstance(episodes, int) or episodes <= 0:
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}")
    seed_start = SEED_SPLITS["eval"] if seed_start is None else int(seed_start)
    if seed_start < 0:
        raise ValueError(f"seed_start must be >= 0, got {seed_start}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if divergence_threshold <= 0:
        raise ValueError(f"divergence_threshold must be positive (metres), got {divergence_threshold}")
    if not 0 < hf_cutoff <= 0.5:
        raise ValueError(f"hf_cutoff must be in (0, 0.5] cycles/step, got {hf_cutoff}")
    return {
        "candidate": candidate,
        "reference": reference,
        "tasks": tasks,
        "episodes": episodes,
        "seed_start": seed_start,
        "max_steps": {t: int(max_steps or DEFAULT_MAX_STEPS[t]) for t in tasks},
        "image_size": image_size,
        "camera": camera,
        "divergence_threshold": float(divergence_threshold),
        "hf_cutoff": float(hf_cutoff),
        "scene_version": SCENE_VERSION,
    }


def _warn_on_scene_mismatch(policies: list[Any], scene_version: int) -> None:
    """A policy trained on images of another scene version sees an unfamiliar scene: say so."""
    for p in policies:
        trained_on = getattr(p, "scene_version", None)  # None for policies that do not record it
        if trained_on is not None and trained_on != scene_version:
            warnings.warn(
                f"a policy was trained on scene version {trained_on}, but the environments render scene "
                f"version {scene_version}; its success rates will not match its training",
                stacklevel=3,
            )


def _observation_settings(policies: list[Any], image_size: int | None, camera: str | None) -> tuple[int, str]:
    """Render what the policies were trained on: their declared ``image_size`` / ``camera``, else defaults."""
    resolved: dict[str, Any] = {"image_size": image_size, "camera": camera}
    for name, default in (("image_size", 96), ("camera", "corner3")):
        declared = {
            getattr(p, name) for p in policies if p is not None and getattr(p, name, None) is not None
        }
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


def _prepare_run_dir(out: Path, config: dict[str, Any], resume: bool) -> None:
    """Create a fresh run directory, or check that ``out`` holds this very run when resuming."""
    if resume:
        existing = store.read_config(out)  # raises for a missing or non-daptq directory
        # The run settings and what the model specs resolved to (a re-quantized directory keeps its path).
        old = {
            **existing["run"],
            "candidate_model": existing["candidate"],
            "reference_model": existing["reference"],
        }
        new = {
            **config["run"],
            "candidate_model": config["candidate"],
            "reference_model": config["reference"],
        }
        new = json.loads(json.dumps(new))  # compare in JSON form (tuples become lists, as on disk)
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
                f"{out}: resuming with different package versions than the run started with", stacklevel=3
            )
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        hint = (
            " (it holds a daptq run: pass resume=True / --resume)"
            if (out / store.CONFIG_NAME).exists()
            else ""
        )
        raise ValueError(f"{out}: output directory is not empty{hint}; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(out / store.CONFIG_NAME, config)


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
) -> dict[str, Any]:
    """Evaluate ``candidate`` on ``episodes`` seeds per task; paired against ``reference`` when one is given.

    Seeds are ``seed_start .. seed_start + episodes - 1`` for every task (default start: the "eval" split).
    Results go to ``out`` (config.json, episodes.jsonl, episodes/*.npz, summary.json); ``resume=True``
    continues a run in ``out`` whose config matches. ``on_episode(record)`` is called after each episode is
    committed to disk (a progress hook; tests raise from it to simulate an interruption). Returns the summary.
    ``image_size`` / ``camera`` default to what the policies declare (attributes of the same names), else
    96 px and "corner3"; a value that contradicts a policy's declaration raises ValueError.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    run = _run_spec(
        candidate,
        reference,
        tasks,
        episodes,
        seed_start,
        max_steps,
        image_size,
        camera,
        divergence_threshold,
        hf_cutoff,
    )
    from daptq.models.registry import load_policy

    cand_policy = load_policy(candidate)  # fail fast in the parent: bad spec, incompatible action spaces
    ref_policy = load_policy(reference) if reference is not None else None
    if ref_policy is not None and cand_policy.action_space != ref_policy.action_space:
        raise ValueError(
            f"candidate and reference have different action spaces: {cand_policy.action_space.to_dict()} vs "
            f"{ref_policy.action_space.to_dict()}"
        )
    run["image_size"], run["camera"] = _observation_settings([cand_policy, ref_policy], image_size, camera)
    _warn_on_scene_mismatch([cand_policy, ref_policy], run["scene_version"])
    config = {
        "format": store.RUN_FORMAT,
        "format_version": store.RUN_FORMAT_VERSION,
        "run": run,
        "candidate": _describe(cand_policy, candidate),
        "reference": _describe(ref_policy, reference) if ref_policy is not None else None,
        "provenance": {
            "versions": _versions(),
            "git_commit": _git("rev-parse", "HEAD") or None,
            "git_dirty": _git_dirty(),
            "platform": platform.platform(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
    }
    del cand_policy, ref_policy
    out = Path(out)
    _prepare_run_dir(out, config, resume)
    log = store.EpisodeLog(out / store.EPISODES_NAME)
    records = log.read(repair=True)
    all_jobs = [(t, s) for t in run["tasks"] for s in range(run["seed_start"], run["seed_start"] + episodes)]
    done = {(r["task"], r["seed"]) for r in records}
    unknown = done - set(all_jobs)
    if unknown or len(done) != len(records):
        raise ValueError(
            f"{out}/{store.EPISODES_NAME}: holds episodes outside this run or duplicates "
            f"({len(records)} lines, {len(done)} distinct, outside: {sorted(unknown)[:5]})"
        )
    jobs = [j for j in all_jobs if j not in done]
    paired = reference is not None

    bar = tqdm(
        total=len(all_jobs),
        initial=len(done),
        desc="eval",
        unit="ep",
        disable=not progress,
        dynamic_ncols=True,
    )
    results = _results(run, jobs, workers)
    try:
        for record, arrays in results:
            store.atomic_save_npz(store.arrays_path(out, record["task"], record["seed"]), arrays)
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
    summary["complete"] = len(records) == len(all_jobs)
    summary["run"] = run
    store.atomic_write_json(out / store.SUMMARY_NAME, summary)
    return summary


def _running_rates(records: list[dict[str, Any]], paired: bool) -> str:
    n = len(records)
    text = f"succ={sum(r['success'] for r in records) / n:.0%}"
    if paired:
        text += f" ref={sum(r['ref_success'] for r in records) / n:.0%}"
    return text


def _results(run: dict[str, Any], jobs: list[tuple[str, int]], workers: int):
    """Yield (record, arrays) per job as episodes finish: in-process for one worker, else a spawn pool."""
    if not jobs:
        return
    if workers == 1:
        runner = EpisodeRunner(run)
        try:
            for job in jobs:
                yield runner(job)
        finally:
            runner.close()
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(run,)) as pool:
        # Leaving the with-block (normally or by an exception) terminates the workers.
        yield from pool.imap_unordered(_run_job, jobs, chunksize=1)
