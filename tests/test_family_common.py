"""The pieces the real-VLA families share (daptq.models.family_common): spec options, key mismatches in each
family's wording, safetensors shards, the weight-module scan and attention layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daptq.models.family_common import (
    MismatchFormat,
    compare_keys,
    parse_model_spec,
    qkv_layout,
    read_sharded_safetensors,
    require_inputs,
    resolve_shards,
    spec_dtype,
    spec_number,
    weight_modules,
    write_sharded_safetensors,
)


def test_spec_parsing_refuses_unknown_options_and_bad_values():
    path, o = parse_model_spec("fam:/x/y?a=1&dtype=bfloat16", "fam:", ("a", "dtype"), "fam:PATH[?a=N]")
    assert path == "/x/y" and spec_number("s", o, "a") == 1 and spec_dtype("s", o) is torch.bfloat16
    assert spec_number("s", o, "b", float, 2.5) == 2.5 and spec_dtype("s", {}) is torch.float32
    with pytest.raises(ValueError, match=r"expected fam:PATH\[\?a=N\]"):
        parse_model_spec("fam:?a=1", "fam:", ("a",), "fam:PATH[?a=N]")
    with pytest.raises(ValueError, match=r"unknown options \['b'\]; known: \['a'\]"):
        parse_model_spec("fam:/x?b=1", "fam:", ("a",), "fam:PATH")
    with pytest.raises(ValueError, match="model spec 's': invalid literal"):
        spec_number("s", {"a": "x"}, "a")
    with pytest.raises(ValueError, match="dtype must be one of"):
        spec_dtype("s", {"dtype": "int8"})


def test_key_mismatch_wording_per_family_format():
    want = {"a": (2, 3), "b": (4,), "c": (1,)}
    got = {"a": torch.zeros(2, 4), "c": torch.zeros(1), "d": torch.zeros(1)}
    m = compare_keys(want, got)
    assert (m.missing, m.unexpected) == (["b"], ["d"])
    assert m.message("DIR", "X") == (
        "DIR does not match the X architecture: 1 missing: b | 1 unexpected: d | "
        "1 mis-shaped: a: file (2, 4), model (2, 3)"
    )
    listed = MismatchFormat(("missing keys", "unexpected keys", "wrong shapes"), counted=False, part_sep="; ")
    assert compare_keys(want, got).message("f", "Y", listed) == (
        "f does not match the Y architecture: missing keys (1): ['b']; unexpected keys (1): ['d']; "
        "wrong shapes (1): ['a: file (2, 4), model (2, 3)']"
    )
    many = compare_keys({f"k{i}": (1,) for i in range(23)}, {}, optional={"k0"})
    assert MismatchFormat().part("missing", many.missing).endswith("k20 (+2 more)")
    assert not compare_keys(want, {k: torch.zeros(s) for k, s in want.items()})
    compare_keys(want, {k: torch.zeros(s) for k, s in want.items()}).raise_if_any("f", "Y")
    with pytest.raises(ValueError, match="1 missing: b"):
        m.raise_if_any("DIR", "X")


def test_shards_round_trip_and_refuse_a_missing_shard(tmp_path):
    state = {f"w{i}": torch.full((2,), float(i)) for i in range(5)}
    write_sharded_safetensors(tmp_path, state)
    shards, index = resolve_shards(tmp_path)
    assert len(shards) == 2 and index is not None
    back = read_sharded_safetensors(shards, index)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are missing"):
        resolve_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        resolve_shards(tmp_path / "nothing")


def test_weight_scan_layouts_and_batch_check():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Conv2d(1, 1, 1), nn.Linear(2, 2)), nn.ReLU())
    assert [(n, k) for n, _, k in weight_modules(model, skip=("1.1",))] == [
        ("0", "linear"),
        ("1.0", "conv2d"),
    ]
    assert [k for *_, k in weight_modules(model, extra={nn.ReLU: "relu"})][-1] == "relu"
    a = qkv_layout("l.0.self_attn", 8, "backbone", kv_heads=8, block=0, stack="s")
    assert (a.q, a.out, a.kv_heads) == ("l.0.self_attn.q_proj", "l.0.self_attn.o_proj", None)
    assert qkv_layout("p", 8, "backbone", kv_heads=2).kv_heads == 2
    with pytest.raises(ValueError, match=r"F batch is missing \['y'\] \(has \['x'\]\); build it"):
        require_inputs({"x": 1}, ("x", "y"), "F", "build it")


def test_choose_entry_names_the_choices():
    from daptq.models.family_common import choose_entry

    kw = {"expected": "a mapping", "holds": "{n} sets", "name_one": "name one (x:P?k=N)", "noun": "set"}
    assert choose_entry({"a": 1}, None, "f.json", **kw) == "a"
    assert choose_entry({"a": 1, "b": 2}, "b", "f.json", **kw) == "b"
    with pytest.raises(
        ValueError, match=r"f.json holds 2 sets: name one \(x:P\?k=N\); choices: \['a', 'b'\]"
    ):
        choose_entry({"a": 1, "b": 2}, None, "f.json", **kw)
    with pytest.raises(ValueError, match=r"f.json: no set 'c'; choices: \['a'\]"):
        choose_entry({"a": 1}, "c", "f.json", **kw)
    with pytest.raises(ValueError, match="f.json: expected a mapping"):
        choose_entry({}, None, "f.json", **kw)
