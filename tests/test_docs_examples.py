"""Every shell example in README.md and docs/*.md works, in the order a reader meets them, from a clean cache.

A shell example is a fenced block tagged ``bash``/``sh``/``shell``/``console``, or an untagged block whose
first line is a command (``daptq ...``, ``python ...``, ``.venv/bin/...``). Commands are run one after the
other in one scratch directory with a fresh ``HOME`` (so ``~/.cache/daptq`` starts empty), each rewritten to
small settings by ``REWRITES`` (the documented table below); ``SKIPPED`` lists, each with its reason, the
examples that are not run. A new example in any doc is picked up automatically: the fast test fails until it
is runnable or listed, and every ``daptq`` command in the docs, run or skipped, must parse with the CLI.

Reading order: README.md, then the docs in the order README.md links them, then the other docs by name.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_TAGS = {"bash", "sh", "shell", "console"}
COMMAND_START = re.compile(r"^(\$ )?(daptq |python3? |\.venv/bin/|\./|[A-Z_]+=\S+ )")

# (pattern, replacement, why): applied in order to every command that is run. Small settings only: what a
# command does (its subcommand, model, method, outputs) is never rewritten.
REWRITES: list[tuple[str, str, str]] = [
    (r"^\./setup\.sh && ", "", "set-up is done: the test runs in the installed environment"),
    (r"(?<![\w/.-])\.venv/bin/", "", "the environment's bin directory is first on PATH"),
    (r"^(\$ )", "", "a prompt, not part of the command"),
    (
        r"\bpython (benchmarks/)",
        rf"python {REPO}/\1",
        "benchmarks live in the repository, not the scratch dir",
    ),
    (r"\bdaptq demo(?!\S* --(quick|toy))(?=\s|$)", "daptq demo --quick", "the full demo takes 5+ minutes"),
    (r"--episodes \d+", "--episodes 1 --max-steps 20", "one short episode per task"),
    (r"--workers \d+", "--workers 1", "no worker start-up"),
    (r"(daptq eval (?:(?!--tasks).)*)$", r"\1 --tasks reach", "eval: one task when the example names none"),
    (
        r"(daptq quantize ref:\S+ .*--method (?:daptq|quantvla|qvla|smoothquant|gptq|awq)\b)",
        r"\1 --trajectories 4 --calib-tasks reach",
        "calibration from one task (the cache extends to 8 episodes of it, not 80 of MT10)",
    ),
    (r"(daptq bench .*)$", r"\1 --rounds 1 --calls 1 --warmup 0", "one timed call per row"),
    (
        r"--train \d+ --calib \d+ --val \d+",
        "--train 1 --calib 1 --val 1 --tasks reach",
        "one episode per split",
    ),
    (r"--time-budget-min \d+", "--max-steps 2 --batch-size 4", "two optimizer steps"),
]

# Examples not run, by (file, command as written, comment stripped): why. Each still has to parse (daptq).
SKIPPED: dict[tuple[str, str], str] = {
    ("README.md", ".venv/bin/python -m pytest -q"): "the test suite itself",
    (
        "README.md",
        ".venv/bin/daptq demo --quick --out runs/demo-quick",
    ): "the README's first command already ran `daptq demo` as `--quick` (the same run, ~2 min)",
    (
        "docs/deployment.md",
        "daptq bench ref:metaworld-mt10 cogact-d2048 --variants all --compile --out results/bench_deploy",
    ): "a 2048-wide model in 7 processes with torch.compile: minutes even at one call per row",
    (
        "docs/deployment.md",
        "nice -n 10 daptq bench ref:metaworld-mt10 cogact-d2048 --variants torch-fp32 torch-bf16 "
        "torch-w4-packed ort-fp32 ort-w4a8 --threads 1 2 --rounds 3 --calls 2 --roofline --profile "
        "--out results/bench_deploy_roofline",
    ): "a 2048-wide model in 10 processes, the roofline microbenchmarks and 4 optimization-level profiles: "
    "12+ minutes even at one call per row (measured); tests/test_deploy_roofline.py and "
    "tests/test_deploy_bench.py run the same code on small models",
    (
        "docs/vla_baselines.md",
        "OMP_NUM_THREADS=1 PYTHONPATH=src python measure.py",
    ): "measure.py is the script printed below it (not a file); 12 quantizations of the bundled VLA",
    (
        "docs/vla_baselines.md",
        "daptq quantize ref:metaworld-mt10 --method quantvla --w-bits 4 --a-bits 4 --out runs/quantvla-w4a4",
    ): "the W4A8 quantvla example before it runs the same code at other bits",
    (
        "docs/vla_baselines.md",
        "daptq quantize ref:metaworld-mt10 --method qvla --avg-bits 3 --out runs/qvla-avg3",
    ): "the avg-bits 4 qvla example before it runs the same code at another budget",
    (
        "docs/reference_vla.md",
        "python -m daptq.train --data data_cache/metaworld-mt10-d2 --out runs/d2/full --time-budget-min 75 "
        "--threads 2 --checkpoint-every-min 5 --val-every 500",
    ): "trains on the two-camera dataset that doc builds in prose (hours); README's `daptq train` runs",
    (
        "docs/reference_vla.md",
        "python -m daptq.train.features --data data_cache/libero-so --cache data_cache/libero-so-features "
        "--threads 1",
    ): "needs the LIBERO dataset (hours to generate); tests/test_libero_smolvla.py encodes a tiny one",
    (
        "docs/reference_vla.md",
        "daptq train --arch smolvla --data data_cache/libero-so --out runs/libero-so/smolvla "
        "--time-budget-min 90 --threads 2 --precision fp32 --n-noise 2 --ema-decay 0.995 "
        "--checkpoint-every-min 5 --val-every 500",
    ): "90 min on the LIBERO dataset; tests/test_libero_smolvla.py trains on a tiny one through the CLI",
    (
        "docs/reference_vla.md",
        "MUJOCO_GL=egl daptq eval libero-smolvla:runs/libero-so/smolvla --suite libero "
        "--tasks libero_spatial --episodes 10 --seed-start 200000 --workers 2 "
        "--out results/libero_smolvla_val",
    ): "evaluates the run the training command above makes (LIBERO, minutes per episode batch)",
    (
        "docs/models.md",
        "daptq quantize toy --method gptq --w-bits 4 --calibration ~/data/my_lerobot_dataset "
        "--trajectories 64 --out out/q",
    ): "needs the reader's own LeRobot dataset",
    (
        "docs/models.md",
        "daptq quantize torch:my_robot/policy.py:build --method daptq --calibration "
        "~/data/my_lerobot_dataset --trajectories 64 --out out/my-daptq",
    ): "needs the reader's own model file and LeRobot dataset",
    ("docs/models.md", "daptq inspect out/my-daptq"): "inspects the reader's directory made just before it",
    (
        "docs/deployment.md",
        "daptq quantize lerobot:PATH --method rtn --w-bits 4 --a-bits 8 --group-size 128 --out runs/pi0-w4a8",
    ): "needs the reader's own lerobot pi0 checkpoint (tests/test_flow_export.py runs both on a tiny one)",
    (
        "docs/deployment.md",
        "daptq export runs/pi0-w4a8 --format onnx --out runs/pi0-w4a8-onnx",
    ): "exports the reader's pi0 directory made just before it",
}
# The RESULTS.md recipe of the deployed-vs-twin closed-loop row: its quantize and export are deployment.md's
# commands again (run there) and its two evaluations and benchmark script take minutes even at one short
# episode (measured 4.5 min on the shared 2-core machine); run by hand when that row is re-measured.
SKIPPED.update(
    {
        ("docs/RESULTS.md", command): "the deployed-vs-twin recipe of a RESULTS row (see above)"
        for command in (
            "daptq quantize ref:metaworld-mt10 --method rtn --w-bits 4 --a-bits 8 --group-size 128 "
            "--out runs/rtn-w4a8",
            "daptq export runs/rtn-w4a8 --format onnx --out runs/rtn-w4a8-onnx",
            "daptq eval onnx:runs/rtn-w4a8-onnx --reference runs/rtn-w4a8 --tasks reach push pick-place "
            "--episodes 20 --workers 2 --envs-per-worker 4 --out runs/eval-onnx-vs-twin",
            "daptq eval runs/rtn-w4a8 --reference ref:metaworld-mt10 --tasks reach push pick-place "
            "--episodes 20 --workers 2 --envs-per-worker 4 --out runs/eval-twin-vs-fp",
            "python benchmarks/deploy_closed_loop.py --onnx-vs-twin runs/eval-onnx-vs-twin --twin-vs-fp "
            "runs/eval-twin-vs-fp --out results/deploy_closed_loop",
        )
    }
)


@dataclass(frozen=True)
class Example:
    file: str  # relative to the repository
    line: int  # of the command's first line
    command: str  # as written (heredocs and continuations included)

    @property
    def key(self) -> tuple[str, str]:
        return self.file, _normalized(self.command)


def _normalized(command: str) -> str:
    first, *rest = command.split("\n", 1)
    first = re.sub(r"\s+#.*$", "", first)  # a trailing comment
    first = re.sub(r"\s*\\\s*$", "", first)
    text = "\n".join([first, *rest]) if rest and "<<" in first else " ".join([first, *rest])
    return re.sub(r"[ \t]+", " ", re.sub(r"\s*\\\n\s*", " ", text)).strip()


def doc_files() -> list[Path]:
    readme = REPO / "README.md"
    linked = re.findall(r"\]\((docs/[\w.-]+\.md)", readme.read_text())
    order = [readme] + [REPO / p for p in dict.fromkeys(linked) if (REPO / p).is_file()]
    return order + [p for p in sorted((REPO / "docs").glob("*.md")) if p not in order]


def _blocks(text: str):
    for m in re.finditer(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, re.S | re.M):
        yield m.group(1).lower(), text[: m.start()].count("\n") + 2, m.group(2)


def extract(path: Path) -> list[Example]:
    examples = []
    for tag, first_line, body in _blocks(path.read_text()):
        lines = body.splitlines()
        first_command = next((ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")), "")
        if tag not in SHELL_TAGS and not (tag == "" and COMMAND_START.match(first_command)):
            continue
        i = 0
        while i < len(lines):
            line, start = lines[i], i
            i += 1
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [line]
            heredoc = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
            while heredoc and i < len(lines):
                parts.append(lines[i])
                i += 1
                if lines[i - 1].strip() == heredoc.group(1):
                    break
            while not heredoc and parts[-1].rstrip().endswith("\\") and i < len(lines):
                parts.append(lines[i])
                i += 1
            rel = str(path.relative_to(REPO))
            examples.append(Example(rel, first_line + start, "\n".join(parts)))
    return examples


def all_examples() -> list[Example]:
    return [e for path in doc_files() for e in extract(path)]


def rewrite(command: str) -> str:
    out = _normalized(command)
    for pattern, replacement, _ in REWRITES:
        out = re.sub(pattern, replacement, out, flags=re.M)
    return out


def _daptq_args(command: str) -> list[str] | None:
    """The arguments after ``daptq`` in a one-line command, or None if it does not run ``daptq``."""
    if "<<" in command:
        return None
    words = shlex.split(_normalized(command), comments=True)
    for i, word in enumerate(words):
        if word == "daptq" or word.endswith("/daptq"):
            return words[i + 1 :]
    return None


# ---- fast checks -----------------------------------------------------------------------------------------
def test_examples_are_found_in_reading_order():
    examples = all_examples()
    files = [e.file for e in examples]
    assert files[0] == "README.md" and "docs/methods.md" in files and "docs/deployment.md" in files
    readme = [e.command for e in examples if e.file == "README.md"]
    assert readme[0].startswith("./setup.sh") and any(c.startswith("python - <<'EOF'") for c in readme)
    assert "daptq quantize ref:metaworld-mt10 --method daptq --out runs/daptq-w4a8" in " ".join(readme)


def test_every_example_is_run_or_skipped_with_a_reason():
    keys = {e.key for e in all_examples()}
    stale = sorted(set(SKIPPED) - keys)
    assert not stale, f"SKIPPED lists examples no doc has any more: {stale}"
    assert all(reason.strip() for reason in SKIPPED.values())


def test_every_daptq_example_parses_with_the_cli(capsys):
    """Run or skipped, a documented command names options and subcommands that exist."""
    from daptq.cli import build_parser

    parser = build_parser()
    for example in all_examples():
        args = _daptq_args(example.command)
        if args is None or args[:1] in (["train"], ["data"]):  # their own parsers (checked when run)
            continue
        try:
            parser.parse_args(args)
        except SystemExit:
            err = capsys.readouterr().err
            pytest.fail(f"{example.file}:{example.line}: `{example.command}` does not parse: {err}")


def test_rewrites_make_small_settings():
    assert rewrite("./setup.sh && .venv/bin/daptq demo") == "daptq demo --quick"
    assert rewrite(".venv/bin/daptq demo --toy --out runs/demo-toy") == "daptq demo --toy --out runs/demo-toy"
    assert rewrite("daptq eval runs/q --reference ref:m --episodes 10 --workers 2 --out runs/e") == (
        "daptq eval runs/q --reference ref:m --episodes 1 --max-steps 20 --workers 1 --out runs/e "
        "--tasks reach"
    )
    assert rewrite("daptq eval onnx:x --tasks push --episodes 20") == (
        "daptq eval onnx:x --tasks push --episodes 1 --max-steps 20"
    )
    assert rewrite("daptq quantize ref:m --method daptq --out d") == (
        "daptq quantize ref:m --method daptq --trajectories 4 --calib-tasks reach --out d"
    )
    assert rewrite("daptq quantize ref:m --method rtn --w-bits 4 --out d") == (
        "daptq quantize ref:m --method rtn --w-bits 4 --out d"
    )


# ---- running them -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_doc_examples_run_in_reading_order_from_a_clean_cache(tmp_path):
    """About 30 commands; `daptq demo --quick` from a fresh cache is the largest (79 s). Measured
    2026-12-07 on the 2-core machine at load 1.4-3: 7 min 13 s (under load 10-13 it took over 45 minutes);
    prints each command's time."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAPTQ_", "XDG_"))}
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
    )
    timings = []
    for example in all_examples():
        if example.key in SKIPPED:
            continue
        command = rewrite(example.command)
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        timings.append((time.monotonic() - t0, f"{example.file}:{example.line}"))
        assert proc.returncode == 0, (
            f"{example.file}:{example.line}: `{example.command}`\nran as `{command}`, exit "
            f"{proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    print("\n".join(f"{t:6.1f} s  {where}" for t, where in sorted(timings, reverse=True)))
