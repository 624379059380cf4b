"""The local backend's scheduling: the parent is one of the workers, the pool starts while the parent
validates, workers share each task's seeds as they go (leases), and Ray's groups are balanced per task."""

import gc
import multiprocessing as mp
import multiprocessing.pool
import time

import numpy as np
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
    run_lease = runner_module.EpisodeRunner.run_lease

    def counted(self, lease, streams):  # patched in this process only: spawned workers run the original
        if not in_parent:  # the toy's episodes are quick: wait until the spawned worker has taken a seed
            deadline = time.monotonic() + 120
            while sum(streams.counters[:]) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        out = run_lease(self, lease, streams)
        in_parent.extend((r["task"], r["seed"]) for r, _ in out)
        return out

    monkeypatch.setattr(runner_module.EpisodeRunner, "run_lease", counted)
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
    assert not any(type(o) is multiprocessing.pool.Pool for o in gc.get_objects())
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
def test_runners_sharing_a_lease_take_each_pending_seed_once_and_run_it_as_a_group_would():
    from daptq.eval.runner import EpisodeRunner, Lease, Streams, _run_spec

    run = _run_spec("toy:weight_noise=0.2", "toy", ["reach"], 10, 0, 12, 16, "corner3", 0.05, 0.25, False)
    execution = {"envs_per_worker": 2}  # a lease takes up to group_size(2) = 8 seeds
    streams = Streams(mp.get_context("spawn").Array("q", 1))
    counters = streams.counters
    lease = Lease("reach", 0, first=0, count=10, done=(3,))  # seed 3 finished in an earlier session
    assert lease.left(0) == 9
    a, b = EpisodeRunner(run, execution), EpisodeRunner(run, execution)
    first, second = a.run_lease(lease, streams), b.run_lease(lease, streams)
    assert [r["seed"] for r, _ in first] == [0, 1, 2, 4, 5, 6, 7, 8]
    assert [r["seed"] for r, _ in second] == [9]
    assert a.run_lease(lease, streams) == [] and lease.left(counters[0]) == 0 and lease.take(counters) is None
    static = EpisodeRunner(run, execution)
    groups = static([("reach", s) for s in (0, 1, 2, 4, 5, 6, 7, 8)]) + static([("reach", 9)])
    for (got, got_arrays), (want, want_arrays) in zip(first + second, groups, strict=True):
        assert {k: v for k, v in got.items() if k != "wall_s"} == {
            k: v for k, v in want.items() if k != "wall_s"
        }
        for key, value in want_arrays.items():
            np.testing.assert_array_equal(got_arrays[key], value)
    for runner in (a, b, static):
        runner.close()
