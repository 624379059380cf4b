"""The local backend's pool (``daptq.eval.local_pool``): every group comes back once, from the pool or this
process; a worker that dies has its groups re-run on a fresh pool; one that keeps dying ends the run with a
clear error instead of a hang."""

import multiprocessing as mp
import os
import signal
import time

import pytest

from daptq.eval.local_pool import MAX_RESTARTS_PER_WORKER, LocalPool, pool_results

CTX = mp.get_context("spawn")


def _square(job: int) -> list[int]:
    return [job * job]


def _sleep(seconds: int) -> list[int]:
    time.sleep(seconds)
    return [seconds]


def _die_on_first_try(marker_dir: str, job: int) -> list[int]:
    """Kill this worker the first time a job is seen (a marker file remembers it), then succeed."""
    marker = os.path.join(marker_dir, str(job))
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return [job]


def test_every_group_comes_back_once_from_the_pool_or_this_process():
    local: list[int] = []

    def here(job):  # slower than a worker's job, so the feeder thread is sure to hand some to the pool
        time.sleep(0.02)
        local.append(job)
        return [job * job]

    with LocalPool(CTX, 2) as pool:
        out = list(pool_results(pool, _square, (), iter(range(20)), here))
    assert sorted(out) == [j * j for j in range(20)]
    assert 0 < len(local) < 20  # both did part of the work
    assert not mp.active_children()


def test_the_groups_of_a_dead_worker_are_rerun_on_a_fresh_pool(tmp_path):
    with LocalPool(CTX, 1) as pool:
        out = list(pool_results(pool, _die_on_first_try, (str(tmp_path),), iter(range(3))))
        assert pool.restarts == 3  # one death per job, each job then run again
    assert sorted(out) == [0, 1, 2]  # none lost, none twice
    assert not mp.active_children()


def test_a_worker_that_keeps_dying_ends_the_run_with_an_error():
    with LocalPool(CTX, 1) as pool, pytest.raises(RuntimeError, match="died .* times; giving up"):
        list(pool_results(pool, os._exit, (), iter([3])))
    assert pool.restarts == MAX_RESTARTS_PER_WORKER + 1
    assert not mp.active_children()


def test_an_error_in_a_group_is_raised_in_the_caller():
    with LocalPool(CTX, 1) as pool, pytest.raises(TypeError):
        list(pool_results(pool, _square, (), iter(["x"])))
    assert not mp.active_children()


def test_leaving_early_stops_a_worker_mid_group():
    with LocalPool(CTX, 2) as pool:
        results = pool_results(pool, _sleep, (), iter([0, 60]))
        assert next(results) == 0
        workers = mp.active_children()
        results.close()  # the caller stops reading (an error, an interrupt): the 60 s group is cut short
        assert workers and all(w.exitcode == -signal.SIGTERM for w in workers)  # killed, not finished
        assert not mp.active_children()
        with pytest.raises(RuntimeError, match="closed"):
            pool.restart()
