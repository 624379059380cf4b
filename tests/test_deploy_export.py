"""Whole-policy export: the ONNX Runtime policy against the fake-quant policy it came from.

Tolerances:
- ``w4a8_kernel="emulate"`` (every layer rounds exactly as daptq does): language features, z, epsilon and
  the sampled chunk agree to 1e-4 relative (fp32 summation order through ~20 layers and 10 DDIM steps).
- ``w4a8_kernel="int8"`` (ONNX Runtime's blockwise int8 activations in W4A8 layers): each layer is within
  the rounding bound of test_deploy_lowering; end to end the graphs keep an SQNR above 20 dB against
  fake-quant on z and epsilon (measured ~30 dB on the toy model), and the deployed policy stays closer to
  its fake-quant twin than the fake-quant policy is to full precision.
"""

import copy
import json

import numpy as np
import pytest
import torch

from daptq.deploy import OnnxPolicy, export_onnx, export_reference_policy, lower_layer, make_session
from daptq.deploy.bench import reference_w4a8_recipe
from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig
from daptq.models.registry import load_policy
from daptq.quant import Recipe, Rule, quantize_, quantized_modules, sqnr_db

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("no_grad")

TOY = ReferenceVLAConfig(
    image_size=32, d_model=64, n_layer=2, n_head=4, dit_d_model=64, dit_n_layer=1, dit_n_head=4
)
W4A8_RECIPE = reference_w4a8_recipe(group_size=32)


def rel_err(y, ref):
    y, ref = torch.as_tensor(np.asarray(y)).double(), torch.as_tensor(np.asarray(ref)).double()
    return float((y - ref).abs().max() / ref.abs().max())


def observation(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32),
        "instruction": "push the puck to the goal",
    }


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def toy_policies():
    """(fp policy, fake-quant W4A8 policy) of a toy-sized reference VLA with a non-trivial head."""
    torch.manual_seed(0)
    model = ReferenceVLA(TOY)
    for p in model.head.parameters():  # adaLN-Zero starts at zero: give the head something to compute
        torch.nn.init.normal_(p, std=0.05)
    fp = ReferencePolicy(model)
    quant = ReferencePolicy(copy.deepcopy(model))
    quantize_(quant.model, W4A8_RECIPE)
    return fp, quant


@pytest.fixture(scope="module")
def exported(toy_policies, tmp_path_factory):
    _, quant = toy_policies
    root = tmp_path_factory.mktemp("onnx")
    return {k: export_reference_policy(quant, root / k, w4a8_kernel=k) for k in ("emulate", "int8")}


def test_emulated_export_matches_fake_quant_end_to_end(toy_policies, exported):
    _, quant = toy_policies
    deployed = OnnxPolicy(exported["emulate"], threads=1)
    obs = observation()
    batch = quant.observation_to_batch(obs)
    deployed_batch = deployed.observation_to_batch(obs)
    assert rel_err(deployed_batch["language_features"], batch["language_features"]) < 1e-4
    z = quant.model.condition(batch)
    assert rel_err(deployed.condition(deployed_batch), z) < 1e-4
    x, t = torch.randn(1, TOY.chunk_size, TOY.action_dim), torch.tensor([40])
    eps = deployed.sessions["denoiser"].run(
        None, {"noisy_actions": x.numpy(), "t": t.numpy(), "z": z.numpy()}
    )
    assert rel_err(eps[0], quant.model.head(x, t, z)) < 1e-4
    a = quant.predict_chunk(batch, torch.Generator().manual_seed(3))
    b = deployed.predict_chunk(deployed_batch, torch.Generator().manual_seed(3))
    assert rel_err(b, a) < 1e-4
    c = deployed.predict_chunk(deployed_batch, torch.Generator().manual_seed(4))
    assert rel_err(c, a) > 1e-2  # the noise matters: matching seeds is what made them agree


def test_every_layer_of_the_policy_matches_on_its_real_inputs(toy_policies):
    """Layer by layer: each quantized layer's lowered graph on the inputs it sees in a policy call."""
    _, quant = toy_policies
    layers = quantized_modules(quant.model)
    inputs, handles = {}, []
    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda _m, a, n=name: inputs.setdefault(n, a[0])))
    try:
        quant.predict_chunk(quant.observation_to_batch(observation()), torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    assert set(inputs) == set(layers)
    for name, layer in layers.items():
        x = inputs[name]
        ref = layer(x).detach()
        for kernel in ("emulate", "int8"):
            module, plan = lower_layer(layer, name, kernel)
            graph = export_onnx(module, (x,), ["x"], ["y"])
            y = make_session(graph.SerializeToString(), 1).run(None, {"x": x.numpy()})[0]
            if kernel == "emulate":
                assert rel_err(y, ref) < 1e-5, name
            else:
                assert plan.accuracy_level == 4, name
                w = layer.dequantized_weight().detach().double()
                bound = (
                    x.double().abs().amax(-1, keepdim=True) / 127 * w.abs().sum(1) + 1e-4 * ref.abs().max()
                )
                assert bool(((torch.from_numpy(y).double() - ref).abs() <= bound).all()), name


def test_int8_export_is_bounded_and_closer_to_its_twin_than_to_fp(toy_policies, exported):
    fp, quant = toy_policies
    deployed = OnnxPolicy(exported["int8"], threads=1)
    obs = observation(1)
    batch = quant.observation_to_batch(obs)
    z_q = quant.model.condition(batch)
    z_d = torch.from_numpy(deployed.condition(deployed.observation_to_batch(obs)))
    assert sqnr_db(z_q, z_d) > 20
    z_fp = fp.model.condition(fp.observation_to_batch(obs))
    assert float((z_d - z_q).norm()) < float((z_fp - z_q).norm())
    plans = deployed.manifest["layers"]
    levels = {p["accuracy_level"] for g in plans.values() for p in g if p["kernel"] == "matmul_nbits"}
    assert levels == {4}


def test_policy_protocol_and_onnx_spec(toy_policies, exported):
    _, quant = toy_policies
    deployed = load_policy(f"onnx:{exported['emulate']}")
    assert isinstance(deployed, OnnxPolicy)
    obs = observation(2)
    actions = {}
    for name, policy in (("quant", quant), ("deployed", deployed)):
        policy.reset(seed=11)
        actions[name] = np.stack([policy.select_action(obs) for _ in range(TOY.n_action_steps + 1)])
    assert actions["deployed"].shape == (TOY.n_action_steps + 1, TOY.action_dim)
    assert actions["deployed"].dtype == np.float32
    np.testing.assert_allclose(actions["deployed"], actions["quant"], atol=1e-4)
    deployed.reset(seed=0)
    with pytest.raises(ValueError, match="observation is missing"):
        deployed.select_action({"image": obs["image"]})


def test_export_refuses_overwrite_and_detects_tampering(toy_policies, exported, tmp_path):
    _, quant = toy_policies
    with pytest.raises(FileExistsError):
        export_reference_policy(quant, exported["emulate"])
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for f in exported["emulate"].iterdir():
        (copy_dir / f.name).write_bytes(f.read_bytes())
    graph = copy_dir / "denoiser.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        OnnxPolicy(copy_dir)
    with pytest.raises(FileNotFoundError, match="manifest"):
        OnnxPolicy(tmp_path)


@pytest.mark.slow
def test_bundled_vla_w4a8_export(tmp_path):
    """The bundled reference VLA, RTN W4A8 (groups of 128; 64 where K=192) on backbone and head, same noise
    seed. Emulated: within 1e-2 of the fake-quant chunk (every layer matches to 1e-5 on equal inputs, but
    fp32 summation differences upstream flip a few per-token activation roundings, which propagate);
    int8 kernels: within 3e-2 (actions in [-1, 1])."""
    policy = load_policy("ref:metaworld-mt10")
    quantize_(policy.model, reference_w4a8_recipe(policy.model))
    obs = observation(0, size=policy.config.image_size)
    batch = policy.observation_to_batch(obs)
    a = policy.predict_chunk(batch, torch.Generator().manual_seed(5))
    for kernel, tol in (("emulate", 1e-2), ("int8", 3e-2)):
        deployed = OnnxPolicy(
            export_reference_policy(policy, tmp_path / kernel, w4a8_kernel=kernel), threads=1
        )
        b = deployed.predict_chunk(deployed.observation_to_batch(obs), torch.Generator().manual_seed(5))
        err = float((b - a).abs().max())
        print(f"bundled VLA W4A8 {kernel}: max |chunk - fake-quant chunk| = {err:.2e}")
        assert err < tol, kernel


def test_quantized_encoder_convs_export(toy_policies, tmp_path):
    """Quantized convs are refused unless allowed (no integer conv kernel); allowed, EfficientNet's TF-style
    "same" convs (input padding kept) and MiniLM's linears export with their dequantized weights and
    emulated activation rounding: z and language features match."""
    from daptq.quant import ActivationSpec, QuantSpec, WeightSpec

    fp, _ = toy_policies
    policy = ReferencePolicy(copy.deepcopy(fp.model))
    spec = QuantSpec(WeightSpec(8), ActivationSpec(8))
    quantize_(policy.model, {"vision.stem": spec, "vision.blocks.1._depthwise_conv": spec})
    quantize_(
        policy.model,
        Recipe((Rule("language.*", QuantSpec(WeightSpec(4, granularity="per_group", group_size=32))),)),
    )
    with pytest.raises(ValueError, match=r"2 quantized conv layer\(s\).*vision\.stem.*float_convs"):
        export_reference_policy(policy, tmp_path / "refused", w4a8_kernel="emulate")
    assert not (tmp_path / "refused").exists()
    out = export_reference_policy(policy, tmp_path / "enc", w4a8_kernel="emulate", float_convs=True)
    deployed = OnnxPolicy(out, threads=1)
    assert deployed.manifest["float_convs"] == ["vision.stem", "vision.blocks.1._depthwise_conv"]
    kernels = {p["name"]: p["kernel"] for g in deployed.manifest["layers"].values() for p in g}
    assert kernels["vision.stem"] == "dequantized_fp32"
    assert {k for n, k in kernels.items() if n.startswith("language.")} == {"matmul_nbits"}
    obs = observation(3)
    batch = policy.observation_to_batch(obs)
    deployed_batch = deployed.observation_to_batch(obs)
    assert rel_err(deployed_batch["language_features"], batch["language_features"]) < 1e-4
    assert rel_err(deployed.condition(deployed_batch), policy.model.condition(batch)) < 1e-4


def test_daptq_eval_drives_the_deployed_policy(toy_policies, exported, tmp_path):
    """`daptq eval onnx:OUT` runs: the runner reads PolicyInfo from the deployed policy as from any other."""
    from daptq.eval import evaluate
    from daptq.models.adapter import Policy

    deployed = load_policy(f"onnx:{exported['emulate']}")
    assert isinstance(deployed, Policy)
    info = deployed.info()
    assert info.image_size == TOY.image_size and info.camera == TOY.camera
    torch.set_num_threads(2)  # the evaluator's per-worker count, not the process's, reaches the sessions
    try:
        summary = evaluate(
            f"onnx:{exported['emulate']}",
            tasks=["reach"],
            episodes=1,
            max_steps=6,
            out=tmp_path / "run",
            progress=False,
        )
    finally:
        torch.set_num_threads(1)
    assert summary["complete"] and summary["overall"]["episodes"] == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["candidate"]["recipe"]["threads"] == 1
    batched = evaluate(  # --envs-per-worker 2: one batched predict_chunks per step
        f"onnx:{exported['emulate']}",
        tasks=["reach"],
        episodes=2,
        max_steps=6,
        envs_per_worker=2,
        out=tmp_path / "batched",
        progress=False,
    )
    assert batched["complete"] and batched["overall"]["episodes"] == 2


def test_batched_chunks_match_the_twin_and_single_calls(toy_policies, exported):
    """``predict_chunks`` (``--envs-per-worker N``): each row is what ``select_action`` queues for its seed
    and what the fake-quant twin's ``predict_chunks`` gives; padding slots change nothing."""
    _, quant = toy_policies
    deployed = OnnxPolicy(exported["emulate"], threads=1)
    observations = [observation(5), observation(6), {**observation(7), "instruction": "open the drawer"}]

    def gens():
        return [torch.Generator().manual_seed(20 + i) for i in range(len(observations))]

    rows = deployed.predict_chunks(observations, gens(), slots=4)
    assert rows.shape == (3, TOY.n_action_steps, TOY.action_dim) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, quant.predict_chunks(observations, gens(), slots=4), atol=1e-4)
    np.testing.assert_allclose(rows, deployed.predict_chunks(observations, gens()), atol=1e-5)
    # A batch of one is what select_action queues. Rows of a larger batch differ from it on this toy W4A8
    # (by up to 0.2; the twin's batched rows differ the same way, which the comparison above checks).
    for i, obs in enumerate(observations):
        deployed.reset(seed=20 + i)
        single = np.stack([deployed.select_action(obs) for _ in range(TOY.n_action_steps)])
        one = deployed.predict_chunks([obs], [torch.Generator().manual_seed(20 + i)])[0]
        np.testing.assert_allclose(one, single, atol=1e-5)
    with pytest.raises(ValueError, match="slots"):
        deployed.predict_chunks(observations, gens(), slots=2)
    with pytest.raises(ValueError, match="generators"):
        deployed.predict_chunks(observations, gens()[:2])


def test_threads_are_an_explicit_recorded_setting(exported):
    """ONNX Runtime ignores torch.set_num_threads: the thread count is the policy's, checked and declared."""
    torch.set_num_threads(2)
    try:
        default = load_policy(f"onnx:{exported['emulate']}")
    finally:
        torch.set_num_threads(1)
    assert default.threads == 1  # not torch's count at load time
    two = load_policy(f"onnx:{exported['emulate']}", onnx_threads=2)
    assert two.threads == 2 and two.info().recipe["threads"] == 2
    for session in two.sessions.values():
        opts = session.get_session_options()
        assert opts.intra_op_num_threads == 2
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for bad in (0, 1.5, True, None):
        with pytest.raises(ValueError, match="threads"):
            OnnxPolicy(exported["emulate"], threads=bad)


def test_language_graph_runs_once_per_instruction(exported):
    """MiniLM runs once per instruction, not per step or per chunk: its features are cached."""
    deployed = OnnxPolicy(exported["emulate"], threads=1)
    session, calls = deployed.sessions["language"], []

    class Counting:
        def run(self, *args, **kwargs):
            calls.append(1)
            return session.run(*args, **kwargs)

    deployed.sessions["language"] = Counting()
    deployed.reset(seed=0)
    for _ in range(3 * TOY.n_action_steps):
        deployed.select_action(observation(8))
    deployed.predict_chunks([observation(9)] * 2, [torch.Generator().manual_seed(i) for i in range(2)])
    assert len(calls) == 1
    deployed.select_action({**observation(8), "instruction": "open the drawer"})
    assert len(calls) == 2


def test_auto_threads_are_chosen_by_measurement_and_recorded(exported):
    deployed = OnnxPolicy(exported["int8"], threads="auto")
    assert set(deployed.thread_timings_ms) <= {1, 2} and 1 in deployed.thread_timings_ms
    assert deployed.threads == min(deployed.thread_timings_ms, key=deployed.thread_timings_ms.get)
    recipe = deployed.info().recipe
    assert (
        recipe["threads"] == deployed.threads and recipe["threads_measured_ms"] == deployed.thread_timings_ms
    )
    for session in deployed.sessions.values():
        assert session.get_session_options().intra_op_num_threads == deployed.threads


@pytest.mark.parametrize("level", ["disable", "basic", "extended"])
def test_every_optimization_level_computes_the_same_policy(exported, level):
    """The graph optimization level is a speed setting only: the same chunk as the default ("all")."""
    base, other = OnnxPolicy(exported["int8"]), OnnxPolicy(exported["int8"], optimization=level)
    batch = base.observation_to_batch(observation(3))
    a = base.predict_chunk(batch, torch.Generator().manual_seed(0))
    b = other.predict_chunk(other.observation_to_batch(observation(3)), torch.Generator().manual_seed(0))
    assert rel_err(b, a) < 1e-4
    assert other.info().recipe["optimization"] == level
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxPolicy(exported["int8"], optimization="max")


def test_export_cost_model_keeps_fp32_where_the_integer_kernel_loses(toy_policies, tmp_path):
    """A synthetic cost table: the backbone's first qkv measured slower as MatMulNBits than fp32 is exported
    as the fp32 MatMul on its dequantized weight (rounding emulated), every measured layer's plan says why,
    and the policy stays within the int8 export's agreement with its fake-quant twin."""
    from daptq.deploy.export import measure_policy_costs
    from daptq.quant.kernels import LayerCost

    _, quant = toy_policies
    names = list(quantized_modules(quant.model))
    table = {n: LayerCost(packed_s=1e-4, float_s=2e-4) for n in names}
    table["blocks.0.attn.qkv"] = LayerCost(packed_s=3e-4, float_s=2e-4)
    out = export_reference_policy(quant, tmp_path / "cost", cost_model=table)
    deployed = OnnxPolicy(out)
    plans = {p["name"]: p for g in deployed.manifest["layers"].values() for p in g}
    slow = plans["blocks.0.attn.qkv"]
    assert slow["kernel"] == "dequantized_fp32" and "does not pay" in slow["decision"]
    assert slow["activation"].endswith("(emulated)")
    fast = plans["blocks.0.mlp.fc"]
    assert fast["kernel"] == "matmul_nbits" and "matmul_nbits 0.100 ms vs fp32 0.200 ms" in fast["decision"]
    obs = observation(5)
    z_q = quant.model.condition(quant.observation_to_batch(obs))
    z_d = torch.from_numpy(deployed.condition(deployed.observation_to_batch(obs)))
    assert sqnr_db(z_q, z_d) > 20  # the int8 export's bound (test_int8_export_is_bounded...)
    measured = measure_policy_costs(quant, threads=1)
    assert set(measured) == {
        n for n, p in plans.items() if p["kernel"] in ("matmul_nbits", "dequantized_fp32")
    }
    assert all(c.packed_s > 0 and c.float_s > 0 for c in measured.values())
