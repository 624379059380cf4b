"""Files an evaluation reads back (reference-cache entries, a run's episode arrays and records) are checked
against a digest of their content and validated before use: damaged or forged ones are dropped and
recomputed, never trusted and never a crash."""

import json
import math
import warnings
import zipfile

import numpy as np
import pytest

from daptq.eval import evaluate, store, write_report
from daptq.eval.cache import ReferenceCache

pytestmark = pytest.mark.slow

FAST = {"tasks": ["reach"], "max_steps": 12, "image_size": 16, "progress": False}
RESULT_ONLY = ("wall_s", "simulated_steps", "reference_cached")  # how an episode was computed, not what


def _results(run_dir):
    return {
        (r["task"], r["seed"]): {k: v for k, v in r.items() if k not in RESULT_ONLY}
        for r in store.read_records(run_dir)
    }


def flip_compressed_byte(path):
    """Flip the first byte of the compressed data of the file's largest zip member (its deflate block
    header: zlib.error on reading, where a flip further in is a CRC mismatch)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ reference cache


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A paired run that filled a reference cache, and the records it gave."""
    root = tmp_path_factory.mktemp("cached")
    cache = root / "cache"
    evaluate("toy:weight_noise=0.2", "toy", episodes=1, out=root / "first", reference_cache=cache, **FAST)
    return root, cache, _results(root / "first")


def _entries(cache):
    return sorted(cache.glob("*.npz"))


def test_a_flipped_byte_in_a_cache_entry_is_recomputed_not_a_crash(cached, tmp_path):
    root, cache, want = cached
    work = tmp_path / "cache"
    work.mkdir()
    for entry in _entries(cache):
        (work / entry.name).write_bytes(entry.read_bytes())
    for entry in _entries(work):
        flip_compressed_byte(entry)
    evaluate("toy:weight_noise=0.2", "toy", episodes=1, out=tmp_path / "run", reference_cache=work, **FAST)
    assert _results(tmp_path / "run") == want
    assert all(r["reference_cached"] is False for r in store.read_records(tmp_path / "run"))


def test_a_forged_entry_with_the_right_key_is_not_trusted(cached, tmp_path):
    root, cache, want = cached
    work = tmp_path / "cache"
    work.mkdir()
    for entry in _entries(cache):
        with np.load(entry) as data:
            arrays = {k: data[k] for k in data.files}
        # Well formed, the right key, the digest (if any) carried over unchanged: the path moved 5 cm and
        # the outcome flipped.
        arrays["ee"] = arrays["ee"] + np.float32(0.05)
        arrays["success"] = np.asarray(not bool(arrays["success"]))
        np.savez_compressed(work / entry.name, **arrays)
    evaluate("toy:weight_noise=0.2", "toy", episodes=1, out=tmp_path / "run", reference_cache=work, **FAST)
    assert _results(tmp_path / "run") == want  # the forged reference changed nothing
    assert all(r["reference_cached"] is False for r in store.read_records(tmp_path / "run"))


def test_the_cache_digest_binds_the_key_and_every_array(cached):
    root, cache, _ = cached
    config = store.read_config(root / "first")
    from daptq.eval.cache import base_key

    rc = ReferenceCache(cache, base_key(config["run"], config["reference"]))
    key = rc.key("reach", config["run"]["seed_start"], config["run"]["seed_start"], 12)
    rollout = rc.get(key)
    assert rollout is not None  # the intact entry is a hit
    for change in ("ee", "actions", "success", "key"):
        path = rc.path(key)
        original = path.read_bytes()
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
            if change == "success":
                arrays[change] = np.asarray(not bool(arrays[change]))
            elif change == "key":  # the entry of another key, renamed to this one
                other = json.loads(bytes(arrays["key"]).decode())
                other["max_steps"] += 1
                arrays["key"] = np.frombuffer(json.dumps(other, sort_keys=True).encode(), np.uint8)
            else:
                arrays[change] = arrays[change].copy()
                arrays[change][0, 0] += 0.01
            np.savez_compressed(path, **arrays)
            assert rc.get(key) is None, change
        finally:
            path.write_bytes(original)


# ---------------------------------------------------------------------------------------------- run files


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished paired run of 3 episodes, copied per test."""
    root = tmp_path_factory.mktemp("finished")
    evaluate("toy:weight_noise=0.2", "toy", episodes=3, out=root / "run", **FAST)
    return root / "run"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _resume(run):
    return evaluate("toy:weight_noise=0.2", "toy", episodes=3, out=run, resume=True, **FAST)


def test_a_flipped_byte_in_an_episode_file_is_reported_and_re_run(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    want = _results(finished)
    seed = sorted(s for _, s in want)[1]
    flip_compressed_byte(store.arrays_path(run, "reach", seed))
    with pytest.warns(UserWarning, match=f"reach seed {seed}"):
        report = write_report(run)
    text = report.read_text()
    assert "Skipped episodes" in text and f"reach seed {seed}" in text  # the report says which and why
    with pytest.warns(UserWarning, match="1 damaged episode record"):
        summary = _resume(run)
    assert summary["complete"] and _results(run) == want


def test_an_episode_file_swapped_for_another_is_detected(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    want = _results(finished)
    a, b = sorted(s for _, s in want)[:2]
    pa, pb = store.arrays_path(run, "reach", a), store.arrays_path(run, "reach", b)
    da, db = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(db)
    pb.write_bytes(da)
    with pytest.warns(UserWarning, match="2 damaged episode record"):
        write_report(run)
    with pytest.warns(UserWarning, match="2 damaged episode record"):
        summary = _resume(run)
    assert summary["complete"] and _results(run) == want
    for r in store.read_records(run):
        assert store.arrays_problem(run, r, paired=True) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("drift_mean", math.nan),
        ("drift_max", math.inf),
        ("jerk", -math.inf),
        ("drift_mean", -1.0),
        ("steps", -3),
        ("hf_share", [math.nan, 0.0, 0.0, 0.0]),
        ("action_mae", [0.0]),
        ("time_to_divergence", "soon"),
        ("floor_drift_mean", math.nan),
    ],
)
def test_a_record_with_an_invalid_field_is_refused_at_resume(finished, tmp_path, field, value):
    run = _copy(finished, tmp_path / "run")
    want = _results(finished)
    log = run / store.EPISODES_NAME
    records = [json.loads(line) for line in log.read_text().splitlines()]
    records[0][field] = value
    log.write_text("".join(json.dumps(r) + "\n" for r in records))  # json.dumps writes NaN / Infinity
    with pytest.warns(UserWarning, match="1 damaged episode record"):
        summary = _resume(run)
    assert summary["complete"] and _results(run) == want
    assert summary["overall"] == evaluate_summary(finished)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(run)  # nothing damaged is left


def evaluate_summary(run):
    return json.loads((run / store.SUMMARY_NAME).read_text())["overall"]


def test_a_record_that_disagrees_with_its_arrays_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    log = run / store.EPISODES_NAME
    records = [json.loads(line) for line in log.read_text().splitlines()]
    records[0]["drift_mean"] = 0.0  # finite and plausible, but not what the arrays say
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match="drift_mean"):
        write_report(run)


def test_an_entry_that_cannot_be_written_is_skipped_not_a_crash(cached, tmp_path):
    root, cache, want = cached
    work = tmp_path / "cache"
    work.mkdir()
    for entry in _entries(cache):
        (work / entry.name).mkdir()  # a directory where the entry goes: neither read nor replaced
    with pytest.warns(UserWarning, match="reference cache"):
        evaluate(
            "toy:weight_noise=0.2", "toy", episodes=1, out=tmp_path / "run", reference_cache=work, **FAST
        )
    assert _results(tmp_path / "run") == want


@pytest.mark.parametrize(
    ("field", "value"), [("hf_cutoff", 0.9), ("divergence_threshold", math.nan), ("tasks", "reach")]
)
def test_a_damaged_run_config_is_a_clear_error(finished, tmp_path, field, value):
    run = _copy(finished, tmp_path / "run")
    config = json.loads((run / store.CONFIG_NAME).read_text())
    config["run"][field] = value
    (run / store.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f'config.json: "run.{field}" is'):
        write_report(run)


def test_report_skips_a_repeated_episode_and_one_outside_the_run(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    log = run / store.EPISODES_NAME
    records = [json.loads(line) for line in log.read_text().splitlines()]
    outside = {**records[0], "task": "../../elsewhere"}  # its arrays' path would leave the run directory
    log.write_text("".join(json.dumps(r) + "\n" for r in [*records, records[0], outside]))
    with pytest.warns(UserWarning, match="2 damaged episode record"):
        report = write_report(run)
    text = report.read_text()
    assert "repeats an episode" in text and "not an episode of this run" in text
    assert f"episodes: {len(records)} of {len(records)}" in text  # counted once
