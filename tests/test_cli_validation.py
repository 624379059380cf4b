"""Bad input to the ``daptq`` command: impossible values and unusable paths are one ``error:`` line naming the
option, file or layer, given before any work starts, with nothing written (issue 25, items 6-8)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import daptq.paths
from daptq.cli import main

QUANT = ["quantize", "toy", "--method", "rtn", "--w-bits", "4"]


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``daptq ARGV`` in this process; an exception (traceback) fails the test."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def assert_error(argv, capsys, *needles: str) -> str:
    rc, err = run_cli(argv, capsys)
    assert rc not in (0, None), f"{argv} succeeded"
    assert "error:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Loading any model is a test failure: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr("daptq.models.registry.load_policy", refuse)


@pytest.fixture
def deny_writes(monkeypatch):
    """Every directory is unwritable (the tests run as root, where chmod would not stop a write)."""
    monkeypatch.setattr(daptq.paths, "_writable", lambda directory: False)


# --- item 6: impossible values are refused ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["100", "16", "0", "-1", "nan", "inf"])
def test_quantize_refuses_out_of_range_average_bits(tmp_path, capsys, no_work, value):
    out = tmp_path / "q"
    argv = ["quantize", "toy", "--method", "daptq", f"--avg-bits={value}", "--out", str(out)]
    assert_error(argv, capsys, "--avg-bits")
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-8", "1"])
def test_quantize_refuses_group_size_below_two(tmp_path, capsys, no_work, value):
    assert_error([*QUANT, f"--group-size={value}", "--out", str(tmp_path / "q")], capsys, "--group-size")


def test_spec_from_bits_group_size_zero_is_not_per_channel():
    from daptq.quant.spec import spec_from_bits

    with pytest.raises(ValueError, match="group_size"):
        spec_from_bits(4, group_size=0)


def test_quantize_refuses_a_symmetric_range_for_an_asymmetric_grid(tmp_path, capsys, no_work):
    argv = [*QUANT, "--asymmetric", "--symmetric-range", "full", "--out", str(tmp_path / "q")]
    assert_error(argv, capsys, "--asymmetric", "--symmetric-range")


@pytest.mark.parametrize("option", ["--w-bits=5", "--a-bits=3", "--trajectories=0", "--calib-seed=-1"])
def test_quantize_refuses_impossible_numbers_naming_the_option(tmp_path, capsys, no_work, option):
    argv = ["quantize", "toy", "--method", "rtn", option, "--out", str(tmp_path / "q")]
    if not option.startswith("--w-bits"):
        argv.insert(4, "--w-bits=4")
    assert_error(argv, capsys, option.split("=")[0])


def test_empty_paths_are_refused_everywhere(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_error(["eval", "toy", "--out", ""], capsys, "--out", "empty")
    assert_error([*QUANT, "--out", ""], capsys, "--out", "empty")
    assert_error(["export", "toy", "--out", ""], capsys, "--out", "empty")
    assert_error(["demo", "--out", ""], capsys, "--out", "empty")
    assert_error(["eval", "toy", "--reference-cache", ""], capsys, "--reference-cache")
    assert_error(["quantize", "", "--method", "rtn", "--w-bits", "4", "--out", "q"], capsys, "model")
    assert list(tmp_path.iterdir()) == []


def test_unknown_recipe_keys_and_duplicate_keys_are_refused():
    from daptq.quant.recipe import Recipe

    with pytest.raises(ValueError, match="unknown"):
        Recipe.from_dict({"version": 1, "rules": [], "rulez": []})
    with pytest.raises(ValueError, match="duplicate key 'rules'"):
        Recipe.from_yaml("version: 1\nrules: []\nrules: []\n")
    with pytest.raises(ValueError, match="duplicate key 'rules'"):
        Recipe.from_json('{"version": 1, "rules": [], "rules": []}')
    with pytest.raises(ValueError, match="duplicate key 'target'"):
        Recipe.from_yaml("rules:\n- {target: a, target: b, spec: null}\n")


def test_method_config_file_with_duplicate_or_unknown_keys_is_refused(tmp_path, capsys, no_work):
    cfg = tmp_path / "rtn.yaml"
    cfg.write_text("spec:\n  weight: {bits: 4}\nspec:\n  weight: {bits: 8}\n")
    assert_error(
        ["quantize", "toy", "--method", "rtn", "--config", str(cfg), "--out", "q"], capsys, "rtn.yaml"
    )
    cfg_json = tmp_path / "rtn.json"
    cfg_json.write_text('{"method": "rtn", "method": "gptq"}')
    err = assert_error(
        ["quantize", "toy", "--method", "rtn", "--config", str(cfg_json), "--out", "q"], capsys, "rtn.json"
    )
    assert "duplicate key 'method'" in err


def test_versioned_json_refuses_duplicate_keys_and_string_versions(tmp_path):
    from daptq.versioned_json import read_versioned_json

    path = tmp_path / "c.json"
    path.write_text('{"format": "x", "format_version": 1, "format_version": 2}')
    with pytest.raises(ValueError, match="duplicate key 'format_version'"):
        read_versioned_json(path, "x", 1, "thing")
    path.write_text('{"format": "x", "format_version": "1"}')
    with pytest.raises(ValueError, match="must be an integer"):
        read_versioned_json(path, "x", 1, "thing")


def test_recipe_string_version_says_it_must_be_an_integer():
    from daptq.quant.recipe import Recipe

    with pytest.raises(ValueError, match="version must be an integer"):
        Recipe.from_dict({"version": "1", "rules": []})


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("toy:weight_noise=nan", "weight_noise"),
        ("toy:action_noise=inf", "action_noise"),
        ("toy:gain=nan", "gain"),
        ("toy:hidden=8,hidden=16", "hidden"),
        ("toy:hidden=100000000", "hidden"),
        ("toy:chunk=100000000", "chunk"),
        ("toy:seed=99999999999999999999999", "seed"),  # was: "Overflow when unpacking long long"
        ("toy:weight_noise=1e308", "weight_noise"),  # was: inf weights, NaN actions
    ],
)
def test_toy_spec_refuses_non_finite_duplicated_and_huge_values(spec, needle):
    from daptq.models.toy import parse_toy_spec

    with pytest.raises(ValueError, match=needle):
        parse_toy_spec(spec)


# --- daptq train: every error is an error line, before any work ---------------------------------------------


@pytest.mark.parametrize(
    "option, needle",
    [
        (["--time-budget-min", "-1"], "--time-budget-min"),
        (["--max-steps", "0"], "--max-steps"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--threads", "0"], "--threads"),
        (["--batch-size", "0"], "--batch-size"),
        (["--n-noise", "0"], "--n-noise"),
        (["--ema-decay", "2"], "--ema-decay"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--checkpoint-every-min", "nan"], "--checkpoint-every-min"),
        (["--val-every", "0"], "--val-every"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_train_refuses_impossible_values(tmp_path, capsys, option, needle):
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "ck"), "--max-steps", "1", *option]
    assert_error(argv, capsys, needle)


def test_train_checks_init_data_and_out_before_work(tmp_path, capsys, monkeypatch):
    import daptq.train.trainer as trainer

    monkeypatch.setattr(trainer, "open_dataset", lambda *a, **k: pytest.fail("work started"))
    base = ["train", "--max-steps", "1"]
    data = tmp_path / "data"
    data.mkdir()
    out = str(tmp_path / "ck")
    assert_error([*base, "--data", str(data), "--out", out, "--init", "ref:nope"], capsys, "--init", "nope")
    assert_error([*base, "--data", str(data), "--out", out, "--init", str(tmp_path / "no")], capsys, "--init")
    assert_error([*base, "--data", str(tmp_path / "missing"), "--out", out], capsys, "--data")
    afile = tmp_path / "f"
    afile.write_text("x")
    assert_error([*base, "--data", str(data), "--out", str(afile)], capsys, "--out", "is a file")
    assert_error([*base, "--data", str(data), "--out", str(afile / "ck")], capsys, "--out", "is a file")
    assert_error([*base, "--data", str(data), "--out", ""], capsys, "--out")


def test_train_config_refuses_non_finite_values_from_python():
    from daptq.train.trainer import TrainConfig

    for bad in ({"lr": float("nan")}, {"weight_decay": -1.0}, {"grad_clip": 0.0}, {"val_every": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(data="d", out="o", max_steps=1, **bad)


# --- item 7: unusable output paths, before any work ---------------------------------------------------------


def _bad_outputs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    return [(str(afile), "is a file"), (str(afile / "sub"), "is a file")]


@pytest.mark.parametrize("case", [0, 1])
def test_outputs_that_are_files_or_under_files_are_refused_first(
    tmp_path, capsys, no_work, monkeypatch, case
):
    import daptq.demo

    monkeypatch.setattr(daptq.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    out, needle = _bad_outputs(tmp_path)[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "episodes.jsonl").write_text("")
    assert_error([*QUANT, "--out", out], capsys, "--out", needle)
    assert_error(["export", "toy", "--out", out], capsys, "--out", needle)
    assert_error(["demo", "--out", out], capsys, "--out", needle)
    assert_error(["eval", "toy", "--out", out], capsys, "--out", needle)
    assert_error(["report", str(run), "--out", out], capsys, "--out", needle)
    assert_error(["eval", "toy", "--reference-cache", out], capsys, "--reference-cache", needle)
    assert_error(["data", "generate", "--root", out, "--train", "1"], capsys, "--root", needle)


def test_unwritable_outputs_are_refused_first(tmp_path, capsys, no_work, monkeypatch):
    import daptq.demo

    monkeypatch.setattr(daptq.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(daptq.paths, "_writable", lambda directory: directory != locked)
    out = str(locked / "new" / "out")
    run = tmp_path / "run"
    run.mkdir()
    for argv, option in [
        ([*QUANT, "--out", out], "--out"),
        (["export", "toy", "--out", out], "--out"),
        (["demo", "--out", out], "--out"),
        (["eval", "toy", "--out", out], "--out"),
        (["report", str(run), "--out", out], "--out"),
        (["eval", "toy", "--out", str(tmp_path / "r"), "--reference-cache", out], "--reference-cache"),
        (["data", "generate", "--root", out, "--train", "1"], "--root"),
        (["train", "--data", str(tmp_path), "--out", out, "--max-steps", "1"], "--out"),
    ]:
        assert_error(argv, capsys, option, "not writable")


def test_report_without_out_into_an_unwritable_run_is_an_error(tmp_path, capsys, deny_writes):
    run = tmp_path / "run"
    run.mkdir()
    assert_error(["report", str(run)], capsys, str(run), "not writable")


def test_an_os_error_during_work_is_an_error_line(tmp_path, capsys, monkeypatch):
    """The last line of defence: an OSError the checks could not foresee names its file, no traceback."""
    import daptq.methods.workflow as workflow

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x" / "model.safetensors"))

    monkeypatch.setattr(workflow, "quantize_from_args", denied)
    err = assert_error(
        [*QUANT, "--out", str(tmp_path / "x")], capsys, "model.safetensors", "Permission denied"
    )
    assert err.startswith("daptq quantize: error:")


@pytest.mark.parametrize(
    "option, needle",
    [
        (["--image-size", "100000"], "--image-size"),
        (["--image-size", "0"], "--image-size"),
        (["--episodes", "0"], "--episodes"),
        (["--workers", "0"], "--workers"),
        (["--envs-per-worker", "0"], "--envs-per-worker"),
        (["--max-steps", "0"], "--max-steps"),
        (["--seed-start", "-1"], "--seed-start"),
        (["--divergence-threshold", "nan"], "--divergence-threshold"),
        (["--divergence-threshold", "-1"], "--divergence-threshold"),
        (["--hf-cutoff", "inf"], "--hf-cutoff"),
        (["--hf-cutoff", "0.9"], "--hf-cutoff"),
        (["--max-episodes", "0"], "--max-episodes"),
    ],
)
def test_eval_refuses_impossible_numbers(tmp_path, capsys, no_work, option, needle):
    assert_error(["eval", "toy", "--out", str(tmp_path / "r"), *option], capsys, needle)


@pytest.mark.parametrize(
    "option, needle",
    [
        (["--episodes-per-shard", "0"], "--episodes-per-shard"),
        (["--image-size", "100000"], "--image-size"),
        (["--workers", "0"], "--workers"),
        (["--train", "-1"], "--train"),
        (["--noise-std", "nan"], "--noise-std"),
        (["--train", "0", "--calib", "0", "--val", "0"], "episodes"),
    ],
)
def test_data_generate_refuses_impossible_values_and_writes_nothing(tmp_path, capsys, option, needle):
    root = tmp_path / "ds"
    assert_error(["data", "generate", "--root", str(root), "--tasks", "reach", *option], capsys, needle)
    assert not root.exists()


def test_demo_report_and_paths_refuse_impossible_numbers(tmp_path, capsys, no_work):
    assert_error(["demo", "--workers", "0", "--out", str(tmp_path / "d")], capsys, "--workers")
    run = tmp_path / "run"
    run.mkdir()
    assert_error(["report", str(run), "--paths", "-1"], capsys, "--paths")
    assert_error(["report", str(run), "--gif", "reach", "-3"], capsys, "--gif")


def test_report_of_a_missing_or_file_run_names_it(tmp_path, capsys):
    assert_error(["report", str(tmp_path / "nope")], capsys, "nope", "no such directory")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_error(["report", str(afile)], capsys, "afile", "is a file")


def test_quantize_policy_with_a_method_name_says_to_pass_a_config():
    from daptq.methods import quantize_policy
    from daptq.models.registry import load_policy

    with pytest.raises(ValueError, match="config_type_for"):
        quantize_policy(load_policy("toy"), "rtn")


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    """``daptq inspect DIR | head``: the reader leaves early; no BrokenPipeError traceback."""
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.workflow import quantize_to_directory
    from daptq.quant import QuantSpec, WeightSpec

    out = quantize_to_directory("toy", RTNConfig(spec=QuantSpec(WeightSpec(4))), tmp_path / "q")
    code = "import sys; from daptq.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "inspect", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # closed before the child writes: its first write meets EPIPE every time
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_broken_pipe_in_process_is_handled(tmp_path, capsys, monkeypatch):
    from daptq.methods import workflow

    def write_to_closed_pipe(directory):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(workflow, "inspect_text", write_to_closed_pipe)
    monkeypatch.setattr("daptq.cli._silence_stdout", lambda: None)  # keep pytest's own stdout
    rc, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert rc != 0 and err == ""


# --- item 8: messages name the file, the layer, the option --------------------------------------------------


def test_codes_outside_the_grid_name_the_layer():
    from daptq.quant import QuantSpec, WeightSpec
    from daptq.quant.fake import quantized_module_for

    layer = quantized_module_for(
        torch.nn.Linear(8, 4), QuantSpec(WeightSpec(3)), "blocks.0.fc", round_now=False
    )
    codes = torch.full((4, 8), 7, dtype=torch.int8)
    scale = torch.ones(4, 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"blocks\.0\.fc: codes outside \[-4, 3\] for 3-bit"):
        layer.set_quantized_weight(codes, scale)
    with pytest.raises(ValueError, match=r"blocks\.0\.fc: scale shape"):
        layer.set_quantized_weight(codes.clamp(-4, 3), torch.ones(3, 1, dtype=torch.bfloat16))


def test_inspect_says_what_a_directory_is_instead_of_an_interrupted_save(tmp_path, capsys):
    assert_error(["inspect", str(tmp_path / "nope")], capsys, "no such directory")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_error(["inspect", str(afile)], capsys, "is a file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "episodes.jsonl").write_text("")
    assert_error(["inspect", str(run)], capsys, "evaluation run directory")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "manifest.json").write_text(json.dumps({"format": "daptq-onnx-policy"}))
    assert_error(["inspect", str(onnx)], capsys, f"onnx:{onnx}")
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"")
    assert_error(["inspect", str(torn)], capsys, "interrupted save")


def test_output_dot_names_no_directory(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = assert_error([*QUANT, "--out", "."], capsys, "--out")
    assert "PosixPath" not in err


def test_paths_helper_checks(tmp_path, monkeypatch):
    from daptq.paths import check_input_dir, check_input_file, check_output_dir, check_output_file

    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing is created by a check
    f = tmp_path / "f"
    f.write_text("x")
    assert check_output_file(f, "--out") == f
    with pytest.raises(ValueError, match="--x .*is a directory"):
        check_output_file(tmp_path, "--x")
    with pytest.raises(FileNotFoundError, match="--data .*no such directory"):
        check_input_dir(tmp_path / "no", "--data")
    with pytest.raises(ValueError, match="--config .*is a directory"):
        check_input_file(tmp_path, "--config")
    with pytest.raises(ValueError, match="--out: empty path"):
        check_output_dir("   ")


# --- a hostile pass of our own ---------------------------------------------------------------------------


def test_scene_cameras_are_the_scene_s_cameras():
    from daptq.cli_args import SCENE_CAMERAS
    from daptq.envs import make_env

    env = make_env("reach", image_size=16, camera="corner3", max_steps=1)
    try:
        model = env._mw.model
        assert tuple(model.camera(i).name for i in range(model.ncam)) == SCENE_CAMERAS
    finally:
        env.close()


def test_data_generate_with_an_unknown_camera_writes_nothing(tmp_path, capsys):
    root = tmp_path / "ds"
    argv = ["data", "generate", "--root", str(root), "--tasks", "reach", "--train", "1", "--camera", "nope"]
    assert_error(argv, capsys, "--camera", "nope")
    assert not root.exists()  # was: meta/info.json saying camera 'nope', refusing every later run


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["data", "speed", "--steps", "0"], "--steps"),  # was: "0.0 steps/s", exit 0
        (["data", "speed", "--steps", "-1"], "--steps"),  # was: a negative rate
        (["data", "speed", "--image-size", "100000"], "--image-size"),  # was: MuJoCo FatalError
        (["data", "speed", "--camera", "nope"], "--camera"),
        (
            ["data", "add-cameras", "--src", "S", "--dst", "D", "--cameras", "topview", "--workers", "0"],
            "--workers",
        ),
        (["data", "add-cameras", "--src", "S", "--dst", "D", "--cameras", "nope"], "--cameras"),
        (["eval", "toy", "--camera", "nope"], "--camera"),
        (["eval", "toy", "--tasks", "nope"], "--tasks"),
        (["eval", "toy", "--reference", ""], "--reference"),
        (["quantize", "toy", "--method", "rtn", "--calib-tasks", "nope", "--out", "q"], "--calib-tasks"),
        (["train", "--data", "d", "--out", "o", "--max-steps", "1", "--camera", "nope"], "--camera"),
        (["train", "--data", "d", "--out", "o", "--max-steps", "1", "--tasks", "nope"], "--tasks"),
    ],
)
def test_hostile_values_are_refused_naming_the_option(tmp_path, capsys, no_work, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert_error(argv, capsys, needle)
    assert list(tmp_path.iterdir()) == []


def test_add_cameras_checks_its_paths_first(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["data", "add-cameras", "--cameras", "topview"]
    assert_error([*base, "--src", str(tmp_path / "no"), "--dst", str(tmp_path / "d")], capsys, "--src")
    assert_error([*base, "--src", str(tmp_path), "--dst", str(afile)], capsys, "--dst", "is a file")


def test_report_of_several_runs_without_out_names_the_option(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert_error(["report", str(tmp_path / "a"), str(tmp_path / "b")], capsys, "--out")


def test_eval_checks_the_default_reference_cache_before_writing_the_run(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(locked))
    monkeypatch.setattr(daptq.paths, "_writable", lambda directory: directory != locked)
    run = tmp_path / "run"
    err = assert_error(["eval", "toy", "--tasks", "reach", "--episodes", "1", "--out", str(run)], capsys)
    assert "reference cache" in err and "--no-reference-cache" in err
    assert not run.exists()  # was: config.json written, then "[Errno 2] No such file or directory"


def test_method_config_that_is_not_text_or_not_a_file_is_named(tmp_path, capsys, no_work):
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(b"\xff\xfe\x00binary")
    base = ["quantize", "toy", "--method", "rtn", "--out", str(tmp_path / "q")]
    assert_error([*base, "--config", str(garbage)], capsys, "garbage.yaml")
    assert_error([*base, "--config", "/dev/null"], capsys, "--config", "not a regular file")


def test_paths_are_checked_as_the_command_uses_them(tmp_path, monkeypatch):
    from daptq.paths import check_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "~").write_text("a file named ~")  # `--out=~/out` is not expanded by the shell
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir("~/out")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="broken symbolic link"):
        check_output_dir("dangling")


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    import daptq.methods.workflow as workflow

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "quantize_from_args", interrupted)
    rc, err = run_cli([*QUANT, "--out", str(tmp_path / "q")], capsys)
    assert rc == 130 and err.strip() == "daptq quantize: interrupted"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "toy", "--max-steps", "1000000000"], "--max-steps"),
        (["eval", "toy", "--workers", "100000"], "--workers"),
        (["eval", "toy", "--envs-per-worker", "100000"], "--envs-per-worker"),
        (["demo", "--workers", "100000"], "--workers"),
        (["data", "generate", "--root", "g", "--tasks", "reach", "--workers", "100000"], "--workers"),
        (
            [
                "data",
                "add-cameras",
                "--src",
                "s",
                "--dst",
                "d",
                "--cameras",
                "topview",
                "--workers",
                "100000",
            ],
            "--workers",
        ),
        (
            ["train", "--data", "d", "--out", "o", "--max-steps", "1", "--batch-size", "100000000"],
            "--batch-size",
        ),
        (["train", "--data", "d", "--out", "o", "--max-steps", "1", "--n-noise", "100000000"], "--n-noise"),
        (
            ["quantize", "toy", "--method", "gptq", "--w-bits", "4", "--trajectories", "100000000"],
            "--trajectories",
        ),
    ],
)
def test_sizes_that_would_exhaust_memory_or_time_are_refused(capsys, no_work, argv, needle):
    assert_error([*argv, "--out", "o"] if argv[0] in ("eval", "quantize", "demo") else argv, capsys, needle)


def test_episodes_jsonl_that_is_a_directory_is_an_error_line(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["eval", "toy", "--reference", "toy", "--tasks", "reach", "--episodes", "1", "--max-steps", "2"]
    assert main([*argv, "--out", str(run), "--no-progress", "--no-reference-cache", "--workers", "1"]) == 0
    (run / "episodes.jsonl").unlink()
    (run / "episodes.jsonl").mkdir()
    capsys.readouterr()
    assert_error(["report", str(run)], capsys, "episodes.jsonl")
    resume = [*argv, "--out", str(run), "--no-progress", "--no-reference-cache", "--workers", "1", "--resume"]
    assert_error(resume, capsys, "episodes.jsonl")


def test_method_config_string_version_says_it_must_be_an_integer(tmp_path, capsys, no_work):
    cfg = tmp_path / "rtn.yaml"
    cfg.write_text('version: "1"\nmethod: rtn\n')
    argv = ["quantize", "toy", "--method", "rtn", "--config", str(cfg), "--out", str(tmp_path / "q")]
    assert_error(argv, capsys, "version must be an integer")


def test_train_touches_nothing_in_out_when_the_data_is_not_a_dataset(tmp_path, capsys):
    notdata, out = tmp_path / "notdata", tmp_path / "ck"
    notdata.mkdir()
    out.mkdir()
    (out / "train_log.jsonl").write_text('{"step": 1}\n')  # the log of an earlier run
    assert_error(["train", "--data", str(notdata), "--out", str(out), "--max-steps", "1"], capsys, "notdata")
    assert (out / "train_log.jsonl").read_text() == '{"step": 1}\n'  # was: deleted before the data was read
    fresh = tmp_path / "fresh"
    assert_error(["train", "--data", str(notdata), "--out", str(fresh), "--max-steps", "1"], capsys)
    assert not fresh.exists()


def test_train_init_that_is_not_a_checkpoint_is_refused_first(tmp_path, capsys):
    argv = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--max-steps", "1"]
    assert_error([*argv, "--init", str(tmp_path)], capsys, "--init", "not a reference VLA checkpoint")


def test_a_bad_field_in_a_method_config_file_names_the_file(tmp_path, capsys, no_work):
    cfg = tmp_path / "my-rtn.yaml"
    cfg.write_text("method: rtn\nspec:\n  weight: {bits: 5}\n")
    argv = ["quantize", "toy", "--method", "rtn", "--config", str(cfg), "--out", str(tmp_path / "q")]
    assert_error(argv, capsys, "my-rtn.yaml", "bits must be one of")


def test_recipe_file_errors_name_the_file(tmp_path):
    from daptq.quant.recipe import Recipe

    path = tmp_path / "bits.yaml"
    path.write_text("rules:\n- {target: '*', spec: {weight: {bits: 5}}}\n")
    with pytest.raises(ValueError, match=r"bits\.yaml: .*bits must be one of"):
        Recipe.load(path)
    path.write_text("rules: []\nrules: []\n")
    with pytest.raises(ValueError, match=r"bits\.yaml: .*duplicate key 'rules'"):
        Recipe.load(path)


def test_quantize_to_directory_with_an_empty_model_spec_says_so(tmp_path):
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.workflow import quantize_to_directory

    with pytest.raises(ValueError, match="model spec must be a non-empty string"):
        quantize_to_directory("", RTNConfig(), tmp_path / "q")  # was: " is already a directory"


def _alias_bomb(levels: int = 8) -> str:
    """A ~1 kB YAML value that stands for 10^levels strings ("billion laughs")."""
    expr = "&a0 [x, x, x, x, x, x, x, x, x, x]"
    for i in range(1, levels + 1):
        expr = f"&a{i} [{expr}, " + ", ".join([f"*a{i - 1}"] * 9) + "]"
    return expr


def test_yaml_alias_bombs_are_refused_before_they_expand(tmp_path, capsys, no_work):
    from daptq.strict_parse import load_yaml_strict

    with pytest.raises(yaml.YAMLError, match="expands to more than"):
        load_yaml_strict(f"a: {_alias_bomb()}\n")
    with pytest.raises(yaml.YAMLError, match="recursive alias"):
        load_yaml_strict("a: &a [*a]\n")
    assert load_yaml_strict("x: &x {a: 1}\ny:\n  <<: *x\n  b: 2\n") == {"x": {"a": 1}, "y": {"a": 1, "b": 2}}
    cfg = tmp_path / "bomb.yaml"  # was: the error's repr of the value grew past 650 MB, no end in sight
    cfg.write_text(f"method: rtn\nspec:\n  weight:\n    bits: 4\n    observer: {_alias_bomb()}\n")
    argv = ["quantize", "toy", "--method", "rtn", "--config", str(cfg), "--out", str(tmp_path / "q")]
    assert_error(argv, capsys, "bomb.yaml", "expands to more than")


@pytest.mark.parametrize(
    "argv, prefix",
    [
        (["train", "--data", "d", "--out", "o", "--lr", "nan"], "daptq train: error:"),
        (["data", "generate", "--root", "g", "--train", "-1"], "daptq data generate: error:"),
        (["data", "speed", "--steps", "0"], "daptq data speed: error:"),
    ],
)
def test_errors_of_the_delegated_parsers_name_the_daptq_command(capsys, argv, prefix):
    assert prefix in assert_error(argv, capsys)  # was: "python -m daptq.train: error: ..."


def test_an_unusable_calibration_cache_is_named_as_such(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    monkeypatch.setenv("DAPTQ_CACHE_DIR", str(afile / "cache"))
    out = tmp_path / "q"
    argv = ["quantize", "toy", "--method", "gptq", "--w-bits", "4", "--out", str(out)]
    err = assert_error(argv, capsys, "the calibration cache", "DAPTQ_CACHE_DIR")
    assert str(afile) in err and not out.exists()
