"""A CogACT run's ``.pt`` converted once into streamed safetensors shards: tensors only, checked against the
architecture, written all or nothing; the streamed model equals the run's model block for block."""

from __future__ import annotations

import shutil

import pytest
import torch

from daptq.models.cogact.streamed import convert_cogact_run, load_streamed_cogact
from daptq.models.cogact.testing import tiny_cogact, tiny_tokenizer, write_tiny_run
from daptq.models.streaming import INDEX_FILE


def test_converted_run_streams_the_same_weights(tmp_path):
    run = write_tiny_run(tmp_path / "run")
    out = convert_cogact_run(run, tmp_path / "streamed", max_shard_bytes=1 << 16)
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "dataset_statistics.json").is_file() and (out / "tokenizer").is_dir()
    adapter, loader = load_streamed_cogact(out, tiny_tokenizer())
    model = adapter.model
    for name in adapter.block_modules().values():
        loader.load_block(name, model.get_submodule(name))
    expected = tiny_cogact(0).state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_conversion_refuses_objects_and_leaves_nothing_behind(tmp_path, monkeypatch):
    run = write_tiny_run(tmp_path / "run")
    with pytest.raises(FileExistsError, match="exists"):
        convert_cogact_run(run, run)
    # a failure after the shards are written: neither the directory nor a temporary one remains
    monkeypatch.setattr(shutil, "copyfile", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        convert_cogact_run(run, tmp_path / "streamed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    pt = run / "checkpoints" / "latest-checkpoint.pt"
    state = torch.load(pt, weights_only=True)
    state["model"]["projector"]["note"] = "not a tensor"
    torch.save(state, pt)
    with pytest.raises(ValueError, match="non-tensor"):
        convert_cogact_run(run, tmp_path / "streamed")
    assert not (tmp_path / "streamed").exists()
