"""ONNX export of the flow-matching family (pi0 / pi0.5): the ONNX Runtime sampler against PyTorch.

Tolerances:
- float graphs: the chunk equals ``LeRobotVLAAdapter.predict_chunk`` (same noise) to 1e-5 relative (fp32
  summation order through the prefix and 3 Euler steps; measured ~1e-7).
- W4A8 with ``w4a8_kernel="emulate"`` (daptq's per-token activation rounding as graph ops): equal to the
  fake-quant twin to 1e-4 relative (measured ~1e-7).
- W4A8 with ``w4a8_kernel="int8"``: these per-channel weights lower to the u8s8 ``MatMulInteger`` kernel
  (daptq's own per-token rounding, exact): equal to the fake-quant twin to 1e-4 relative. (Per-group W4A8
  runs MatMulNBits' blockwise int8 path; its bound is tested on the reference VLA, test_deploy_lowering.py.)
"""

import copy
import json

import numpy as np
import pytest
import torch
from lerobot_vla_helpers import adapter_of, raw_batch, sqnr_db

from daptq.deploy.flow_export import (
    FlowOnnxPolicy,
    FlowOnnxSampler,
    export_flow_policy,
    read_flow_manifest,
)
from daptq.methods import quantize_policy
from daptq.methods.rtn import RTNConfig
from daptq.models.lerobot_vla.testing import tiny_model
from daptq.quant import QuantSpec, WeightSpec
from daptq.quant.spec import ActivationSpec

torch.set_num_threads(1)
W4A8_PER_CHANNEL = QuantSpec(WeightSpec(4, granularity="per_channel"), ActivationSpec(8))


def rel_err(y, ref):
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())


def batch_of(adapter, b=2, seed=99):
    return next(adapter.calibration_batches(iter([raw_batch(seed, b)])))


def chunk(runner, batch, seed=7):
    return runner.predict_chunk(batch, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pi0_quantized():
    """(fp adapter, RTN W4A8 fake-quant adapter) of the tiny pi0."""
    fp = adapter_of(tiny_model("pi0"))
    q = adapter_of(copy.deepcopy(fp.model))
    quantize_policy(q, RTNConfig(spec=W4A8_PER_CHANNEL))
    return fp, q


@pytest.mark.parametrize(("kind", "loop"), [("pi0", "steps"), ("pi0", "unrolled"), ("pi05", "steps")])
def test_float_export_equals_torch(kind, loop, tmp_path):
    adapter = adapter_of(tiny_model(kind))
    out = export_flow_policy(adapter.model, tmp_path / "onnx", loop=loop)
    runner = FlowOnnxSampler(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "prefix.onnx", {"steps": "step.onnx", "unrolled": "sampler.onnx"}[loop]]
    )
    # batch 2 and prompts of another length than the traced example: batch and prefix axes are dynamic
    batch = batch_of(adapter)
    assert rel_err(chunk(runner, batch), chunk(adapter, batch)) < 1e-5


def test_w4a8_export_equals_its_fake_quant_twin(pi0_quantized, tmp_path):
    fp, q = pi0_quantized
    batch = batch_of(q)
    twin, full = chunk(q, batch), chunk(fp, batch)
    emulated = FlowOnnxSampler(export_flow_policy(q.model, tmp_path / "emulate", w4a8_kernel="emulate"))
    assert rel_err(chunk(emulated, batch), twin) < 1e-4
    int8 = FlowOnnxSampler(export_flow_policy(q.model, tmp_path / "int8", w4a8_kernel="int8"))
    plans = [p for g in int8.manifest["layers"].values() for p in g]
    assert len(plans) == sum(1 for m in q.model.modules() if hasattr(m, "qweight"))  # every layer lowered
    assert {(p["kernel"], p["accuracy_level"]) for p in plans} == {("matmul_integer_u8s8", None)}
    assert int8.manifest["layers"]["prefix"] and int8.manifest["layers"]["step"]  # both graphs quantized
    deployed = chunk(int8, batch)
    assert rel_err(deployed, twin) < 1e-4  # u8s8 rounds the activation as daptq does: exact
    assert sqnr_db(twin, deployed) >= 20.0
    assert (deployed - twin).abs().max() < (twin - full).abs().max()


def test_bad_inputs_are_clear_errors(pi0_quantized, tmp_path):
    fp, _ = pi0_quantized
    out = export_flow_policy(fp.model, tmp_path / "onnx")
    runner = FlowOnnxSampler(out)
    batch = batch_of(fp)
    with pytest.raises(
        ValueError, match=r"input 'images' has shape \(2, 1, 3, 16, 16\), expected \(2x1x3x32x32\)"
    ):
        chunk(runner, {**batch, "images": batch["images"][..., :16, :16]})
    with pytest.raises(ValueError, match=r"missing \['state'\]"):
        chunk(runner, {k: v for k, v in batch.items() if k != "state"})
    with pytest.raises(ValueError, match="'state' has shape"):
        chunk(runner, {**batch, "state": batch["state"][:, :4]})
    with pytest.raises(ValueError, match="'images' holds NaN"):
        chunk(runner, {**batch, "images": batch["images"] * float("nan")})
    with pytest.raises(ValueError, match="bare network"):
        FlowOnnxPolicy(out)
    with pytest.raises(ValueError, match="loop must be one of"):
        export_flow_policy(fp.model, tmp_path / "x", loop="scan")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_flow_policy(fp.model, out)
    with pytest.raises(ValueError, match="smolvla: no ONNX export yet"):
        export_flow_policy(tiny_model("smolvla"), tmp_path / "smol")
    assert not (tmp_path / "smol").exists()
    # an edited graph or manifest is refused
    graph = out / "step.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="sha256 does not match"):
        FlowOnnxSampler(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["num_steps"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_flow_manifest(out)


def test_daptq_export_of_a_quantized_pi0_directory(tmp_path):
    """`daptq quantize lerobot:DIR` then `daptq export` writes the flow export (dispatch by policy kind)."""
    from daptq.cli import main
    from daptq.models.lerobot_vla.testing import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "pi0")
    q = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                f"lerobot:{ckpt}",
                "--method",
                "rtn",
                "--w-bits",
                "4",
                "--a-bits",
                "8",
                "--out",
                str(q),
            ]
        )
        == 0
    )
    out = tmp_path / "onnx"
    assert main(["export", str(q), "--format", "onnx", "--out", str(out), "--w4a8-kernel", "emulate"]) == 0
    manifest = read_flow_manifest(out)
    assert manifest["source"] == str(q) and manifest["loop"] == "steps"
    from daptq.models.registry import load_policy

    policy = load_policy(str(q))
    batch = batch_of(policy.adapter)
    assert rel_err(chunk(FlowOnnxSampler(out), batch), chunk(policy.adapter, batch)) < 1e-4
    # closed loop: `onnx:OUT` is the same policy (preprocessing, noise from the seed, un-normalized actions)
    deployed = load_policy(f"onnx:{out}")
    assert isinstance(deployed, FlowOnnxPolicy) and deployed.n_action_steps == policy.n_action_steps
    obs = {k: v[0] for k, v in raw_batch(5, 1).items() if k != "actions"}
    obs["instruction"] = "open the drawer"
    for p in (policy, deployed):
        p.reset(seed=3)
    twin = np.stack([policy.select_action(obs) for _ in range(policy.n_action_steps + 1)])
    got = np.stack([deployed.select_action(obs) for _ in range(policy.n_action_steps + 1)])
    assert np.abs(got - twin).max() <= 1e-4 * np.abs(twin).max()
    assert deployed.info().image_size == policy.info().image_size
    assert main(["export", str(q), "--format", "onnx", "--out", str(out), "--overwrite"]) == 0
    assert read_flow_manifest(out)["w4a8_kernel"] == "int8"
