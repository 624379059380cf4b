"""benchmarks/paired_drift.py: episodes matched by (task, seed), the ratio with its interval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_helpers import load_benchmark


def _module():
    return load_benchmark("paired_drift")


def _run(directory: Path, drifts: dict[tuple[str, int], float]) -> Path:
    directory.mkdir(parents=True)
    lines = [json.dumps({"task": t, "seed": s, "drift_mean": d}) for (t, s), d in drifts.items()]
    (directory / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_ratio_interval_and_pairing(tmp_path):
    pd = _module()
    r = np.random.default_rng(0)
    ref = {("reach", s): float(d) for s, d in enumerate(r.uniform(0.5, 1.5, 60))}
    cand = {k: 0.5 * v for k, v in reversed(list(ref.items()))}  # written in another order: matched by key
    a, b = _run(tmp_path / "a", cand), _run(tmp_path / "b", ref)
    pd.main([str(a), str(b), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["episodes"] == 60 and result["ratio"] == pytest.approx(0.5)
    lo, hi = result["ratio_ci95"]
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # every pair has ratio 0.5
    assert result["wilcoxon_p"] < 1e-6 and result["difference"] < 0
    noisy = {k: v * float(r.uniform(0.3, 0.9)) for k, v in ref.items()}
    pd.main([str(_run(tmp_path / "c", noisy)), str(b), "--out", str(tmp_path / "noisy")])
    lo, hi = json.loads((tmp_path / "noisy.json").read_text())["ratio_ci95"]
    assert 0.3 < lo < hi < 0.9
    unpaired = _run(tmp_path / "d", {("push", 1): 1.0})
    with pytest.raises(SystemExit, match="not a field of every episode"):
        pd.main([str(a), str(b), "--metric", "drift_max", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="not paired"):
        pd.main([str(unpaired), str(b), "--out", str(tmp_path / "x")])
