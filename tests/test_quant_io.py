import hashlib
import json
import os
import pickle

import pytest
import torch
from torch import nn

from daptq.integrity import signed
from daptq.quant import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ActivationSpec,
    QuantLinear,
    QuantSpec,
    Recipe,
    Rule,
    WeightSpec,
    load_quantized,
    quantize_,
    read_config,
    save_quantized,
    to_deployable_,
    weight_only,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(288)
        self.fc1 = nn.Linear(288, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x):
        h = self.norm(self.conv(x).flatten(1))
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def make_net():
    torch.manual_seed(0)
    return Net()


RECIPE = Recipe(
    (
        Rule("*", QuantSpec(WeightSpec(4, granularity="per_group", group_size=32), ActivationSpec(8))),
        Rule(
            "conv",
            QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor", observer="mse")),
            "exact",
        ),
        Rule("fc2", QuantSpec(WeightSpec(3, False, "per_group", 16, observer="percentile")), "exact"),
        Rule(
            "out",
            QuantSpec(
                WeightSpec(2, granularity="per_tensor", observer="mse", scale_dtype="float32"),
                ActivationSpec(8, False, "static_per_tensor", "percentile"),
            ),
            "exact",
        ),
    )
)


@pytest.fixture
def saved(tmp_path):
    model = make_net()
    x = torch.randn(6, 3, 8, 8)
    quantize_(model, RECIPE, calibration=[x[:3], x[3:]])
    save_quantized(model, tmp_path, RECIPE)
    return model, x, tmp_path


def test_round_trip_is_bit_exact(saved):
    model, x, path = saved
    loaded = load_quantized(make_net, path)
    assert torch.equal(loaded(x), model(x))
    for name in ("conv", "fc1", "fc2", "out"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert a.spec == b.spec
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.weight_scale, b.weight_scale)
    assert torch.equal(loaded.norm.weight, model.norm.weight)
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])  # no temp files


def test_loading_into_differently_initialized_model(saved):
    model, x, path = saved
    torch.manual_seed(123)
    fresh = Net()
    assert torch.equal(load_quantized(fresh, path)(x), model(x))


def test_config_records_format_specs_and_recipe(saved):
    _, _, path = saved
    cfg = read_config(path)
    assert cfg["format_version"] == 2
    assert cfg["modules"]["fc2"]["spec"]["weight"]["bits"] == 3
    assert Recipe.from_dict(cfg["recipe"]) == RECIPE


def test_include_float_weights_keeps_originals(tmp_path):
    model = make_net()
    quantize_(model, Recipe.uniform(weight_only(4, "per_group", 32), exclude=["conv"]))
    save_quantized(model, tmp_path, include_float_weights=True)
    loaded = load_quantized(make_net(), tmp_path)
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_loaded_model_converts_to_deployable(saved):
    _, x, path = saved
    loaded = load_quantized(make_net, path)
    ref = loaded(x)
    report = to_deployable_(loaded)
    assert report.kept == ["conv", "fc1", "fc2", "out"]  # W4A8 / static / 3-bit / 2-bit: no kernels
    assert torch.equal(loaded(x), ref)


def test_missing_files(tmp_path, saved):
    _, _, path = saved
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_quantized(make_net, tmp_path / "nope")
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_quantized(make_net, path)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_quantized(make_net, path)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_safetensors(saved, keep):
    _, _, path = saved
    f = path / WEIGHTS_FILE
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match="truncated|corrupted|not a safetensors"):
        load_quantized(make_net, path)


def test_corrupted_header(saved):
    _, _, path = saved
    f = path / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[10:20] = b"\x00" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_quantized(make_net, path)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_where_safetensors_expected(saved, writer):
    _, _, path = saved
    f = path / WEIGHTS_FILE
    state = {"fc1.weight": torch.zeros(2)}
    if writer == "pickle":
        f.write_bytes(pickle.dumps(state, protocol=4))
    else:
        torch.save(state, f)
    with pytest.raises(ValueError, match="never unpickles"):
        load_quantized(make_net, path)


def test_bad_config(saved):
    _, _, path = saved
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg["format_version"] = 7
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 7"):
        load_quantized(make_net, path)
    (path / CONFIG_FILE).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(make_net, path)


def test_shape_mismatch_and_wrong_architecture(saved):
    _, _, path = saved

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(64, 48)

    with pytest.raises(ValueError, match="fc2: model weight shape"):
        load_quantized(Other, path)


def test_save_refuses_deployable_and_uncalibrated(tmp_path):
    model = make_net()
    quantize_(model, weight_only(8), strict=False)
    to_deployable_(model)
    with pytest.raises(ValueError, match="before to_deployable_"):
        save_quantized(model, tmp_path)
    model = make_net()
    quantize_(model, weight_only(8))
    model.fc1.spec = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))
    with pytest.raises(ValueError, match="not calibrated"):
        save_quantized(model, tmp_path / "x")
    assert isinstance(model.fc1, QuantLinear)


def test_failed_write_leaves_previous_checkpoint_intact(saved, monkeypatch):
    model, x, path = saved
    before = (path / WEIGHTS_FILE).read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, path)
    monkeypatch.undo()
    assert (path / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])  # temp file removed
    assert torch.equal(load_quantized(make_net, path)(x), model(x))


def test_config_that_is_not_an_object_is_a_clear_error(tmp_path):
    from daptq.quant.io import read_config

    (tmp_path / "quantization_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a daptq-quant config"):
        read_config(tmp_path)


def test_failed_load_leaves_the_model_untouched(saved):
    """A checkpoint that fails half way (here: a tensor missing for the last layer) must not leave the
    earlier layers converted."""
    from safetensors.torch import load_file, save_file

    _, _, path = saved
    tensors = load_file(path / WEIGHTS_FILE)
    del tensors["out.weight_scale"]
    save_file(tensors, path / WEIGHTS_FILE)
    cfg = json.loads((path / CONFIG_FILE).read_text())  # a consistent (re-signed) but incomplete checkpoint
    cfg["files"][WEIGHTS_FILE] = hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(signed(cfg)))
    target = make_net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    modules = dict(target.named_modules())
    with pytest.raises(ValueError, match="out.weight_scale"):
        load_quantized(target, path)
    assert dict(target.named_modules()) == modules
    assert not any(isinstance(m, QuantLinear) for m in target.modules())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_flipped_bytes_in_tensor_data_are_detected(saved):
    _, _, path = saved
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: safetensors alone loads this silently
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_quantized(make_net(), path)


def test_new_weights_beside_an_old_config_do_not_load(saved, tmp_path):
    """A save that died between its two renames: new weights file in place, the config still the old one."""
    model, x, path = saved
    other = make_net()
    quantize_(other, weight_only(8))
    save_quantized(other, tmp_path / "other")
    (path / WEIGHTS_FILE).write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_quantized(make_net(), path)
