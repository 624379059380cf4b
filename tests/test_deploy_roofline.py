"""The roofline of a deployed call (daptq.deploy.roofline): counting against hand counts on a tiny graph,
the bound's arithmetic, the profile's bookkeeping, and the bench report around them. No timing thresholds:
only that measured rates are positive numbers."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from daptq.deploy import roofline as R
from daptq.deploy.bench import BenchError, attach_roofline, check_options, to_markdown

M, K1, K2, N, BLOCK = 3, 8, 32, 16, 16


def tiny_graph():
    """x[3, 8] -> MatMul W[8, 32] -> Add b[32] -> MatMulNBits (K=32, N=16, blocks of 16, int8 path)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K1, K2)).astype(np.float32)
    b = rng.standard_normal(K2).astype(np.float32)
    packed = rng.integers(0, 256, (N, K2 // BLOCK, BLOCK // 2), dtype=np.uint8)
    scales = np.full(N * K2 // BLOCK, 0.01, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
        helper.make_node(
            "MatMulNBits",
            ["hb", "packed", "scales"],
            ["y"],
            name="nbits",
            domain="com.microsoft",
            K=K2,
            N=N,
            bits=4,
            block_size=BLOCK,
            accuracy_level=4,
        ),
    ]
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (packed, "packed"), (scales, "scales"))
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return model


# hand counts for one run at M rows
FP32_FLOPS = 2 * M * K1 * K2  # the MatMul
INT8_OPS = 2 * M * K2 * N  # MatMulNBits at accuracy level 4
BYTES = {"mm": K1 * K2 * 4, "add": K2 * 4, "nbits": N * (K2 // BLOCK) * (BLOCK // 2) + N * K2 // BLOCK * 4}


def test_graph_cost_counts_what_each_run_executes():
    x = np.ones((M, K1), np.float32)
    cost = R.graph_cost(tiny_graph(), [{"x": x}, {"x": x}])  # two runs: everything twice
    assert cost.fp32_flops == 2 * FP32_FLOPS
    assert cost.int8_ops == 2 * INT8_OPS
    assert cost.weight_bytes == 2 * sum(BYTES.values())
    by_name = {n.name: n for n in cost.nodes}
    assert by_name["nbits"].precision == "int8" and by_name["mm"].precision == "fp32"
    assert by_name["add"].precision == "none" and by_name["add"].weight_bytes == BYTES["add"]
    assert R.Cost.from_json(cost.to_json()).summary() == cost.summary()


def test_bound_is_the_sum_of_each_nodes_slower_limit():
    cost = R.graph_cost(tiny_graph(), [{"x": np.ones((M, K1), np.float32)}])
    rates = R.Rates(fp32_flops=1e3, int8_ops=2e3, w4a8_kernel_ops=1e3, bandwidth_bytes=1e3)
    mm = max(FP32_FLOPS / 1e3, BYTES["mm"] / 1e3)
    add = BYTES["add"] / 1e3
    nbits = max(INT8_OPS / 2e3, BYTES["nbits"] / 1e3)
    assert R.bound_seconds(cost, rates) == pytest.approx(mm + add + nbits)
    # a weight-only kernel computing in float: the int8 operations at the fp32 rate
    as_fp32 = mm + add + max(INT8_OPS / 1e3, BYTES["nbits"] / 1e3)
    assert R.bound_seconds(cost, rates, int8_as_fp32=True) == pytest.approx(as_fp32)
    row = R.roofline_row(2 * (mm + add + nbits), cost, rates)
    assert row["of_bound"] == pytest.approx(0.5)
    assert row["bound_compute_ms"] == pytest.approx(1e3 * (FP32_FLOPS / 1e3 + INT8_OPS / 2e3))
    assert row["bound_memory_ms"] == pytest.approx(1e3 * sum(BYTES.values()) / 1e3)


def test_node_cost_of_gemm_and_conv():
    gemm = R.node_cost("g", "Gemm", {"transA": 1}, [[5, 3], [5, 7]], [[3, 7]], 140)
    assert gemm.ops == 2 * 3 * 7 * 5 and gemm.precision == "fp32"
    conv = R.node_cost("c", "Conv", {}, [[1, 4, 8, 8], [6, 2, 3, 3]], [[1, 6, 8, 8]], 0)
    assert conv.ops == 2 * (6 * 8 * 8) * (2 * 3 * 3)
    fp = R.node_cost("n", "MatMulNBits", {"accuracy_level": 1}, [[2, 32]], [[2, 16]], 0)
    assert fp.precision == "fp32" and fp.ops == 2 * 2 * 32 * 16


def test_profile_summary_drops_the_warm_up_call():
    """Per-call ms from model_run and node events: 1 warm-up + 2 counted calls of 2 runs each."""
    events = []
    for i in range(6):  # 6 runs of 10 us each, every run one node of 4 us
        ts = 100 * i
        events.append({"name": "model_run", "cat": "Session", "ts": ts, "dur": 10})
        events.append(
            {"name": "mm_kernel_time", "cat": "Node", "ts": ts + 1, "dur": 4, "args": {"op_name": "MatMul"}}
        )
    out = R.summarize_profile({"denoiser": events}, wall_s=1e-4, calls=2)
    assert out["by_op_ms"] == {"denoiser/MatMul": pytest.approx(2 * 4 / 1e3)}  # 2 runs per call
    assert out["graph_runs_ms"]["denoiser"] == pytest.approx(2 * 10 / 1e3)
    assert out["session_overhead_ms"]["denoiser"] == pytest.approx(2 * 6 / 1e3)
    assert out["python_ms"] == pytest.approx(0.1 - 0.02)


def test_measured_rates_are_positive():
    rates = R.measure_rates(threads=1, repeats=1, shape=(8, 128, 128), copy_bytes=1 << 20)
    assert min(rates.fp32_flops, rates.int8_ops, rates.w4a8_kernel_ops, rates.bandwidth_bytes) > 0
    assert R.Rates.from_dict(rates.to_dict()) == rates


def test_bench_rows_get_their_bound_and_the_report_shows_it():
    cost = R.graph_cost(tiny_graph(), [{"x": np.ones((M, K1), np.float32)}]).to_json()
    rates = R.Rates(1e3, 2e3, 1e3, 1e3).to_dict()
    costs = {"ort-fp32": {"cost": cost}, "ort-w4a8": {"cost": cost}}
    rows = []
    for variant in ("torch-w4-packed", "ort-w4a8"):
        row = {"model": "toy-vla", "variant": variant, "threads": 1, "call_p50_ms": 1e4}
        row.update(call_p90_ms=1e4, action_p50_ms=1e3, weights_stored_bytes=0, call_p50_vs_baseline=1.0)
        attach_roofline(row, costs, rates)
        rows.append(row)
    packed, ort = rows
    assert packed["roofline"]["bound_ms"] > ort["roofline"]["bound_ms"]  # int8 ops at the fp32 rate
    assert ort["roofline"]["bound_at_kernel_rate_ms"] == pytest.approx(packed["roofline"]["bound_ms"])
    report = {"threads": 1, "rounds": 1, "calls_per_round": 1, "results": rows, "rates": {"1": rates}}
    report["baseline"] = "per-model"
    text = to_markdown(report)
    assert "% of bound" in text and "| toy-vla | ort-w4a8 | 1 |" in text


def test_thread_lists_are_checked():
    check_options(1, 1, 0, [1, 2], 128, "runs/x")
    for bad in ([], [1, 1], [1, 0]):
        with pytest.raises(BenchError, match="--threads"):
            check_options(1, 1, 0, bad, 128, "runs/x")
