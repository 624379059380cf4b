"""`daptq bench SPEC...`: any spec `daptq eval` takes, measured as given in one run with ratios to the first
row (a quantized directory as evaluated and packed); bad specs and options are an `error:` line and exit 2,
a failing worker stops the run with its own message. No timing thresholds: rows, exit codes, messages."""

from __future__ import annotations

import re

import pytest

from daptq.cli import main
from daptq.deploy.bench import (
    BenchError,
    NothingToMeasure,
    Worker,
    build_spec_row,
    plan_rows,
    to_markdown,
)
from daptq.methods.rtn import RTNConfig
from daptq.methods.workflow import quantize_to_directory
from daptq.quant import QuantSpec, WeightSpec


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Two toy quantized directories: W8 weight-only (int8 kernels exist) and W4 g8 (no packed kernel)."""
    root = tmp_path_factory.mktemp("bench")
    w8 = quantize_to_directory("toy", RTNConfig(spec=QuantSpec(WeightSpec(8))), root / "w8")
    w4 = quantize_to_directory(
        "toy", RTNConfig(spec=QuantSpec(WeightSpec(4, granularity="per_group", group_size=8))), root / "w4"
    )
    return w8, w4


def test_bench_measures_the_users_own_quantized_directory_beside_fp(quantized, tmp_path, capsys):
    """What crashed ("language_proj is already quantized"): a `daptq quantize` directory is benched as
    evaluated and packed, in the same run as the FP model, ratios to the first row."""
    w8, _ = quantized
    out = tmp_path / "bench"
    args = ["bench", "toy", str(w8), "--rounds", "1", "--calls", "1", "--warmup", "0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| toy | fp |" in printed and f"| {w8} | as-evaluated |" in printed
    assert f"| {w8} | packed |" in printed
    assert re.search(r"[0-3]/3 \(cost model\) layers packed", printed)  # per layer: does packing pay here?
    import json

    report = json.loads(out.with_suffix(".json").read_text())
    rows = [(r["model"], r["variant"]) for r in report["results"]]
    assert rows == [("toy", "fp"), (str(w8), "as-evaluated"), (str(w8), "packed")]
    assert report["results"][0]["call_p50_vs_baseline"] == 1.0
    assert all(r["baseline"] == "toy fp" and r["calls"] == 1 for r in report["results"])


def test_a_directory_without_packed_kernels_gets_a_note_not_a_row(quantized):
    _, w4 = quantized
    assert plan_rows([str(w4)], None) == [(str(w4), "as-evaluated"), (str(w4), "packed")]
    with pytest.raises(NothingToMeasure, match="none of its 3 quantized layers"):
        build_spec_row(str(w4), "packed", threads=1)
    call, info = build_spec_row(str(w4), "as-evaluated", threads=1)
    call()
    assert info["quantized_layers"] == 3 and info["n_action_steps"] >= 1
    text = to_markdown(
        {"threads": 1, "rounds": 1, "calls_per_round": 1, "results": [], "notes": ["w4 packed: not measured"]}
    )
    assert "Note: w4 packed: not measured" in text


def test_specs_are_planned_like_eval_takes_them(quantized, tmp_path):
    w8, _ = quantized
    assert plan_rows(["ref:metaworld-mt10", "toy:seed=1"], None) == [
        ("ref:metaworld-mt10", "fp"),
        ("toy:seed=1", "fp"),
    ]
    # --variants applies to base models; a quantized directory is still measured as given (it crashed)
    assert plan_rows(["ref:metaworld-mt10", str(w8)], ["torch-fp32", "ort-w4a8"]) == [
        ("ref:metaworld-mt10", "torch-fp32"),
        ("ref:metaworld-mt10", "ort-w4a8"),
        (str(w8), "as-evaluated"),
        (str(w8), "packed"),
    ]
    # other registered sources (cogact:, lerobot:, torch:) are loaded by their worker, as eval loads them
    assert plan_rows(["toy", "torch:my_module:build"], None) == [
        ("toy", "fp"),
        ("torch:my_module:build", "as-given"),
    ]
    (tmp_path / "export").mkdir()
    with pytest.raises(BenchError, match="manifest.json"):
        plan_rows([f"onnx:{tmp_path / 'export'}"], None)
    with pytest.raises(BenchError, match="cannot bench '.*export'"):
        plan_rows([str(tmp_path / "export")], None)
    with pytest.raises(BenchError, match="named twice"):
        plan_rows(["toy", "toy"], None)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["nope:model"], "cannot bench 'nope:model'.*ref:<name>.*daptq quantize.*onnx:<dir>"),
        (["ref:no-such-model"], "no bundled reference VLA 'ref:no-such-model'"),
        (["toy:seed=zero"], "bad toy spec"),
        (["toy", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
        (["toy", "--rounds", "0"], "--rounds must be an integer >= 1, got 0"),
        (["toy", "--rounds", "-1"], "--rounds must be an integer >= 1, got -1"),
        (["toy", "--calls", "0"], "--calls must be an integer >= 1, got 0"),
        (["toy", "--warmup", "-1"], "--warmup must be an integer >= 0"),
        (["toy", "--cache", "FILE"], "--cache .*FILE is not a directory"),
        (["toy", "--variants", "torch-fp33"], "unknown bench variant"),
    ],
)
def test_bad_input_is_an_error_line_and_exit_2_before_any_worker(
    extra, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("not a directory")
    import re

    started = []
    monkeypatch.setattr("daptq.deploy.bench.Worker.__init__", lambda *a, **k: started.append(a))
    assert main(["bench", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daptq bench: error:") or "error:" in err
    assert re.search(message, err), err
    assert started == [] and "Traceback" not in err


def test_a_failing_worker_stops_the_run_with_its_message_and_stderr(tmp_path):
    """Not a 'failed' table row with exit 0: the worker's own error and where it was raised."""
    w = Worker("ref:no-such-model", "fp", tmp_path, 128, 1, 0)
    try:
        with pytest.raises(BenchError) as info:
            w.wait_ready()
    finally:
        w.kill()
    text = str(info.value)
    assert "bench of ref:no-such-model (fp) failed: FileNotFoundError: no bundled reference VLA" in text
    assert "(raised at File " in text and "reference.py" in text
    assert w.proc.poll() is not None  # the worker is gone
