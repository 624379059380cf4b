"""``daptq.quant`` checkpoints (save_quantized / load_quantized): every behaviour-deciding file checksummed,
only registered loaders, clear errors for edited layouts, and saves that never destroy the previous one."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from daptq.integrity import signed
from daptq.quant import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    QuantSpec,
    Recipe,
    WeightSpec,
    load_quantized,
    quantize_,
    save_quantized,
)
from daptq.quant import io as qio


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def quantized(bits=4):
    model = make_net()
    quantize_(model, Recipe.uniform(QuantSpec(WeightSpec(bits, granularity="per_group", group_size=8))))
    return model


@pytest.fixture
def saved(tmp_path):
    model = quantized()
    return model, save_quantized(model, tmp_path / "ckpt")


def _edit(path, fn, resign=False):
    cfg = json.loads((path / CONFIG_FILE).read_text())
    fn(cfg)
    (path / CONFIG_FILE).write_text(json.dumps(signed(cfg) if resign else cfg))


def test_config_without_files_and_a_flipped_byte_is_refused(saved):
    _, path = saved
    _edit(path, lambda c: c.pop("files"), resign=True)
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x10
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="'files'"):
        load_quantized(make_net, path)


def test_edited_layout_is_refused_by_the_content_checksum(saved):
    _, path = saved

    def add_activation(c):
        c["modules"]["0"]["spec"]["activation"] = {"bits": 8}

    _edit(path, add_activation)
    with pytest.raises(ValueError, match="content checksum mismatch"):
        load_quantized(make_net, path)


def test_edited_recipe_is_refused(saved):
    _, path = saved
    _edit(path, lambda c: c.update(recipe={"rules": []}))
    with pytest.raises(ValueError, match="content checksum mismatch"):
        load_quantized(make_net, path)


def test_resigned_bits_edit_is_a_clear_error_naming_the_layer(saved):
    """bits 4 -> 8 with the checksum recomputed: a ValueError naming the layer, not a RuntimeError."""
    _, path = saved

    def to_8(c):
        c["modules"]["0"]["spec"]["weight"]["bits"] = 8

    _edit(path, to_8, resign=True)
    with pytest.raises(ValueError, match=r"0\b.*(8-bit|layout)"):
        load_quantized(make_net, path)


def test_loader_outside_the_registry_is_never_called(saved, monkeypatch):
    _, path = saved
    called = []
    import daptq.eval.runner as runner

    monkeypatch.setattr(runner, "_git", lambda *a, **k: called.append(a), raising=False)

    def hostile(c):
        c["modules"]["0"] = {"loader": "daptq.eval.runner:_git", "type": "X", "weight_shape": [32, 16]}

    _edit(path, hostile, resign=True)
    with pytest.raises(ValueError, match="not a registered loader"):
        load_quantized(make_net, path)
    assert called == []


def test_registered_loaders_are_a_fixed_list():
    assert set(qio.CHECKPOINT_LOADERS) == {  # the custom layer types daptq defines, nothing else
        "daptq.methods.qvla:load_mixed_linear",
        "daptq.quant.category:load_category_linear",
    }
    with pytest.raises(ValueError, match="already registered"):
        qio.register_checkpoint_loader("daptq.methods.qvla:load_mixed_linear", lambda *a: None)


def test_save_that_dies_before_its_config_keeps_the_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    x = torch.randn(3, 16)
    before = load_quantized(make_net, path)(x)

    def dying(p, obj):
        raise OSError("killed before the config")

    monkeypatch.setattr(qio, "atomic_write_json", dying)
    with pytest.raises(OSError, match="killed"):
        save_quantized(quantized(8), path)
    monkeypatch.undo()
    assert torch.equal(load_quantized(make_net, path)(x), before)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]  # no temp directory left


def test_save_refuses_a_directory_it_did_not_write(tmp_path):
    user = tmp_path / "project"
    user.mkdir()
    (user / "config.json").write_text("{}")
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_quantized(quantized(), user)
    assert (user / "notes.txt").read_text() == "mine" and (user / "config.json").read_text() == "{}"


def test_save_refuses_a_checkpoint_with_a_users_file_in_it(saved):
    _, path = saved
    (path / "README.md").write_text("my notes")
    with pytest.raises(ValueError, match="README.md"):
        save_quantized(quantized(8), path)
    assert (path / "README.md").read_text() == "my notes"


def test_save_replaces_its_own_checkpoint(saved):
    _, path = saved
    model8 = quantized(8)
    save_quantized(model8, path)
    x = torch.randn(3, 16)
    assert torch.equal(load_quantized(make_net, path)(x), model8(x))
