"""report.md and plots from one and several run directories."""

import json

import pytest

from daptq.eval import evaluate, render_rollout_gif, store, write_report

pytestmark = pytest.mark.slow

FAST = {"tasks": ["reach"], "episodes": 2, "max_steps": 10, "image_size": 16, "progress": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    evaluate("toy:weight_noise=0.05", "toy", out=root / "small", **FAST)
    evaluate("toy:weight_noise=0.5", "toy", out=root / "large", **FAST)
    return root


def test_single_run_report(runs):
    report = write_report(runs / "small")
    assert report == runs / "small" / "report.md"
    text = report.read_text()
    assert "| small | toy noise 0.05 |" in text and "| reach | 2 |" in text
    for png in ("success_by_task.png", "drift_over_time.png"):
        assert (runs / "small" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"({png})" in text
    assert len(list((runs / "small").glob("ee_paths_*.png"))) == 1
    assert len(list((runs / "small").glob("actions_*.png"))) == 1


def test_comparison_report_across_runs(runs, tmp_path):
    report = write_report([runs / "small", runs / "large"], out=tmp_path / "cmp")
    text = report.read_text()
    rows = [
        line for line in text.splitlines() if line.startswith("| small |") or line.startswith("| large |")
    ]
    assert len(rows) == 2
    # The drift column (cm) must rank the runs by weight noise.
    drift = [float(row.split("|")[9].split("/")[0]) for row in rows]
    assert drift[0] < drift[1]
    assert "| method | noise 0.05 | noise 0.5 |" in text  # methods x bit settings
    assert any(line.startswith("| toy | ") and line.count(" cm") == 2 for line in text.splitlines())
    with pytest.raises(ValueError, match="pass out=DIR"):
        write_report([runs / "small", runs / "large"])


def test_report_rejects_foreign_or_empty_dirs(tmp_path, runs):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="not a daptq evaluation run"):
        write_report(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    config = json.loads((runs / "small" / "config.json").read_text())
    store.atomic_write_json(empty / "config.json", config)
    with pytest.raises(ValueError, match="no finished episode"):
        write_report(empty)


def test_rollout_gif_replays_the_episode(runs):
    import imageio.v3 as iio

    (record, _) = store.read_records(runs / "large")
    path = render_rollout_gif(runs / "large", "reach", record["seed"])
    frames = iio.imread(path)
    assert frames.shape == (max(record["steps"], record["ref_steps"]) + 1, 16, 32, 3)  # candidate | FP
    with pytest.raises(ValueError, match="not part of run"):
        render_rollout_gif(runs / "large", "push", record["seed"])


def test_rollout_gif_of_a_two_camera_run_stacks_the_views(tmp_path):
    import imageio.v3 as iio

    run = tmp_path / "two"
    evaluate("toy:weight_noise=0.05", "toy", out=run, camera="corner3,topview", **FAST)
    (record, _) = store.read_records(run)
    frames = iio.imread(render_rollout_gif(run, "reach", record["seed"]))
    assert frames.shape[1:] == (32, 32, 3)  # two views one above the other; candidate | FP


def test_a_failed_plot_leaves_no_file_behind(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from daptq.eval.report import _save

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    _save(fig, tmp_path / "ok.png")
    assert (tmp_path / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig, ax = plt.subplots()
    ax.set_title("$\\undefinedmacro$")  # mathtext fails while drawing
    with pytest.raises(ValueError):
        _save(fig, tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]
