"""What this CPU allows a deployed call, and where the call's time goes (issue #30).

A *roofline* bound for one policy call, from two measurements made in the same run as the timings:

- ``measure_rates``: this machine's fp32 GEMM throughput (the better of ONNX Runtime's MLAS ``MatMul`` and
  ``torch.mm``), its int8 GEMM throughput (ONNX Runtime ``MatMulInteger``, uint8 x int8, the fastest integer
  kernel it has on x86), the W4A8 kernel's own throughput on a large GEMM (``MatMulNBits``, accuracy level 4)
  and its memory bandwidth (a streaming copy of 256 MiB: bytes read + written per second). Each is the best of
  a few repeats on ``threads`` threads.
- ``graph_cost``: the operations and weight bytes of every node one call executes, counted from the node's
  run-time shapes (an ONNX Runtime profile with graph optimizations off, so the nodes are the exported ones)
  and its initializers: ``MatMul``/``Gemm``/``Conv`` are fp32 FLOPs, ``MatMulInteger`` and ``MatMulNBits``
  at accuracy level 4 are int8 operations (2 per multiply-add), every initializer a node reads counts as
  weight bytes read from memory once per execution (the DiT's weights once per denoising step).

``bound_seconds`` is the sum over executed nodes of max(ops / rate, weight bytes / bandwidth): each node at
the faster of compute or memory limits, nothing for activations or per-node overhead (what a perfect runtime
would pay). ``profile_breakdown`` then says where the measured time goes: per graph and ONNX op type, the
sessions' own overhead (a run minus its nodes: graph boundaries, input/output copies) and Python (a call
minus its runs: the DDIM loop, conversions).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RATE_SHAPE = (128, 2048, 2048)  # M, K, N of the GEMM microbenchmarks: large enough to be compute bound
COPY_BYTES = 256 << 20  # the streaming copy: far beyond the last-level cache
INT8_KINDS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
FP32_GEMMS = ("MatMul", "Gemm", "FusedMatMul")


@dataclass(frozen=True)
class Rates:
    """Throughputs of this machine (per second) on ``threads`` threads."""

    fp32_flops: float
    int8_ops: float
    w4a8_kernel_ops: float
    bandwidth_bytes: float
    threads: int = 1
    detail: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rates:
        return cls(**d)


@dataclass(frozen=True)
class NodeCost:
    """One executed node: its precision class, operations and weight bytes read."""

    name: str
    op_type: str
    precision: str  # "fp32" | "int8" | "none" (no GEMM work)
    ops: float
    weight_bytes: int

    def seconds(self, rates: Rates, int8_as_fp32: bool = False) -> float:
        """The node's bound: the slower of its compute at the machine's rate and its weight bytes."""
        rate = rates.int8_ops if self.precision == "int8" and not int8_as_fp32 else rates.fp32_flops
        compute = self.ops / rate if self.ops else 0.0
        return max(compute, self.weight_bytes / rates.bandwidth_bytes)


@dataclass(frozen=True)
class Cost:
    """What one call executes (the nodes of every graph run, repeated as often as they run)."""

    nodes: tuple[NodeCost, ...] = ()

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.nodes + other.nodes)

    def __mul__(self, times: int) -> Cost:
        return Cost(self.nodes * int(times))

    @property
    def fp32_flops(self) -> float:
        return sum(n.ops for n in self.nodes if n.precision == "fp32")

    @property
    def int8_ops(self) -> float:
        return sum(n.ops for n in self.nodes if n.precision == "int8")

    @property
    def weight_bytes(self) -> int:
        return sum(n.weight_bytes for n in self.nodes)

    def to_json(self) -> list[list[Any]]:
        """[op_type, precision, ops, weight_bytes, count] per distinct node cost (names dropped)."""
        counts: dict[tuple, int] = defaultdict(int)
        for n in self.nodes:
            counts[(n.op_type, n.precision, n.ops, n.weight_bytes)] += 1
        return [[*key, c] for key, c in counts.items()]

    @classmethod
    def from_json(cls, rows: Sequence[Sequence[Any]]) -> Cost:
        nodes = []
        for op_type, precision, ops, weight_bytes, count in rows:
            nodes += [NodeCost("", op_type, precision, float(ops), int(weight_bytes))] * int(count)
        return cls(tuple(nodes))

    def summary(self) -> dict[str, float]:
        return {
            "fp32_flops": self.fp32_flops,
            "int8_ops": self.int8_ops,
            "weight_bytes": self.weight_bytes,
            "nodes": len(self.nodes),
        }


def bound_seconds(cost: Cost, rates: Rates, int8_as_fp32: bool = False) -> float:
    """Sum over executed nodes of max(ops / rate, weight bytes / bandwidth). ``int8_as_fp32``: count int8
    operations at the fp32 rate (a W4 weight-only kernel that computes in float: same bytes, float math)."""
    return sum(n.seconds(rates, int8_as_fp32) for n in cost.nodes)


def roofline_row(measured_s: float, cost: Cost, rates: Rates, int8_as_fp32: bool = False) -> dict[str, Any]:
    """The numbers a bench row reports beside its time: the bound, its parts and measured / bound."""
    bound = bound_seconds(cost, rates, int8_as_fp32)
    int8_rate = rates.fp32_flops if int8_as_fp32 else rates.int8_ops
    return {
        **{f"cost_{k}": v for k, v in cost.summary().items()},
        "bound_ms": bound * 1e3,
        "bound_compute_ms": (cost.fp32_flops / rates.fp32_flops + cost.int8_ops / int8_rate) * 1e3,
        "bound_memory_ms": cost.weight_bytes / rates.bandwidth_bytes * 1e3,
        "of_bound": bound / measured_s if measured_s > 0 else float("nan"),  # 1.0: at what the CPU allows
    }


# ---- counting a graph --------------------------------------------------------------------------------------
def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def node_cost(
    name: str,
    op_type: str,
    attrs: Mapping[str, Any],
    input_shapes: Sequence[Sequence[int]],
    output_shapes: Sequence[Sequence[int]],
    weight_bytes: int,
) -> NodeCost:
    """Operations of one executed node from its run-time shapes (2 per multiply-add)."""
    out = _prod(output_shapes[0]) if output_shapes else 0
    if op_type in (*FP32_GEMMS, *INT8_KINDS, "MatMulNBits"):
        a = input_shapes[0]
        k = a[-2] if op_type == "Gemm" and attrs.get("transA", 0) else a[-1]
        ops = 2.0 * out * int(k)
        int8 = op_type in INT8_KINDS or (op_type == "MatMulNBits" and attrs.get("accuracy_level", 0) == 4)
        return NodeCost(name, op_type, "int8" if int8 else "fp32", ops, weight_bytes)
    if op_type in ("Conv", "ConvInteger"):
        w = input_shapes[1]  # [C_out, C_in / groups, kh, kw]
        ops = 2.0 * out * _prod(w[1:])
        return NodeCost(name, op_type, "int8" if op_type == "ConvInteger" else "fp32", ops, weight_bytes)
    return NodeCost(name, op_type, "none", 0.0, weight_bytes)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shapes(entries: Sequence[Mapping[str, Sequence[int]]]) -> list[list[int]]:
    return [list(next(iter(e.values()))) for e in entries]


def _profile_sessions(
    model: onnx.ModelProto, optimized: bool, threads: int, prefix: str
) -> Any:  # an ort.InferenceSession that profiles
    from daptq.deploy.runtime import onnxruntime_module

    ort = onnxruntime_module()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _read_profile(session) -> list[dict[str, Any]]:
    path = Path(session.end_profiling())
    try:
        return json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)


def graph_cost(model: onnx.ModelProto | bytes, feeds: Sequence[Mapping[str, np.ndarray]]) -> Cost:
    """The nodes one run per feed executes (graph optimizations off: the exported nodes), counted from an
    ONNX Runtime profile's run-time shapes and the nodes' initializers."""
    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    init_bytes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    with tempfile.TemporaryDirectory() as tmp:
        session = _profile_sessions(model, optimized=False, threads=1, prefix=os.path.join(tmp, "cost"))
        for feed in feeds:
            session.run(None, dict(feed))
        events = _read_profile(session)
    nodes = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        node = by_name.get(name)
        args = e["args"]
        weights = 0 if node is None else sum(init_bytes.get(i, 0) for i in node.input)
        nodes.append(
            node_cost(
                name,
                args["op_name"],
                {} if node is None else _attrs(node),
                _shapes(args.get("input_type_shape", [])),
                _shapes(args.get("output_type_shape", [])),
                weights,
            )
        )
    return Cost(tuple(nodes))


# ---- a policy call: recording its runs, its cost and its time breakdown ------------------------------------
class _Recorder:
    """Stands in for a session: runs it and remembers every feed (to count or profile the same runs)."""

    def __init__(self, session) -> None:
        self.session, self.feeds = session, []

    def run(self, output_names, feeds, *args, **kwargs):
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.session.run(output_names, feeds, *args, **kwargs)


def record_feeds(policy, call: Callable[[], Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The feeds of every session run during ``call()`` (an ``OnnxPolicy``'s sessions), by graph name."""
    original = dict(policy.sessions)
    recorders = {name: _Recorder(s) for name, s in original.items()}
    policy.sessions.update(recorders)
    try:
        call()
    finally:
        policy.sessions.update(original)
    return {name: r.feeds for name, r in recorders.items() if r.feeds}


def policy_call_cost(policy, call: Callable[[], Any]) -> Cost:
    """What one ``call()`` of an ``OnnxPolicy`` executes, counted graph by graph."""
    feeds = record_feeds(policy, call)
    total = Cost()
    for name, runs in feeds.items():
        graph = onnx.load_from_string(policy._read_checked(name))
        total = total + graph_cost(graph, runs)
    return total


def profile_breakdown(policy, call: Callable[[], Any], calls: int = 3) -> dict[str, Any]:
    """Where ``call()``'s time goes on the policy's own session settings: ms per call by (graph, op type),
    the sessions' overhead outside their nodes, and Python outside the sessions. The first call warms up and
    is not counted. Profiling adds a little per node; the shares, not the absolute times, are the point."""
    from daptq.deploy.runtime import onnxruntime_module

    ort = onnxruntime_module()
    original = dict(policy.sessions)
    with tempfile.TemporaryDirectory() as tmp:
        profiled = {}
        for name in original:
            opts = policy.session_options() if hasattr(policy, "session_options") else ort.SessionOptions()
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, name)
            profiled[name] = ort.InferenceSession(
                policy._read_checked(name), opts, providers=["CPUExecutionProvider"]
            )
        policy.sessions.update(profiled)
        try:
            call()  # warm-up
            start = time.perf_counter()
            for _ in range(calls):
                call()
            wall = (time.perf_counter() - start) / calls
            events = {name: _read_profile(s) for name, s in profiled.items()}
        finally:
            policy.sessions.update(original)
    return summarize_profile(events, wall, calls)


def summarize_profile(events: Mapping[str, list[dict]], wall_s: float, calls: int) -> dict[str, Any]:
    """Per-call ms by (graph, op type) over the last ``calls`` calls' runs (earlier runs are warm-up).

    Runs are split by each session's ``model_run`` events; each graph's runs per call = its runs / (calls +
    1), the warm-up call being the first."""
    by_op: dict[str, float] = defaultdict(float)
    runs_ms: dict[str, float] = {}
    nodes_ms: dict[str, float] = {}
    for graph, evs in events.items():
        runs = sorted((e for e in evs if e.get("name") == "model_run"), key=lambda e: e["ts"])
        if not runs:
            continue
        per_call = len(runs) // (calls + 1)
        counted = runs[len(runs) - per_call * calls :]
        t0 = counted[0]["ts"]
        run_total = sum(r["dur"] for r in counted)
        node_total = 0.0
        for e in evs:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0:
                by_op[f"{graph}/{e['args']['op_name']}"] += e["dur"]
                node_total += e["dur"]
        runs_ms[graph] = run_total / 1e3 / calls
        nodes_ms[graph] = node_total / 1e3 / calls
    ops = {k: v / 1e3 / calls for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}
    in_runs = sum(runs_ms.values())
    return {
        "call_ms": wall_s * 1e3,
        "by_op_ms": ops,
        "graph_runs_ms": runs_ms,
        "session_overhead_ms": {g: runs_ms[g] - nodes_ms[g] for g in runs_ms},
        "python_ms": wall_s * 1e3 - in_runs,
    }


def compare_optimization_levels(
    directory: str | Path, threads: int, observation: Mapping[str, Any], repeats: int = 3
) -> dict[str, float]:
    """Best-of-``repeats`` ms per call of an export at each ONNX Runtime graph optimization level (the
    measurement behind the runtime's default, ``all``)."""
    import torch

    from daptq.deploy.runtime import OPTIMIZATION_LEVELS, OnnxPolicy

    out = {}
    for level in OPTIMIZATION_LEVELS:
        policy = OnnxPolicy(directory, threads=threads, optimization=level)
        batch = policy.observation_to_batch(observation)
        out[level] = 1e3 * _best(
            lambda p=policy, b=batch: p.predict_chunk(b, generator=torch.Generator().manual_seed(0)), repeats
        )
        del policy
    return out


# ---- the machine's rates ---------------------------------------------------------------------------------
def _session(nodes, inputs, outputs, inits, threads: int):
    from daptq.deploy.runtime import make_session

    graph = helper.make_graph(nodes, "rate", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return make_session(model.SerializeToString(), threads)


def _best(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(
    threads: int = 1,
    repeats: int = 5,
    shape: tuple[int, int, int] = RATE_SHAPE,
    copy_bytes: int = COPY_BYTES,
) -> Rates:
    """fp32 and int8 GEMM throughput, the W4A8 kernel's throughput and memory bandwidth of this machine."""
    import torch

    torch.set_num_threads(threads)
    m, k, n = shape
    ops = 2.0 * m * k * n
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    fp32 = _session(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [vi("x", TensorProto.FLOAT, [m, k])],
        [vi("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")],
        threads,
    )
    detail = {"ort_fp32_matmul": ops / _best(lambda: fp32.run(None, {"x": x}), repeats)}
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    detail["torch_fp32_mm"] = ops / _best(lambda: torch.mm(xt, wt), repeats)
    # uint8 activations with zero point 128 (int8 values shifted): MLAS' fast u8s8 path; int4-range weights
    wq = rng.integers(-8, 8, (k, n), dtype=np.int8)
    xq = rng.integers(0, 256, (m, k), dtype=np.uint8)
    int8 = _session(
        [helper.make_node("MatMulInteger", ["x", "w", "zp"], ["y"])],
        [vi("x", TensorProto.UINT8, [m, k])],
        [vi("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(np.array(128, np.uint8), "zp")],
        threads,
    )
    detail["ort_u8s8_matmul_integer"] = ops / _best(lambda: int8.run(None, {"x": xq}), repeats)
    block = 128
    packed = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    scales = np.full(n * k // block, 0.01, np.float32)
    nbits = _session(
        [
            helper.make_node(
                "MatMulNBits",
                ["x", "b", "s"],
                ["y"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=4,
            )
        ],
        [vi("x", TensorProto.FLOAT, [m, k])],
        [vi("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")],
        threads,
    )
    detail["ort_matmul_nbits_w4a8"] = ops / _best(lambda: nbits.run(None, {"x": x}), repeats)
    src = np.ones(copy_bytes // 4, np.float32)
    dst = np.empty_like(src)
    detail["copy_bytes"] = 2.0 * src.nbytes / _best(lambda: np.copyto(dst, src), repeats)
    return Rates(
        fp32_flops=max(detail["ort_fp32_matmul"], detail["torch_fp32_mm"]),
        int8_ops=detail["ort_u8s8_matmul_integer"],
        w4a8_kernel_ops=detail["ort_matmul_nbits_w4a8"],
        bandwidth_bytes=detail["copy_bytes"],
        threads=threads,
        detail=detail,
    )
