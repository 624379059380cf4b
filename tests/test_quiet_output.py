"""A user's process prints daptq's output and nothing from its dependencies: no torchao native-library
failures, no torch deprecation warnings, no transformers "Loading weights" bar per process, no leaked
semaphores at exit. Run as a user would (a fresh HOME, so a clean cache), on the bundled VLA."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# What dependencies print when they are noisy; torch's own logging lines look like "W1207 03:20:18.83 ...".
NOISE = re.compile(r"Warning|Failed to load|Loading weights|leaked semaphore|^[WE]\d{4} ", re.MULTILINE)


def _user_env(home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAPTQ_", "XDG_", "PYTHONWARNINGS"))}
    return {**env, "HOME": str(home)}


def test_torchao_is_not_installed_with_daptq():
    """It is what made every process print "Failed to load ... torchao/_C_mxfp8" (transformers imports it)."""
    from importlib.util import find_spec

    assert find_spec("torchao") is None, "torchao is installed: `import transformers` imports it, noisily"


@pytest.mark.slow
def test_a_paired_eval_of_the_bundled_vla_prints_no_dependency_warnings(tmp_path):
    ref = "ref:metaworld-mt10"
    cmd = [sys.executable, "-m", "daptq.cli", "eval", ref, "--reference", ref]
    cmd += ["--tasks", "reach", "--episodes", "2", "--max-steps", "8", "--workers", "2"]
    cmd += ["--envs-per-worker", "1", "--no-progress", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_user_env(tmp_path / "home"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if NOISE.search(line)]
    assert noise == [], "\n".join(noise)
    assert "success" in proc.stdout.lower()
