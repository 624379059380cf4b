"""The ways a careless or hostile user could be fooled by an evaluation run, each one refused or repaired."""

import json
import math
import os
import re
import tracemalloc

import numpy as np
import pytest

from daptq.eval import evaluate, metrics, store, write_report

pytestmark = pytest.mark.slow

FAST = {"max_steps": 12, "image_size": 16, "progress": False}


class Interrupt(RuntimeError):
    pass


def _textbook_wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval in float64 from its closed form, the independent reference."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 10, 20, 33, 50, 100, 500])
def test_wilson_interval_is_on_the_right_side_of_p_at_the_edges(n):
    for k in range(n + 1):
        lo, hi = metrics.wilson_interval(k, n)
        assert lo <= k / n <= hi, (k, n, lo, hi)  # the textbook formula misses by ~1e-17 at 0/n or n/n
        ref_lo, ref_hi = _textbook_wilson(k, n)
        assert lo == pytest.approx(ref_lo, abs=1e-12) and hi == pytest.approx(ref_hi, abs=1e-12)
    assert metrics.wilson_interval(0, n)[0] == 0.0 and metrics.wilson_interval(n, n)[1] == 1.0


def test_report_of_runs_with_every_or_no_episode_successful(tmp_path):
    run = tmp_path / "run"
    evaluate("toy", "toy", tasks=["reach", "push"], episodes=3, out=run, **FAST)
    summary = json.loads((run / store.SUMMARY_NAME).read_text())
    for s in summary["per_task"].values():  # 12 steps are too short to succeed: 0/3 on both tasks
        assert s["success_rate"] == 0.0 and s["success_ci95"][0] == 0.0
    assert write_report(run).is_file()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    kwargs = {"tasks": ["reach"], "episodes": 2, "out": run, **FAST}
    with pytest.raises(Interrupt):
        evaluate("toy", "toy", on_episode=lambda r: (_ for _ in ()).throw(Interrupt()), **kwargs)
    log_before = (run / store.EPISODES_NAME).read_bytes()
    with store.RunLock(run):  # another process resuming the same run holds the lock
        with pytest.raises(
            RuntimeError, match=f"another daptq process is writing this run \\(pid {os.getpid()}"
        ):
            evaluate("toy", "toy", resume=True, **kwargs)
    assert (run / store.EPISODES_NAME).read_bytes() == log_before
    assert evaluate("toy", "toy", resume=True, **kwargs)["complete"]  # released: the resume goes ahead
    assert len(store.read_records(run)) == 2


def test_resume_refuses_a_model_whose_weights_changed_under_the_same_spec(tmp_path, monkeypatch):
    run = tmp_path / "run"
    kwargs = {"tasks": ["reach"], "episodes": 2, "out": run, **FAST}
    with pytest.raises(Interrupt):
        evaluate("toy", "toy", on_episode=lambda r: (_ for _ in ()).throw(Interrupt()), **kwargs)
    config = json.loads((run / store.CONFIG_NAME).read_text())
    assert (
        len(config["candidate"]["digest"]) == 64
        and config["candidate"]["digest"] == config["reference"]["digest"]
    )
    import daptq.models.toy as toy

    monkeypatch.setattr(toy, "_WORKSPACE_CENTRE", (0.0, 0.61, 0.15))  # new buffers, same spec and recipe
    with pytest.raises(ValueError, match="candidate_model, reference_model"):
        evaluate("toy", "toy", resume=True, **kwargs)


def test_bundled_reference_models_have_a_digest_of_weights_and_config():
    import torch

    from daptq.models.registry import load_policy

    policy = load_policy("ref:metaworld-mt10")
    info = policy.info()
    assert len(info.digest) == 64 and info.image_size == 96 and info.camera == "corner3"
    assert policy.info().digest == info.digest  # deterministic
    with torch.no_grad():
        next(policy.model.head.parameters()).view(-1)[0] += 1e-6
    assert policy.info().digest != info.digest


def test_resume_refuses_symlinks_inside_the_run_dir(tmp_path):
    run = tmp_path / "run"
    kwargs = {"tasks": ["reach"], "episodes": 2, "out": run, **FAST}
    with pytest.raises(Interrupt):
        evaluate("toy", "toy", on_episode=lambda r: (_ for _ in ()).throw(Interrupt()), **kwargs)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n" * 3 + b"torn")  # a torn last line: the old resume truncated it
    (run / store.EPISODES_NAME).unlink()
    (run / store.EPISODES_NAME).symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link"):
        evaluate("toy", "toy", resume=True, **kwargs)
    with pytest.raises(ValueError, match="symbolic link"):
        write_report(run)
    assert victim.read_bytes() == b"precious\n" * 3 + b"torn"
    linked = tmp_path / "linked"
    linked.symlink_to(run)
    with pytest.raises(ValueError, match="symbolic link"):
        evaluate("toy", "toy", resume=True, **{**kwargs, "out": linked})


@pytest.mark.parametrize(
    "option",
    [
        {"divergence_threshold": float("nan")},
        {"divergence_threshold": float("inf")},
        {"divergence_threshold": -0.01},
        {"hf_cutoff": float("nan")},
        {"hf_cutoff": 0.0},
        {"episodes": 0},
        {"episodes": True},
        {"seed_start": -1},
        {"max_steps": 0},
        {"image_size": -16},
        {"workers": 0},
    ],
)
def test_every_numeric_option_is_validated_before_anything_is_written(tmp_path, option):
    kwargs = {"tasks": ["reach"], "episodes": 1, **FAST, **option}
    with pytest.raises(ValueError, match=next(iter(option))):
        evaluate("toy", "toy", out=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("candidate", "option", "message"),
    [
        ("toy", {"camera": "no-such-camera"}, "no-such-camera"),
        ("toy:action_dim=3", {}, "acts in 3 dimensions"),
    ],
)
def test_a_start_that_fails_writes_nothing(tmp_path, candidate, option, message):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        evaluate(candidate, None, tasks=["reach"], episodes=1, out=run, **{**FAST, **option})
    assert not run.exists()
    summary = evaluate("toy", None, tasks=["reach"], episodes=1, out=run, **FAST)  # the directory is usable
    assert summary["complete"]


def test_a_huge_run_does_not_materialize_its_jobs(tmp_path):
    tracemalloc.start()
    try:
        with pytest.raises(Interrupt):
            evaluate(
                "toy",
                None,
                tasks=["reach", "push"],
                episodes=10**6,
                out=tmp_path / "run",
                on_episode=lambda r: (_ for _ in ()).throw(Interrupt()),
                **FAST,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"{peak / 1e6:.0f} MB traced: the job list was materialized"  # 2e6 jobs: > 150 MB


def test_damaged_records_and_arrays_are_re_run_on_resume(tmp_path):
    run = tmp_path / "run"
    kwargs = {"tasks": ["reach"], "episodes": 4, "out": run, **FAST}
    evaluate("toy:weight_noise=0.2", "toy", **kwargs)
    intact = {(r["task"], r["seed"]): r for r in store.read_records(run)}
    seeds = sorted(s for _, s in intact)
    lines = (run / store.EPISODES_NAME).read_bytes().splitlines(keepends=True)
    (run / store.EPISODES_NAME).write_bytes(b"{}\n" + b"".join(lines))  # an empty record
    store.arrays_path(run, "reach", seeds[1]).unlink()  # missing arrays
    store.arrays_path(run, "reach", seeds[2]).write_bytes(b"PK\x03\x04 not a zip")  # corrupted arrays
    a = store.load_arrays(run, "reach", seeds[3])
    store.atomic_save_npz(store.arrays_path(run, "reach", seeds[3]), {**a, "ee": a["ee"][:3]})  # truncated
    with pytest.warns(UserWarning, match="left out of the report"):
        write_report(run)  # reports what is intact instead of crashing
    with pytest.warns(UserWarning, match="4 damaged episode record"):
        summary = evaluate("toy:weight_noise=0.2", "toy", resume=True, **kwargs)
    assert summary["complete"] and summary["episodes"] == 4
    records = store.read_records(run)
    assert sorted(r["seed"] for r in records) == seeds  # none lost, none duplicated, no {} left
    for r in records:
        want = dict(intact[(r["task"], r["seed"])])
        for key in ("wall_s", "simulated_steps", "reference_cached"):
            want.pop(key), r.pop(key)
        assert r == want  # the re-run episodes are the same episodes
        assert store.arrays_problem(run, r, paired=True) is None
        assert np.isfinite(store.load_arrays(run, r["task"], r["seed"])["ee"]).all()


def test_config_records_how_the_run_was_executed(tmp_path):
    run = tmp_path / "run"
    kwargs = {"tasks": ["reach"], "episodes": 2, "out": run, **FAST}
    with pytest.raises(Interrupt):
        evaluate("toy", "toy", on_episode=lambda r: (_ for _ in ()).throw(Interrupt()), **kwargs)
    config = json.loads((run / store.CONFIG_NAME).read_text())
    assert config["execution"] == {
        "backend": "local",
        "workers": 1,
        "envs_per_worker": 1,
        "reference_cache": None,
        "ray_address": None,
    }
    evaluate("toy", "toy", resume=True, workers=2, **kwargs)
    config = json.loads((run / store.CONFIG_NAME).read_text())
    assert config["execution"]["workers"] == 1
    assert [(s["workers"], s["envs_per_worker"]) for s in config["resumed"]] == [(2, 1)]


def test_the_cli_evaluates_reports_and_refuses_nan(tmp_path, capsys):
    from daptq.cli import main

    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--tasks", "reach", "push", "--max-steps", "20", "--image-size", "16", "--no-progress"]
    argv = ["eval", "toy", *common, "--episodes", "3", "--out", str(run), "--reference-cache", str(cache)]
    assert main(argv) == 0
    from daptq.cli import DEFAULT_ENVS_PER_WORKER, default_workers

    execution = json.loads((run / store.CONFIG_NAME).read_text())["execution"]
    assert execution["envs_per_worker"] == DEFAULT_ENVS_PER_WORKER > 1  # batched unless told otherwise
    assert execution["workers"] == default_workers() >= 1
    assert main(["report", str(run)]) == 0 and (run / "report.md").is_file()
    bad = ["eval", "toy", "--reference", "toy", *common, "--out", str(tmp_path / "nan")]
    assert main([*bad, "--divergence-threshold", "nan"]) == 2
    err = capsys.readouterr().err
    assert re.search("divergence[-_]threshold", err) and not (tmp_path / "nan").exists()
