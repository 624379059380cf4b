"""The run directory's episode log and atomic writes (no simulator)."""

import json

import numpy as np
import pytest

from daptq.eval import store


def _log_with(tmp_path, payload: bytes) -> store.EpisodeLog:
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(payload)
    return store.EpisodeLog(path)


def test_append_and_read_round_trip(tmp_path):
    log = store.EpisodeLog(tmp_path / "episodes.jsonl")
    assert log.read() == []
    log.append({"task": "reach", "seed": 1, "drift": 0.5})
    log.append({"task": "reach", "seed": 2, "drift": None})
    assert log.read() == [
        {"task": "reach", "seed": 1, "drift": 0.5},
        {"task": "reach", "seed": 2, "drift": None},
    ]
    with pytest.raises(ValueError):
        log.append(
            {"task": "reach", "seed": 3, "drift": float("nan")}
        )  # NaN is not JSON: refuse, don't write
    assert len(log.read()) == 2


@pytest.mark.parametrize("tail", [b'{"task": "push", "se', b'{"task": "push"}', b"{garbage\n"])
def test_torn_last_line_is_dropped_and_repaired(tmp_path, tail):
    good = b'{"seed": 1, "task": "reach"}\n'
    log = _log_with(tmp_path, good + tail)
    assert log.read() == [{"seed": 1, "task": "reach"}]
    assert log.path.read_bytes() == good + tail  # reading alone never modifies the file
    assert log.read(repair=True) == [{"seed": 1, "task": "reach"}]
    assert log.path.read_bytes() == good
    log.append({"seed": 2, "task": "reach"})
    assert [r["seed"] for r in log.read()] == [1, 2]


def test_corruption_before_the_last_line_raises(tmp_path):
    log = _log_with(tmp_path, b'{"seed": 1}\n[1, 2]\n{"seed": 3}\n')
    with pytest.raises(ValueError, match="line 2 is corrupted"):
        log.read(repair=True)
    assert log.path.read_bytes() == b'{"seed": 1}\n[1, 2]\n{"seed": 3}\n'


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    store.atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    store.atomic_save_npz(tmp_path / "episodes" / "reach_1.npz", {"ee": np.zeros((3, 3), np.float32)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    np.testing.assert_array_equal(store.load_arrays(tmp_path, "reach", 1)["ee"], np.zeros((3, 3)))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "episodes", "reach_1.npz"]
    with pytest.raises(FileNotFoundError, match="arrays of episode push seed 1"):
        store.load_arrays(tmp_path, "push", 1)


def test_read_config_rejects_foreign_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.read_config(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        store.read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": store.RUN_FORMAT, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        store.read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="unreadable"):
        store.read_config(tmp_path)
