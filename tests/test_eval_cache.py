"""The reference-rollout cache and the FP reseed floor."""

import json

import numpy as np
import pytest

from daptq.eval import evaluate, store, write_report
from daptq.eval.summary import format_summary

pytestmark = pytest.mark.slow

FAST = {"tasks": ["reach"], "episodes": 2, "max_steps": 12, "image_size": 16, "progress": False}
RESULT_ONLY = ("wall_s", "simulated_steps", "reference_cached")  # how an episode was computed, not what


def _results(run_dir):
    return {
        (r["task"], r["seed"]): {k: v for k, v in r.items() if k not in RESULT_ONLY}
        for r in store.read_records(run_dir)
    }


def _entries(cache):
    return sorted(cache.glob("*.npz")) if cache.exists() else []


def test_second_method_hits_the_cache_and_gets_the_same_episodes(tmp_path):
    cache = tmp_path / "cache"
    first = evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "a", reference_cache=cache, **FAST)
    assert len(_entries(cache)) == 4  # reference + reseed floor per episode
    assert all(r["reference_cached"] is False for r in store.read_records(tmp_path / "a"))
    # The same method again, uncached, is the reference result: the cache changes nothing.
    uncached = evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "b", **FAST)
    assert _results(tmp_path / "a") == _results(tmp_path / "b")
    assert first["overall"] == uncached["overall"]
    # A second method runs no reference rollout at all: only the candidate's steps are simulated.
    evaluate("toy:weight_noise=0.5", "toy", out=tmp_path / "c", reference_cache=cache, **FAST)
    for r in store.read_records(tmp_path / "c"):
        assert r["reference_cached"] is True and r["simulated_steps"] == r["steps"]
    assert len(_entries(cache)) == 4


def test_fp_against_its_cached_self_has_exactly_zero_drift(tmp_path):
    cache = tmp_path / "cache"
    evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "warm", reference_cache=cache, **FAST)
    s = evaluate("toy", "toy", out=tmp_path / "fp", reference_cache=cache, workers=2, **FAST)
    assert s["overall"]["drift_max_mean"] == 0.0 and s["overall"]["action_mae_mean"] == [0.0] * 4
    for r in store.read_records(tmp_path / "fp"):
        assert r["reference_cached"] is True
        arrays = store.load_arrays(tmp_path / "fp", r["task"], r["seed"])
        np.testing.assert_array_equal(arrays["ee"], arrays["ref_ee"])


def test_a_changed_key_or_a_damaged_entry_is_recomputed(tmp_path):
    cache = tmp_path / "cache"
    evaluate("toy", "toy", out=tmp_path / "a", reference_cache=cache, **FAST)
    before = set(_entries(cache))
    # Another step limit is another key: new entries, none reused.
    evaluate("toy", "toy", out=tmp_path / "b", reference_cache=cache, **{**FAST, "max_steps": 10})
    assert all(r["reference_cached"] is False for r in store.read_records(tmp_path / "b"))
    assert len(set(_entries(cache)) - before) == 4
    # Another reference model (same spec form, other weights) is another key as well.
    evaluate("toy", "toy:seed=1", out=tmp_path / "c", reference_cache=cache, **FAST)
    assert all(r["reference_cached"] is False for r in store.read_records(tmp_path / "c"))
    # Damaged entries (garbage, or a valid file holding another key's rollout) are recomputed, not trusted.
    entries = sorted(before)
    entries[0].write_bytes(b"garbage")
    other = np.load(sorted(set(_entries(cache)) - before)[0])
    store.atomic_save_npz(entries[1], {k: other[k] for k in other.files})
    evaluate("toy", "toy", out=tmp_path / "d", reference_cache=cache, **FAST)
    assert _results(tmp_path / "d") == _results(tmp_path / "a")
    assert sum(r["reference_cached"] is False for r in store.read_records(tmp_path / "d")) >= 1


def test_the_reseed_floor_is_reported_beside_every_drift(tmp_path):
    s = evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "run", **FAST)
    o = s["overall"]
    assert o["floor_drift_mean"] > 0  # the toy samples noise: a new seed alone moves the arm
    assert o["drift_to_floor_ratio"] == pytest.approx(o["drift_mean"] / o["floor_drift_mean"])
    records = store.read_records(tmp_path / "run")
    assert all(r["floor_drift_mean"] > 0 and "floor_time_to_divergence" in r for r in records)
    assert "floor cm" in format_summary(s) and "drift/floor" in format_summary(s)
    text = write_report(tmp_path / "run").read_text()
    assert "FP reseed floor" in text and f"{o['drift_to_floor_ratio']:.2f}" in text
    config = json.loads((tmp_path / "run" / store.CONFIG_NAME).read_text())
    assert config["run"]["reseed_floor"] is True and config["run"]["floor_seed_offset"] > 0
    # The floor is the reference against itself re-seeded: recompute it by hand from the arrays.
    from daptq.eval.metrics import drift_metrics

    for r in records:
        arrays = store.load_arrays(tmp_path / "run", r["task"], r["seed"])
        assert drift_metrics(arrays["floor_ee"], arrays["ref_ee"])["drift_mean"] == r["floor_drift_mean"]
    off = evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "off", reseed_floor=False, **FAST)
    assert off["overall"]["floor_drift_mean"] is None and off["overall"]["drift_mean"] == o["drift_mean"]
