"""The Ray backend on a local cluster bound to loopback, including a worker killed mid-run."""

import os
import shutil
import signal
import tempfile

import pytest

from daptq.eval import evaluate, store

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

FAST = {"tasks": ["reach", "push"], "episodes": 3, "max_steps": 10, "image_size": 16, "progress": False}


@pytest.fixture
def loopback_ray(tmp_path, monkeypatch):
    """A 2-CPU Ray instance on 127.0.0.1 whose files (sessions, logs, auth token) stay in tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp,
        log_to_driver=False,
    )
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _results(run_dir):
    skip = ("wall_s", "simulated_steps", "reference_cached")
    return {
        (r["task"], r["seed"]): {k: v for k, v in r.items() if k not in skip}
        for r in store.read_records(run_dir)
    }


def test_ray_backend_equals_local_and_survives_a_killed_worker(tmp_path, loopback_ray):
    from daptq.eval.ray_backend import worker_pids

    local = evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "local", **FAST)
    killed = []

    def kill_a_worker(record):
        if not killed:
            killed.append(worker_pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    summary = evaluate(
        "toy:weight_noise=0.2",
        "toy",
        out=tmp_path / "ray",
        workers=2,
        backend="ray",
        on_episode=kill_a_worker,
        **FAST,
    )
    assert killed and summary["complete"] and summary["episodes"] == 6
    assert len(worker_pids()) == 3  # the killed actor was replaced
    lines = (tmp_path / "ray" / store.EPISODES_NAME).read_bytes().splitlines()
    assert len(lines) == 6  # none duplicated, none lost
    assert _results(tmp_path / "ray") == _results(tmp_path / "local")
    assert summary["overall"] == local["overall"]
    assert store.read_config(tmp_path / "ray")["execution"]["backend"] == "ray"
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()  # the token stayed in the test's HOME
