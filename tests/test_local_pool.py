"""The local backend's pool (``daptq.eval.local_pool``): every group comes back once, from the pool or this
process; a worker that dies has its groups re-run on a fresh pool; one that keeps dying ends the run with a
clear error instead of a hang."""

import contextlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
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


# ------------------------------------------------------------------------ workers die with their parent

PARENT = """
import json, multiprocessing as mp, sys, time

if __name__ == "__main__":  # (a spawned worker runs this file's top level again: keep it light)
    from daptq.eval.local_pool import LocalPool

    pool = LocalPool(mp.get_context("spawn"), 2)
    for _ in range(2):
        pool.submit(time.sleep, 600)  # each worker blocks in a job, as in a long group
    print(json.dumps([p.pid for p in mp.active_children()]), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def _wait_gone(pids: list[int], timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout  # generous: only a worker that never dies fails
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):  # it may end in between
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_parent(tmp_path, sig):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = json.loads(parent.stdout.readline())
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        os.kill(parent.pid, sig)
        parent.wait(timeout=60)
        assert _wait_gone(workers) == []  # none left blocked on the dead parent's pipe
    finally:
        parent.kill()
        _kill_all(workers)


SLOW_TO_IMPORT = """
import os, time

if os.environ.get("DAPTQ_TEST_SLOW_IMPORT"):
    time.sleep(600)  # as a worker importing torch and loading its models on a busy machine


def init():
    pass
"""

PARENT_OF_SLOW = """
import json, multiprocessing as mp, os, time

if __name__ == "__main__":
    import slow_to_import  # here, not above: a spawned worker runs this file's top level again
    from daptq.eval.local_pool import LocalPool

    os.environ["DAPTQ_TEST_SLOW_IMPORT"] = "1"  # the workers, not this process, take long to import it
    pool = LocalPool(mp.get_context("spawn"), 2, initializer=slow_to_import.init)
    print(json.dumps([p.pid for p in mp.active_children()]), flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_still_importing_their_initializer_die_with_their_parent(tmp_path):
    (tmp_path / "slow_to_import.py").write_text(SLOW_TO_IMPORT)
    (tmp_path / "parent.py").write_text(PARENT_OF_SLOW)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    parent = subprocess.Popen(
        [sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True, env=env
    )
    workers: list[int] = []
    try:
        workers = json.loads(parent.stdout.readline())
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=60)
        assert _wait_gone(workers) == []  # not 600 s later, when the import ends
    finally:
        parent.kill()
        _kill_all(workers)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_eval_workers_die_when_the_eval_is_killed(tmp_path):
    out = tmp_path / "run"
    argv = ["eval", "toy", "--reference", "toy", "--tasks", "reach", "push", "--episodes", "40"]
    argv += ["--max-steps", "60", "--image-size", "16", "--workers", "2", "--no-progress", "--out", str(out)]
    code = "import sys; from daptq.cli import main; sys.exit(main(sys.argv[1:]))"
    parent = subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.DEVNULL)
    descendants: list[int] = []
    try:
        deadline = time.monotonic() + 300
        log = out / "episodes.jsonl"
        while not (log.exists() and log.read_bytes().count(b"\n") >= 2) and time.monotonic() < deadline:
            assert parent.poll() is None, "the evaluation ended before it could be killed"
            time.sleep(0.2)
        descendants = _children(parent.pid)
        assert descendants  # the spawned worker (and multiprocessing's resource tracker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=60)
        assert _wait_gone(descendants) == []
    finally:
        parent.kill()
        _kill_all(descendants)


# ------------------------------------------------------------------------------- no leaked semaphores

USES_TQDM = """
import multiprocessing as mp, sys, time


def init():  # as a worker loading a Hugging Face encoder does: a progress bar
    from tqdm.auto import tqdm

    for _ in tqdm(range(3), disable=False):
        pass


def job(seconds):
    time.sleep(seconds)
    return [seconds]


if __name__ == "__main__":
    from daptq.eval.local_pool import LocalPool, pool_results

    with LocalPool(mp.get_context("spawn"), 2, initializer=init) as pool:
        results = pool_results(pool, job, (), iter([float(s) for s in sys.argv[1:]]))
        print(next(results), flush=True)
        results.close()  # the rest (if any) is cut short: its worker is terminated mid-group
    print("closed", flush=True)
"""


@pytest.mark.parametrize("jobs", [["0", "0"], ["0", "60"]], ids=["finished", "cut-short"])
def test_a_pool_leaks_no_semaphore(tmp_path, jobs):
    script = tmp_path / "uses_tqdm.py"
    script.write_text(USES_TQDM)
    res = subprocess.run(
        [sys.executable, str(script), *jobs], capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "closed" in res.stdout
    assert "leaked semaphore" not in res.stderr, res.stderr


@pytest.mark.slow
def test_an_evaluation_with_workers_leaks_no_semaphore(tmp_path):
    argv = ["eval", "toy", "--reference", "toy", "--tasks", "reach", "push", "--episodes", "2"]
    argv += ["--max-steps", "12", "--image-size", "16", "--workers", "2", "--no-progress"]
    argv += ["--out", str(tmp_path / "run")]
    code = "import sys; from daptq.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "leaked semaphore" not in res.stderr, res.stderr
