"""The Ray backend of the evaluation runner (``daptq eval ... --backend ray [--ray-address ADDR]``).

Each worker is a Ray actor holding one ``EpisodeRunner`` (policies and envs built once); groups of episodes
are submitted to the actors, at most two per actor at a time, and their results come back to the parent,
which stays the single writer of the run directory (so resume, dedup and crash safety are those of the local
pool). An actor that dies (its node lost, its process killed) has its unfinished groups re-submitted to a
fresh actor: a group's results are committed only when they arrive, so nothing is lost or counted twice.

Ray is an optional extra (``pip install daptq[ray]``). With no address and no running Ray session, a local
Ray instance is started for the run; ``address`` ("auto", "ray://host:10001", "host:6379") joins an
existing cluster, whose nodes must have daptq installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from daptq.eval.local_pool import MAX_RESTARTS_PER_WORKER

_WORKER_PIDS: list[int] = []  # the actors' process ids, newest last (diagnostics, and tests kill one)


def worker_pids() -> list[int]:
    """Process ids of the Ray actors started by the current run (a killed one stays listed)."""
    return list(_WORKER_PIDS)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--backend ray needs Ray: pip install 'daptq[ray]'") from exc
    return ray


class _Actor:
    """A Ray actor: one EpisodeRunner, built once, running groups of episodes."""

    def __init__(self, run: dict[str, Any], context: dict[str, Any]) -> None:
        from daptq.eval.runner import EpisodeRunner, set_process_defaults

        set_process_defaults()
        import torch

        torch.set_num_threads(1)
        self.runner = EpisodeRunner(run, context)

    def pid(self) -> int:
        return os.getpid()

    def run(self, group: list[tuple[str, int]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return self.runner(group)


def ray_results(
    run: dict[str, Any],
    context: dict[str, Any],
    groups: Iterator[list[tuple[str, int]]],
    workers: int,
    address: str | None = None,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (record, arrays) per episode as Ray actors finish their groups."""
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray's usage stats report opens a socket
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started_here = True
    actor_cls = ray.remote(num_cpus=1)(_Actor)
    _WORKER_PIDS.clear()
    actors: list[Any] = []
    in_flight: dict[Any, tuple[int, list[tuple[str, int]]]] = {}  # object ref -> (actor index, group)
    restarts = 0

    def start(index: int) -> Any:
        actor = actor_cls.remote(run, context)
        _WORKER_PIDS.append(ray.get(actor.pid.remote()))
        if index < len(actors):
            actors[index] = actor
        else:
            actors.append(actor)
        return actor

    def submit(index: int, group: list[tuple[str, int]]) -> None:
        in_flight[actors[index].run.remote(group)] = (index, group)

    try:
        for i in range(workers):
            start(i)
        pending: list[list[tuple[str, int]]] = []  # groups of a dead actor, to re-submit first
        exhausted = False
        while True:
            for i in range(len(actors)):
                while sum(1 for a, _ in in_flight.values() if a == i) < 2:
                    group = pending.pop() if pending else (None if exhausted else next(groups, None))
                    if group is None:
                        exhausted = True
                        break
                    submit(i, group)
            if not in_flight:
                return
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, group = in_flight.pop(ref)
            try:
                results = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                restarts += 1
                if restarts > MAX_RESTARTS_PER_WORKER * workers:
                    raise RuntimeError(f"Ray evaluation workers died {restarts} times; giving up") from None
                # Every group the dead actor held is re-run (its results never reached the parent).
                lost = [group] + [g for r, (a, g) in list(in_flight.items()) if a == index]
                for r in [r for r, (a, _) in in_flight.items() if a == index]:
                    del in_flight[r]
                pending.extend(lost)
                start(index)
                continue
            yield from results
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
