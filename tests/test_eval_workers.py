"""The local backend's scheduling: the parent is one of the workers, the pool starts while the parent
validates, groups are balanced per task, and a worker killed mid-run has its groups re-run."""

import gc
import multiprocessing as mp
import os
import signal
from concurrent.futures import ProcessPoolExecutor

import pytest

from daptq.eval import evaluate, store
from daptq.eval import runner as runner_module
from daptq.eval.runner import _groups

FAST = {"max_steps": 12, "image_size": 16, "progress": False}


def _sizes(pending: dict[str, int], size: int) -> list[tuple[str, int]]:
    jobs = [(task, seed) for task, n in pending.items() for seed in range(n)]
    return [(g[0][0], len(g)) for g in _groups(iter(jobs), size, pending)]


def test_groups_are_the_fewest_of_near_equal_size_per_task():
    assert _sizes({"reach": 24, "push": 24}, 16) == [("reach", 12)] * 2 + [("push", 12)] * 2
    assert _sizes({"reach": 50}, 16) == [("reach", 13), ("reach", 13), ("reach", 12), ("reach", 12)]
    assert _sizes({"reach": 2, "push": 16}, 16) == [("reach", 2), ("push", 16)]
    assert _sizes({"reach": 3}, 1) == [("reach", 1)] * 3
    groups = list(_groups(iter([("reach", s) for s in range(33)]), 32, {"reach": 33}))
    assert [len(g) for g in groups] == [17, 16]
    assert [job for g in groups for job in g] == [("reach", s) for s in range(33)]  # order kept, none lost


@pytest.mark.slow
def test_two_workers_are_the_parent_and_one_process_each_episode_once(tmp_path, monkeypatch):
    in_parent: list[tuple[str, int]] = []
    children: set[int] = set()
    call = runner_module.EpisodeRunner.__call__

    def counted(self, jobs):  # patched in this process only: spawned workers run the original
        in_parent.extend(jobs)
        return call(self, jobs)

    monkeypatch.setattr(runner_module.EpisodeRunner, "__call__", counted)
    seen = []

    def on_episode(record):
        seen.append((record["task"], record["seed"]))
        children.update(p.pid for p in mp.active_children())

    kwargs = {"tasks": ["reach", "push"], "episodes": 3, **FAST}
    both = evaluate(
        "toy:weight_noise=0.2", "toy", workers=2, out=tmp_path / "two", on_episode=on_episode, **kwargs
    )
    assert both["complete"] and len(seen) == 6 == len(set(seen))
    assert len(children) == 1  # two workers: this process and one spawned
    # The pool is freed when the run ends, not at the next garbage collection (a cycle would keep its named
    # semaphores until then, and an interpreter exiting first warns of "leaked semaphore objects").
    assert not any(type(o) is ProcessPoolExecutor for o in gc.get_objects())
    assert 0 < len(in_parent) < 6  # both did part of the work
    alone = evaluate("toy:weight_noise=0.2", "toy", workers=1, out=tmp_path / "one", **kwargs)
    assert both["overall"] == alone["overall"]

    def outcomes(run):
        return {(r["task"], r["seed"]): (r["success"], r["drift_max"]) for r in store.read_records(run)}

    assert outcomes(tmp_path / "two") == outcomes(tmp_path / "one")  # bitwise: one thread in every process
    assert not mp.active_children()


@pytest.mark.slow
def test_a_bad_model_found_while_the_pool_starts_stops_it_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    # The spec is only loaded (in the parent and in the already started workers) after the cheap checks.
    with pytest.raises(ValueError, match="bad item 'bogus=1'"):
        evaluate("toy:bogus=1", "toy", tasks=["reach"], episodes=4, workers=3, out=out, **FAST)
    assert not out.exists()
    assert not mp.active_children()


@pytest.mark.slow
def test_a_killed_worker_has_its_episodes_rerun_none_lost_none_twice(tmp_path):
    kwargs = {"tasks": ["reach", "push"], "episodes": 4, **FAST}
    killed: list[int] = []
    children: set[int] = set()

    def kill_the_worker(record):
        # The first episode is the parent's own (the spawned worker is still starting), so the worker
        # holds a group when it is killed.
        if not killed:
            killed.extend(p.pid for p in mp.active_children())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        children.update(p.pid for p in mp.active_children())

    summary = evaluate(
        "toy:weight_noise=0.2", "toy", workers=2, out=tmp_path / "two", on_episode=kill_the_worker, **kwargs
    )
    assert len(killed) == 1 and summary["complete"] and summary["episodes"] == 8
    assert children - set(killed)  # a fresh worker took over
    lines = (tmp_path / "two" / store.EPISODES_NAME).read_bytes().splitlines()
    assert len(lines) == 8  # none duplicated, none lost
    alone = evaluate("toy:weight_noise=0.2", "toy", workers=1, out=tmp_path / "one", **kwargs)

    def outcomes(run):
        return {(r["task"], r["seed"]): (r["success"], r["drift_max"]) for r in store.read_records(run)}

    assert outcomes(tmp_path / "two") == outcomes(tmp_path / "one")
    assert summary["overall"] == alone["overall"]
    assert not mp.active_children()


@pytest.mark.slow
def test_a_resume_with_one_group_left_runs_it_in_this_process(tmp_path, monkeypatch):
    kwargs = {"tasks": ["reach"], "episodes": 3, **FAST}
    out = tmp_path / "run"

    def stop_after_two(record):
        if len(store.read_records(out)) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate("toy:weight_noise=0.2", "toy", out=out, on_episode=stop_after_two, **kwargs)
    in_parent: list[tuple[str, int]] = []
    call = runner_module.EpisodeRunner.__call__

    def counted(self, jobs):
        in_parent.extend(jobs)
        return call(self, jobs)

    monkeypatch.setattr(runner_module.EpisodeRunner, "__call__", counted)
    summary = evaluate("toy:weight_noise=0.2", "toy", workers=3, out=out, resume=True, **kwargs)
    left = {("reach", s) for s in range(summary["run"]["seed_start"], summary["run"]["seed_start"] + 3)}
    left -= {(r["task"], r["seed"]) for r in store.read_records(out)[:2]}
    assert summary["complete"] and in_parent == sorted(left)  # the spawned workers were stopped unused
    assert not mp.active_children()
