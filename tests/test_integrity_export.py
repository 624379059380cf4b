"""ONNX exports under careless or hostile use: --overwrite replaces only an export (never a source or a
user's directory), every manifest field is checksummed and validated before anything is allocated, saves
are directory-atomic and recover, and OnnxPolicy replays chunks through ChunkedPolicy exactly as before."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from daptq import atomic
from daptq.cli import main
from daptq.deploy import OnnxPolicy, export_reference_policy
from daptq.deploy.bench import reference_w4a8_recipe
from daptq.deploy.export import MANIFEST, read_manifest
from daptq.integrity import signed
from daptq.models.policy import ChunkedPolicy
from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig
from daptq.models.registry import load_policy
from daptq.quant import quantize_

torch.set_num_threads(1)
TOY = ReferenceVLAConfig(
    image_size=32, d_model=64, n_layer=2, n_head=4, dit_d_model=64, dit_n_layer=1, dit_n_head=4
)


def observation(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
        "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32),
        "instruction": "push the puck to the goal",
    }


@pytest.fixture(scope="module")
def quant():
    torch.manual_seed(0)
    model = ReferenceVLA(TOY)
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    policy = ReferencePolicy(copy.deepcopy(model))
    with torch.no_grad():
        quantize_(policy.model, reference_w4a8_recipe(group_size=32))
    return policy


@pytest.fixture(scope="module")
def export_dir(quant, tmp_path_factory):
    return export_reference_policy(quant, tmp_path_factory.mktemp("onnx") / "exp", w4a8_kernel="emulate")


@pytest.fixture
def copied(export_dir, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(export_dir, out)
    return out


def _edit(directory, fn, resign=False):
    path = directory / MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(signed(m) if resign else m))


# ---- data loss ------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_directory_that_is_not_an_export(quant, tmp_path):
    user = tmp_path / "project"
    user.mkdir()
    (user / "config.json").write_text("{}")
    (user / "train.py").write_text("print('mine')")
    with pytest.raises(ValueError, match="not an ONNX export"):
        export_reference_policy(quant, user, overwrite=True)
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "train.py"]


def test_cli_overwrite_refuses_a_users_directory_before_loading(tmp_path, capsys):
    user = tmp_path / "hf-model"
    user.mkdir()
    (user / "config.json").write_text('{"model_type": "llama"}')
    (user / "model.safetensors").write_text("weights")
    assert main(["export", "ref:metaworld-mt10", "--out", str(user), "--overwrite"]) == 2
    assert "error:" in capsys.readouterr().err
    assert (user / "model.safetensors").read_text() == "weights"


def test_export_never_replaces_its_source(tmp_path, capsys):
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.workflow import quantize_to_directory
    from daptq.quant import QuantSpec, WeightSpec

    qdir = quantize_to_directory("toy", RTNConfig(spec=QuantSpec(WeightSpec(8))), tmp_path / "q")
    before = sorted(p.name for p in qdir.iterdir())
    assert main(["export", str(qdir), "--out", str(qdir), "--overwrite"]) == 2
    assert "model being read" in capsys.readouterr().err
    assert sorted(p.name for p in qdir.iterdir()) == before
    load_policy(str(qdir))


def test_overwrite_replaces_an_earlier_export_and_refuses_one_with_a_users_file(quant, copied):
    (copied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        export_reference_policy(quant, copied, w4a8_kernel="emulate", overwrite=True)
    (copied / "notes.txt").unlink()
    export_reference_policy(quant, copied, w4a8_kernel="int8", overwrite=True)
    assert read_manifest(copied)["w4a8_kernel"] == "int8"
    assert sorted(p.name for p in copied.parent.iterdir()) == ["exp"]


# ---- unchecked fields -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["model"].update(n_action_steps=2),
        lambda m: m["action_space"].update(low=-0.5),
        lambda m: m["action_space"].update(high=0.3),
        lambda m: m["model"].update(num_inference_steps=3),
        lambda m: m.update(source="ref:other"),
    ],
)
def test_edited_manifest_is_refused(copied, edit):
    _edit(copied, edit)
    with pytest.raises(ValueError, match="content checksum mismatch"):
        OnnxPolicy(copied)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m["model"].update(chunk_size=1e9), "model.chunk_size"),
        (lambda m: m["model"].update(chunk_size=10**9), "model.chunk_size"),
        (lambda m: m["model"].update(n_action_steps=99), "model.n_action_steps"),
        (lambda m: m["model"].update(num_inference_steps=0), "model.num_inference_steps"),
        (lambda m: m["model"].update(num_inference_steps=1000), "model.num_inference_steps"),
        (lambda m: m["model"].update(image_size=100000), "model.image_size"),
        (lambda m: m.update(action_space="delta-eef"), "action_space"),
        (lambda m: m["action_space"].update(low=1.0, high=-1.0), "action_space.low/high"),
        (lambda m: m["action_space"].update(names=["dx"]), "action_space.names"),
        (lambda m: m["action_space"].update(kinds=["warp"] * 4), "action_space.kinds"),
        (lambda m: m["sha256"].pop("denoiser.onnx"), "sha256"),
        (lambda m: m["state_stats"].update(std=[0.0] * 4), "state_stats.std"),
        (lambda m: m.update(w4a8_kernel="fast"), "w4a8_kernel"),
        (lambda m: m.update(extra=1), "(top level)"),
    ],
)
def test_resigned_bad_fields_are_refused_before_allocation(copied, edit, field):
    _edit(copied, edit, resign=True)
    with pytest.raises(ValueError, match=re.escape(f"manifest field '{field}'")):
        OnnxPolicy(copied)


def test_manifest_without_a_content_checksum_is_refused(copied):
    _edit(copied, lambda m: m.pop("content_sha256"))
    with pytest.raises(ValueError, match="content_sha256"):
        read_manifest(copied)


def test_flipped_graph_byte_is_refused(copied):
    graph = copied / "condition.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        OnnxPolicy(copied)


# ---- torn saves -----------------------------------------------------------------------------------------
def test_export_dying_mid_swap_keeps_the_previous_export(quant, copied, monkeypatch):
    before = read_manifest(copied)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def dying(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", dying)
    with pytest.raises(OSError, match="killed"):
        export_reference_policy(quant, copied, w4a8_kernel="int8", overwrite=True)
    monkeypatch.undo()
    assert read_manifest(copied) == before
    assert sorted(p.name for p in copied.parent.iterdir()) == ["exp"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_load_after_a_torn_swap_restores_the_export(copied):
    """What a kill -9 between the two renames leaves: no target, the old export hidden beside it."""
    pid = _dead_pid()
    hidden_old = copied.parent / f".exp.daptq-old-{pid}-0a1b"
    hidden_new = copied.parent / f".exp.daptq-tmp-{pid}-2c3d"
    os.rename(copied, hidden_old)
    hidden_new.mkdir()
    policy = load_policy(f"onnx:{copied}")
    assert isinstance(policy, OnnxPolicy)
    assert sorted(p.name for p in copied.parent.iterdir()) == ["exp"]


# ---- ChunkedPolicy --------------------------------------------------------------------------------------
def test_onnx_policy_queues_chunks_as_before(export_dir):
    """select_action through ChunkedPolicy equals the old queue: the first n_action_steps of each chunk,
    noise drawn in order from the generator reset(seed) seeded."""
    policy = OnnxPolicy(export_dir)
    assert isinstance(policy, ChunkedPolicy)
    obs = observation(1)
    n = TOY.n_action_steps
    policy.reset(seed=7)
    got = np.stack([policy.select_action(obs) for _ in range(2 * n + 1)])
    gen = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(3):
        chunk = policy.predict_chunk(policy.observation_to_batch(obs), generator=gen)
        expected.extend(chunk[0, :n].numpy().astype(np.float32))
    np.testing.assert_array_equal(got, np.stack(expected[: 2 * n + 1]))
    assert got.dtype == np.float32


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"format": "daptq-onnx", "format": "daptq-onnx", "version": 2}'],
)
def test_malformed_manifest_is_a_clear_error(copied, text):
    (copied / MANIFEST).write_text(text)
    with pytest.raises(ValueError, match="invalid JSON"):
        OnnxPolicy(copied)
