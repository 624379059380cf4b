"""`daptq demo` end to end on the toy policy: three methods quantized, evaluated paired, a table, a report."""

from __future__ import annotations

import dataclasses
import json

import pytest
from baseline_helpers import toy_calibration

from daptq.demo import (
    QUICK,
    DemoSettings,
    demo_calibration,
    demo_methods,
    format_table,
    run_demo,
    strength_notes,
)
from daptq.eval.metrics import wilson_interval

TOY = DemoSettings(
    model="toy",
    tasks=("reach",),
    episodes=2,
    max_steps=12,
    workers=1,
    envs_per_worker=1,
    calib_trajectories=4,
    sensitivity_batches=1,
    paper_overrides={"float_dit_blocks": 0},  # the toy policy has no DiT blocks
    context_w4a8=True,
    budget_bits=3.0,  # 2.5 is infeasible on the toy's three small layers (scales dominate)
)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    summary = run_demo(
        out,
        TOY,
        reference_cache=out.parent / "refcache",
        progress=False,
        calibration=lambda policy: toy_calibration(),
        echo=lines.append,
    )
    return out, summary, "\n".join(lines)


def test_demo_writes_one_table_with_the_four_methods(demo_out):
    out, summary, printed = demo_out
    labels = ["RTN W2 g32", "GPTQ W2 g32", "DA-PTQ budget 3 bits", "DA-PTQ paper W4A8 (context)"]
    assert [m.label for m in demo_methods(TOY)] == labels
    assert [r["label"] for r in summary["rows"]] == labels
    table = (out / "demo_table.md").read_text()
    for label in labels:
        assert sum(line.startswith(f"| {label} |") for line in table.splitlines()) == 1
        assert f"| {label} |" in printed
    assert json.loads((out / "demo_summary.json").read_text())["rows"] == json.loads(
        json.dumps(summary["rows"])
    )
    for row in summary["rows"]:
        assert row["episodes"] == 2
        assert 0.0 <= row["success_rate"] <= 1.0 and row["drift_mean_m"] >= 0.0
        assert row["floor_drift_mean_m"] is not None  # the reseed floor beside every method
        assert 0.0 < row["bytes_vs_bf16"] < 1.0  # every method quantized something
        assert (out / "quantized" / row["method"] / "config.json").is_file()
        assert (out / "eval" / row["method"] / "summary.json").is_file()
    # The low-bit rows store fewer bytes than the W4A8 context row.
    assert max(r["bytes_vs_bf16"] for r in summary["rows"][:3]) < summary["rows"][3]["bytes_vs_bf16"]
    assert "paired episodes per method" in printed
    # Drift vs RTN, recomputed by hand from the runs' episode records.
    rtn, gptq = (
        json.loads((out / "eval" / r["method"] / "summary.json").read_text()) for r in summary["rows"][:2]
    )
    diff = gptq["overall"]["drift_mean"] - rtn["overall"]["drift_mean"]
    assert summary["rows"][0]["drift_vs_rtn_m"] is None
    assert summary["rows"][1]["drift_vs_rtn_m"][0] == pytest.approx(diff)
    lo, hi = summary["rows"][1]["drift_vs_rtn_m"][1:]
    assert lo <= diff <= hi


def test_demo_tests_each_row_against_daptq_budget_on_the_same_episodes(demo_out):
    from daptq.eval.metrics import mcnemar_exact

    out, summary, _ = demo_out
    assert summary["rows"][2]["success_vs_budget"] is None
    budget = {(r["task"], r["seed"]): r["success"] for r in _records(out, summary["rows"][2])}
    for row in (summary["rows"][0], summary["rows"][1], summary["rows"][3]):
        mine = {(r["task"], r["seed"]): r["success"] for r in _records(out, row)}
        keys = sorted(budget)
        expected = mcnemar_exact([mine[k] for k in keys], [budget[k] for k in keys])
        assert row["success_vs_budget"]["p_value"] == pytest.approx(expected["p_value"])
        assert row["success_vs_budget"]["episodes"] == len(keys)


def _records(out, row):
    lines = (out / "eval" / row["method"] / "episodes.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_demo_settings_are_fixed_on_the_eval_split_and_refuse_an_unknown_one(tmp_path):
    assert DemoSettings().seed_split == "eval" and QUICK.seed_split == "eval"
    with pytest.raises(ValueError, match="seed_split"):
        run_demo(
            tmp_path / "out",
            dataclasses.replace(TOY, seed_split="test"),
            calibration=lambda p: toy_calibration(),
            progress=False,
            echo=lambda s: None,
        )


def test_demo_report_holds_plots_of_all_methods(demo_out):
    out, summary, _ = demo_out
    report = (out / "report" / "report.md").read_text()
    for row in summary["rows"]:
        assert row["label"] in report
    for name in ("drift_over_time.png", "ee_paths_compare.png", "actions_compare.png"):
        assert (out / "report" / name).stat().st_size > 1000
        assert f"({name})" in report  # linked from report.md
    assert report.index("| DA-PTQ budget 3 bits |") < report.index("# Evaluation report")  # the table on top


def test_demo_reruns_into_its_own_output_but_refuses_a_foreign_directory(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not an earlier demo"):
        run_demo(foreign, TOY, calibration=lambda p: toy_calibration(), progress=False, echo=lambda s: None)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_strength_notes_against_hand_computation():
    s = strength_notes(60, 0.9)
    lo, hi = wilson_interval(54, 60)
    assert s["wilson_halfwidth_at_fp"] == pytest.approx((hi - lo) / 2)
    assert s["min_significant_difference"] == pytest.approx(0.1)
    # n = (1.96 + 0.8416)^2 (0.9*0.1 + 0.85*0.15) / 0.05^2 = 682.4 -> 683
    assert s["episodes_for_drop_80pct_power"]["5_points"] == 683


def test_format_table_shows_floor_beside_drift():
    row = {
        "label": "X", "success_rate": 0.5, "success_ci95": [0.2, 0.8], "fp_success_rate": 0.75,
        "mcnemar_p": 0.25, "drift_mean_m": 0.0123, "floor_drift_mean_m": 0.0201, "drift_max_mean_m": 0.05,
        "floor_drift_max_mean_m": 0.06, "bytes_vs_bf16": 0.2712, "quantize_s": 1.25, "eval_s": 30.4,
    }  # fmt: skip
    line = format_table([row, {**row, "drift_vs_rtn_m": [-0.001, -0.0025, 0.0004]}]).splitlines()
    assert (
        line[-2]
        == "| X | 50.0 [20.0, 80.0] | 75.0 | 0.25 | 1.23 (2.01) | 5.00 (6.00) | - | - | 0.271 | 1.2 | 30 |"
    )
    assert "| -0.10 [-0.25, +0.04] |" in line[-1]


def test_quick_settings_are_smaller_than_full():
    assert QUICK.tasks and len(QUICK.tasks) * QUICK.episodes < 10 * DemoSettings().episodes


def test_demo_calibration_generates_the_calib_split_on_first_use(tmp_path):
    from daptq.models.registry import load_policy

    settings = DemoSettings(
        model="toy", calib_tasks=("reach",), calib_episodes_per_task=1, calib_trajectories=1, workers=1
    )
    policy = load_policy("toy")
    calib = demo_calibration(policy, settings, tmp_path, progress=False)
    assert calib.provenance["split"] == "calib" and calib.provenance["tasks"] == ["reach"]
    assert calib.num_samples == 4  # one trajectory x 4 frames
    assert list(tmp_path.glob("calib-*/meta/info.json"))  # generated into the cache
    with pytest.raises(ValueError, match="asked for 2 calibration trajectories"):
        demo_calibration(
            policy, dataclasses.replace(settings, calib_trajectories=2), tmp_path, progress=False
        )
