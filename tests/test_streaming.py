"""Weights streamed from safetensors shards: a meta-built CogACT filled block by block quantizes to the same
weights as the in-memory model, and its peak resident memory grows with one block, not with the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from daptq.data.calibration import CalibrationSet
from daptq.methods import quantize_policy
from daptq.methods.gptq import GPTQConfig
from daptq.methods.sequential import quantize_policy_sequential
from daptq.models.cogact.adapter import CogACTAdapter
from daptq.models.cogact.streamed import load_streamed_cogact, write_streamed_cogact
from daptq.models.cogact.testing import tiny_cogact, tiny_tokenizer
from daptq.models.streaming import (
    INDEX_FILE,
    SafetensorsCheckpoint,
    resolve_device,
    save_block_state,
    write_shards,
)
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

INSTRUCTIONS = ["pick the coke can", "open the drawer", "move the red block left", "put spoon on towel"]
SPEC = QuantSpec(
    WeightSpec(4, granularity="per_group", group_size=16), ActivationSpec(8, mode="static_per_tensor")
)


def _raw(seed: int, n: int = 2) -> dict:
    r = np.random.default_rng(seed)
    actions = np.concatenate([r.uniform(-0.03, 0.03, (n, 4, 6)), r.integers(0, 2, (n, 4, 1))], -1)
    return {
        "image": r.integers(0, 256, (n, 36, 44, 3), dtype=np.uint8),
        "instruction": INSTRUCTIONS[:n],
        "actions": actions.astype(np.float32),
    }


def test_shards_round_trip_and_errors_name_what_is_missing(tmp_path):
    state = {f"w{i}": torch.randn(10, 10) for i in range(5)}
    write_shards(state, tmp_path, max_shard_bytes=900)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 3  # two 400-byte tensors per 900-byte shard
    ckpt = SafetensorsCheckpoint(tmp_path)
    got = ckpt.read(["w3", "w0"])
    assert torch.equal(got["w3"], state["w3"]) and torch.equal(got["w0"], state["w0"])
    with pytest.raises(KeyError, match="no tensor"):
        ckpt.read(["nope"])
    (tmp_path / index["weight_map"]["w4"]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        SafetensorsCheckpoint(tmp_path)


def test_a_random_checkpoint_is_written_shard_by_shard_from_the_meta_device(tmp_path):
    """The scale benchmark's writer (the 7B shape cannot be built whole here): every tensor of the
    architecture, drawn per shard by name (so the same on every run), loads through the streamed path."""
    from daptq.models.cogact.config import CogACTConfig
    from daptq.models.cogact.testing import write_random_streamed_cogact

    config = CogACTConfig.tiny()
    nbytes = write_random_streamed_cogact(config, tmp_path / "a", max_shard_bytes=100_000)
    write_random_streamed_cogact(config, tmp_path / "b", max_shard_bytes=10_000_000)
    a, b = SafetensorsCheckpoint(tmp_path / "a"), SafetensorsCheckpoint(tmp_path / "b")
    assert len(set(a.weight_map.values())) > 1 and set(a.weight_map) == set(b.weight_map)
    names = sorted(a.weight_map)
    got, again = a.read(names), b.read(names)
    assert all(torch.equal(got[n], again[n]) for n in names)  # drawn by name, not by shard position
    assert sum(t.numel() * t.element_size() for t in got.values()) == nbytes
    assert all(t.dtype == torch.bfloat16 for t in got.values() if t.is_floating_point())
    q = got["llm_backbone.llm.model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.015 < float(q.std()) < 0.025
    assert torch.equal(got["llm_backbone.llm.model.layers.0.input_layernorm.weight"].float(), torch.ones(64))
    adapter, loader = load_streamed_cogact(tmp_path / "a", tiny_tokenizer(), dtype=torch.float32)
    block = adapter.model.get_submodule("llm_backbone.llm.model.layers.1")
    loader.load_block("llm_backbone.llm.model.layers.1", block)
    torch.testing.assert_close(
        block.mlp.down_proj.weight, got["llm_backbone.llm.model.layers.1.mlp.down_proj.weight"].float()
    )
    with pytest.raises(ValueError, match="materialize"):
        write_shards({"w": torch.empty(2, 3, device="meta")}, tmp_path / "c", materialize=lambda k, v: v)
    with pytest.raises(ValueError, match="on the meta device"):
        write_shards({"w": torch.empty(2, 3, device="meta")}, tmp_path / "d")
    with pytest.raises(FileExistsError, match="writes a new directory"):
        write_random_streamed_cogact(config, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_streamed_gptq_equals_the_in_memory_whole_model_path(tmp_path):
    torch.set_num_threads(1)
    cal = CalibrationSet([_raw(0), _raw(1)], {"source": "test"})
    write_streamed_cogact(tiny_cogact(), tmp_path / "ckpt", max_shard_bytes=200_000)
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 1
    whole = CogACTAdapter(tiny_cogact(), tiny_tokenizer())
    quantize_policy(whole, GPTQConfig(spec=SPEC, block_size=8), cal)
    adapter, loader = load_streamed_cogact(tmp_path / "ckpt", tiny_tokenizer())
    assert any(p.is_meta for p in adapter.model.parameters())  # the blocks are not in memory
    saved = {}

    def done(block, module):
        saved[block.name] = save_block_state(module, tmp_path / f"{block.name}.safetensors")

    record = quantize_policy_sequential(
        adapter, GPTQConfig(spec=SPEC, block_size=8), cal, loader=loader, on_block_done=done,
        max_in_memory_bytes=10_000,
    )  # fmt: skip
    assert record.decisions["sequential"]["spilled_input_bytes"] > 0
    # every block went back to meta after it was written; the in-scope ones were written quantized
    assert all(p.is_meta for b in saved for p in adapter.model.get_submodule(b).parameters())
    assert set(saved) == {
        *(f"llm_backbone.llm.model.layers.{i}" for i in range(2)),
        *(f"action_model.net.blocks.{i}" for i in range(2)),
    }
    ref = whole.model.state_dict()
    compared = 0
    for name, path in saved.items():
        for k, v in load_file(str(path)).items():
            torch.testing.assert_close(v.double(), ref[f"{name}.{k}"].double(), rtol=1e-5, atol=1e-6)
            compared += 1
    for k, v in adapter.model.state_dict().items():
        if not v.is_meta:
            torch.testing.assert_close(v.double(), ref[k].double(), rtol=1e-5, atol=1e-6, msg=k)
            compared += 1
    assert compared > 100 and any(k.endswith("qweight") for k in ref)


_MEASURE = textwrap.dedent(
    """
    import json, sys, numpy as np, torch
    from daptq.data.calibration import CalibrationSet
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.sequential import quantize_policy_sequential
    from daptq.models.cogact.streamed import load_streamed_cogact
    from daptq.models.cogact.testing import tiny_tokenizer
    from daptq.models.streaming import save_block_state
    from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec
    torch.set_num_threads(1)
    ckpt, out = sys.argv[1], sys.argv[2]
    r = np.random.default_rng(0)
    raw = {"image": r.integers(0, 256, (2, 36, 44, 3), dtype=np.uint8),
           "instruction": ["open the drawer", "pick the coke can"], "state": np.zeros((2, 4), np.float32)}
    adapter, loader = load_streamed_cogact(ckpt, tiny_tokenizer())
    spec = QuantSpec(WeightSpec(4, granularity="per_group", group_size=64),
                     ActivationSpec(8, mode="static_per_tensor"))
    done = lambda b, m: save_block_state(m, f"{out}/{b.name}.safetensors")
    rec = quantize_policy_sequential(adapter, RTNConfig(spec=spec), CalibrationSet([raw], {"source": "t"}),
                               loader=loader, on_block_done=done)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    # and the loop resets it per stage (its record has each stage's peak)
    stages = [v * 2**20 for k, v in rec.timings.items() if k.endswith("_peak_rss_mb")]
    print(json.dumps({"maxrss": max(int(hwm) * 1024, *stages)}))
    """
)


def _peak_rss(tmp_path, layers: int) -> tuple[int, int]:
    """(peak RSS of a fresh process quantizing a streamed CogACT with ``layers`` backbone layers of width
    1024, bytes of those layers' float weights)."""
    torch.manual_seed(0)
    model = tiny_cogact(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers)
    layer_bytes = sum(p.numel() * 4 for p in model.llm_backbone.llm.model.layers.parameters())
    ckpt = write_streamed_cogact(model, tmp_path / f"ckpt{layers}", max_shard_bytes=64 << 20)
    del model
    out = tmp_path / f"out{layers}"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ckpt), str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("llm_backbone.llm.model.layers.*.safetensors"))) == layers
    return json.loads(proc.stdout.strip().splitlines()[-1])["maxrss"], layer_bytes


def test_peak_memory_grows_with_one_block_not_with_the_model(tmp_path):
    rss2, bytes2 = _peak_rss(tmp_path, 2)
    rss8, bytes8 = _peak_rss(tmp_path, 8)
    added = bytes8 - bytes2  # 6 more layers: about 300 MB of float weights
    assert added > 250e6
    # An in-memory model would add all of it; the streamed one holds one block at a time (generous margin).
    assert rss8 - rss2 < 0.25 * added, (rss2, rss8, added)
