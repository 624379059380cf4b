"""Quantized policies on disk: quantize -> eval -> inspect end to end, integrity, atomic saves, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from daptq import atomic
from daptq.cli import main
from daptq.integrity import signed
from daptq.methods.rtn import RTNConfig
from daptq.methods.workflow import config_from_options, quantize_to_directory
from daptq.models import quantized as qdir
from daptq.models.registry import load_policy
from daptq.quant import QuantLinear, QuantSpec, WeightSpec

SPEC = QuantSpec(WeightSpec(4, granularity="per_group", group_size=8))


@pytest.fixture
def saved(tmp_path):
    return quantize_to_directory("toy", RTNConfig(spec=SPEC), tmp_path / "q")


def _batch(policy):
    rng = np.random.default_rng(1)
    raw = {"state": rng.uniform(-0.2, 0.8, (5, 4)).astype(np.float32), "instruction": ["push the puck"] * 5}
    adapter = getattr(policy, "adapter", None) or policy  # the adapter is split from the policy (#24)
    return next(adapter.calibration_batches(iter([raw])))


def test_reload_in_a_new_policy_is_bit_exact(saved):
    from daptq.methods import quantize_policy

    expected = load_policy("toy")
    quantize_policy(expected, RTNConfig(spec=SPEC))
    loaded = load_policy(str(saved))
    assert isinstance(loaded.net[2], QuantLinear)
    b = _batch(loaded)
    g = torch.Generator().manual_seed(0)
    out = loaded.predict_chunk(b, generator=g)
    assert torch.equal(out, expected.predict_chunk(b, generator=torch.Generator().manual_seed(0)))
    assert loaded.quant_record.method == "rtn" and loaded.recipe["w_bits"] == 4
    assert not torch.equal(
        out, load_policy("toy").predict_chunk(b, generator=torch.Generator().manual_seed(0))
    )


def test_unchanged_base_tensors_are_not_copied(saved):
    stored = load_file(saved / qdir.TENSORS_FILE)
    assert "centre" not in stored and "half_extent" not in stored  # identical to the base model's
    assert "net.0.qweight_packed" in stored and "net.0.weight" not in stored


def test_flipped_bytes_in_tensor_data_are_detected(saved):
    path = saved / qdir.TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data, not the header: safetensors itself would load this silently
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_policy(str(saved))


def test_tampered_config_and_missing_record_are_detected(saved):
    cfg = json.loads((saved / qdir.BASE_CONFIG_FILE).read_text())
    cfg["base_model"]["spec"] = "toy:seed=1"
    (saved / qdir.BASE_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_policy(str(saved))
    (saved / qdir.QUANT_CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="written last"):
        load_policy(str(saved))


def test_base_model_digest_must_match(tmp_path, saved):
    """A re-signed directory pointing at another base model is refused by the base digest."""
    cfg = json.loads((saved / qdir.BASE_CONFIG_FILE).read_text())
    cfg["base_model"]["spec"] = "toy:seed=1"
    (saved / qdir.BASE_CONFIG_FILE).write_text(json.dumps(cfg))
    q = json.loads((saved / qdir.QUANT_CONFIG_FILE).read_text())
    q["files"][qdir.BASE_CONFIG_FILE] = qdir.sha256_file(saved / qdir.BASE_CONFIG_FILE)
    (saved / qdir.QUANT_CONFIG_FILE).write_text(json.dumps(signed(q)))
    with pytest.raises(ValueError, match="digest"):
        load_policy(str(saved))


def test_save_dying_between_renames_never_loads_as_a_mixed_model(tmp_path, saved, monkeypatch):
    """Replace an existing directory and die after the old one moved aside: what is left loads as the old
    model or not at all, never new weights beside an old config."""
    before = load_policy(str(saved)).predict_chunk(
        _batch(load_policy("toy")), torch.Generator().manual_seed(0)
    )
    real_rename = os.rename
    calls = []

    def dying_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the rename of the new directory into place (after the old one moved aside)
            raise OSError("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename swap
    monkeypatch.setattr(atomic.os, "rename", dying_rename)
    w8 = RTNConfig(spec=QuantSpec(WeightSpec(8)))
    with pytest.raises(OSError, match="killed"):
        quantize_to_directory("toy", w8, saved)
    monkeypatch.undo()
    assert saved.exists()  # the old directory was put back
    if saved.exists():
        after = load_policy(str(saved)).predict_chunk(
            _batch(load_policy("toy")), torch.Generator().manual_seed(0)
        )
        assert torch.equal(before, after)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the half-written new directory was removed


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a quantized policy directory"):
        quantize_to_directory("toy", RTNConfig(spec=SPEC), tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_config_from_options_and_yaml(tmp_path):
    cfg = config_from_options("rtn", w_bits=4, a_bits=8, group_size=32)
    assert cfg.spec.weight.group_size == 32 and cfg.spec.activation.bits == 8
    path = tmp_path / "rtn.yaml"
    path.write_text(cfg.to_yaml())
    assert config_from_options("rtn", str(path)) == cfg
    path.write_text("spec:\n  weight:\n    bits: 4\n    symmetric: 'false'\n")
    with pytest.raises(ValueError, match="symmetric"):
        config_from_options("rtn", str(path))
    with pytest.raises(ValueError, match="not both"):
        config_from_options("rtn", str(path), w_bits=4)
    with pytest.raises(ValueError, match="unknown method"):
        config_from_options("nope")


def test_cli_quantize_eval_inspect_end_to_end(tmp_path, capsys):
    out = tmp_path / "toy-w4"
    assert (
        main(["quantize", "toy", "--method", "rtn", "--w-bits", "4", "--group-size", "8", "--out", str(out)])
        == 0
    )
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| net.0 | backbone | 32x12 | W4g6-symfull-minmax |" in text and "group 6" in text
    run = tmp_path / "run"
    args = [
        "eval",
        str(out),
        "--reference",
        "toy",
        "--tasks",
        "reach",
        "--episodes",
        "1",
        "--max-steps",
        "12",
    ]
    assert main([*args, "--out", str(run), "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["candidate"]["recipe"]["method"] == "rtn" and config["candidate"]["recipe"]["w_bits"] == 4
    assert main(["methods"]) == 0
    assert "rtn (config RTNConfig" in capsys.readouterr().out


def test_cli_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["quantize", "toy", "--method", "nope", "--w-bits", "4", "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["quantize", "toy", "--method", "rtn", "--w-bits", "5", "--out", str(out)]) == 2
    assert "bits must be one of" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_model_digest_covers_scalars_and_changes_with_any_tensor():
    model = torch.nn.Linear(3, 2)
    model.register_buffer("step", torch.tensor(3))  # a 0-dim tensor
    d = qdir.model_digest(model)
    assert d == qdir.model_digest(model)
    model.step += 1
    assert qdir.model_digest(model) != d
