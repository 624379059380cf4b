"""Bit allocation: Eq. 20's map and the MILP allocator against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from daptq.methods.daptq.allocation import (
    GROUPED_FORMATS,
    LayerShape,
    WeightFormat,
    allocate_bits,
    budget_from_average_bits,
    layer_bytes,
    paper_bit_map,
)
from daptq.quant import WeightSpec

BITS = (2, 3, 4, 8, 16)
SPECS = {b: WeightSpec(b, symmetric=False, granularity="per_group", group_size=16) for b in BITS}


def _instance(seed, n_layers):
    rng = np.random.default_rng(seed)
    shapes = {
        f"l{i}": LayerShape(int(rng.choice([16, 32, 48])), int(rng.choice([16, 32, 64])))
        for i in range(n_layers)
    }
    costs = {}
    for name in shapes:
        base = rng.uniform(0.1, 10)
        costs[name] = {b: base * float(rng.uniform(0.5, 1.5)) * 4.0 ** (-b) if b < 16 else 0.0 for b in BITS}
    return costs, shapes


def _brute_force(costs, shapes, budget):
    names = list(costs)
    best = (np.inf, None)
    for combo in itertools.product(BITS, repeat=len(names)):
        size = sum(layer_bytes(shapes[n], b, SPECS) for n, b in zip(names, combo, strict=True))
        if size <= budget:
            obj = sum(costs[n][b] for n, b in zip(names, combo, strict=True))
            if obj < best[0]:
                best = (obj, combo)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_is_optimal_against_brute_force(seed):
    costs, shapes = _instance(seed, 4)
    n = sum(s.n_weights for s in shapes.values())
    for avg in (3.2, 3.6, 5.5, 9.0):
        budget = budget_from_average_bits(shapes, avg)
        best, _ = _brute_force(costs, shapes, budget)
        alloc = allocate_bits(costs, shapes, SPECS, budget)
        assert alloc.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert alloc.total_bytes <= budget == int(avg * n / 8)
        assert alloc.total_bytes == sum(layer_bytes(shapes[k], b, SPECS) for k, b in alloc.bits.items())
        assert alloc.average_bits <= avg


def test_average_bits_count_scales_and_zero_points():
    shapes = {"a": LayerShape(32, 64)}
    alloc = allocate_bits({"a": {4: 1.0, 16: 0.0}}, shapes, SPECS, budget_from_average_bits(shapes, 5.5))
    assert alloc.bits == {"a": 4}
    # 4-bit codes + one bf16 scale and a 4-bit zero point per group of 16: 4 + 16/16 + 4/16 = 5.25 bits
    assert alloc.average_bits == pytest.approx(4 + 16 / 16 + 4 / 16)
    with pytest.raises(ValueError, match="smallest feasible budget .* 1344 bytes"):
        allocate_bits({"a": {4: 1.0, 16: 0.0}}, shapes, SPECS, budget_from_average_bits(shapes, 5.0))


def test_infeasible_budget_names_the_smallest_feasible_one():
    costs, shapes = _instance(0, 3)
    smallest = sum(layer_bytes(s, 2, SPECS) for s in shapes.values())
    with pytest.raises(ValueError, match=f"smallest feasible budget for these 3 layers is {smallest} bytes"):
        allocate_bits(costs, shapes, SPECS, smallest - 1)
    assert set(allocate_bits(costs, shapes, SPECS, smallest).bits.values()) == {2}


def test_latency_term_moves_the_optimum():
    shapes = {"a": LayerShape(32, 32), "b": LayerShape(32, 32)}
    costs = {"a": {4: 1.0, 8: 0.5}, "b": {4: 1.0, 8: 0.5}}
    big = 10**9
    assert set(allocate_bits(costs, shapes, SPECS, big).bits.values()) == {8}
    latency = {"a": {4: 0.0, 8: 1.0}, "b": {4: 0.0, 8: 0.1}}
    alloc = allocate_bits(costs, shapes, SPECS, big, latency=latency, latency_weight=1.0)
    assert alloc.bits == {"a": 4, "b": 8}


def test_paper_bit_map():
    phi = {
        f"head.blocks.{i}.{m}": float(10 * i + j)
        for i in range(3)
        for j, m in enumerate(("qkv", "proj", "fc"))
    }
    phi.update({"head.z_proj": 100.0, "head.action_in": 0.5, "head.action_out": 50.0, "head.t_embed.fc": 1.0})
    blocks = {n: int(n.split(".")[2]) for n in phi if n.startswith("head.blocks.")}  # the adapter declares
    two = paper_bit_map(phi, keep_float_fraction=0.3, block_of=blocks, float_blocks=2)
    assert sorted(two.float_by_block) == sorted(
        n for n in phi if n.startswith(("head.blocks.1.", "head.blocks.2."))
    )
    # 7 ranked layers, round(0.3 * 7) = 2 stay float: the two largest phi.
    assert two.float_by_rank == ["head.z_proj", "head.action_out"]
    assert {n for n, b in two.bits.items() if b == 4} == {
        "head.blocks.0.qkv", "head.blocks.0.proj", "head.blocks.0.fc", "head.action_in", "head.t_embed.fc"
    }  # fmt: skip
    one = paper_bit_map(phi, block_of=blocks, float_blocks=1)
    assert one.float_by_rank == ["head.z_proj", "head.action_out", "head.blocks.1.fc"]  # round(0.3*10)=3
    with pytest.raises(ValueError, match="has 3 blocks"):
        paper_bit_map(phi, block_of=blocks, float_blocks=4)
    with pytest.raises(ValueError, match="no ranked layer lies in a block"):
        paper_bit_map(phi, float_blocks=1)


def test_per_layer_specs_count_each_layers_own_grid():
    shapes = {"a": LayerShape(8, 32), "b": LayerShape(8, 24)}
    per_layer = {
        "a": {4: WeightSpec(4, granularity="per_group", group_size=16), 16: WeightSpec(16)},
        "b": {4: WeightSpec(4, granularity="per_group", group_size=8), 16: WeightSpec(16)},
    }
    costs = {"a": {4: 1.0, 16: 0.0}, "b": {4: 1.0, 16: 0.0}}
    alloc = allocate_bits(costs, shapes, per_layer, 10**6)
    assert alloc.bits == {"a": 16, "b": 16}
    tight = allocate_bits(costs, shapes, per_layer, 8 * 32 // 2 + 16 * 2 + 8 * 24 * 2)
    assert tight.bits == {"a": 4, "b": 16}
    with pytest.raises(ValueError, match="no specs for layer 'b'"):
        allocate_bits(costs, shapes, {"a": per_layer["a"]}, 10**6)


# --- (bits, group) formats ---------------------------------------------------------------------------------
BASE = WeightSpec(4, symmetric=False, granularity="per_group", group_size=32)
FORMATS = tuple(WeightFormat.parse(f) for f in GROUPED_FORMATS)
FORMAT_SPECS = {f: f.weight_spec(BASE) for f in FORMATS}


def test_format_bytes_equal_a_hand_computation():
    shape = LayerShape(64, 256)  # 16384 weights; asymmetric codes, one bf16 scale + a zero point per group
    by_hand = {
        "2g32": 16384 * 2 // 8 + 512 * 2 + 512 * 2 // 8,  # 4096 codes + 1024 scales + 128 zero points
        "2g128": 4096 + 128 * 2 + 128 * 2 // 8,  # 4384 bytes = 2.140625 bits per weight
        "3g32": 16384 * 3 // 8 + 512 * 2 + 512 * 3 // 8,
        "3g128": 6144 + 128 * 2 + 128 * 3 // 8,
        "4g32": 8192 + 512 * 2 + 512 * 4 // 8,
        "4g128": 8192 + 128 * 2 + 128 * 4 // 8,
        "8pc": 16384 + 64 * 2 + 64,  # one scale and one 8-bit zero point per output channel
        "16": 16384 * 2,
    }
    got = {f.label: layer_bytes(shape, f, FORMAT_SPECS) for f in FORMATS}
    assert got == by_hand
    assert 8 * got["2g32"] / 16384 == pytest.approx(2.5625) and 8 * got["2g128"] / 16384 == 2.140625


def test_weight_format_parsing_names_the_problem():
    assert [f.label for f in FORMATS] == list(GROUPED_FORMATS)
    assert WeightFormat.parse("8pc").weight_spec(BASE).granularity == "per_channel"
    assert WeightFormat.parse("16").weight_spec(BASE).is_float
    for bad in ("2", "2g", "5g32", "16g32", "2g1"):
        with pytest.raises(ValueError, match="format|WeightFormat"):
            WeightFormat.parse(bad)


def _format_instance(seed, n_layers):
    rng = np.random.default_rng(seed)
    shapes = {
        f"l{i}": LayerShape(int(rng.choice([8, 16])), int(rng.choice([128, 256]))) for i in range(n_layers)
    }
    costs = {}
    for name, shape in shapes.items():
        w = rng.normal(size=(shape.out_features, shape.fan_in))
        scale = rng.uniform(0.1, 10)  # a layer's damage: its RTN error under each format, so groups matter
        costs[name] = {f: scale * float(((_rtn(w, spec) - w) ** 2).sum()) for f, spec in FORMAT_SPECS.items()}
    return costs, shapes


def _rtn(w, spec):
    import torch

    from daptq.quant.fake import fake_quantize_weight

    return fake_quantize_weight(torch.tensor(w), spec).numpy() if not spec.is_float else w


def test_milp_over_formats_is_optimal_against_brute_force():
    for seed in range(3):
        costs, shapes = _format_instance(seed, 3)
        names = list(costs)
        n = sum(s.n_weights for s in shapes.values())
        for avg in (2.2, 2.5, 3.0, 4.4, 9.0):
            budget = budget_from_average_bits(shapes, avg)
            best = np.inf
            for combo in itertools.product(FORMATS, repeat=len(names)):
                size = sum(layer_bytes(shapes[k], f, FORMAT_SPECS) for k, f in zip(names, combo, strict=True))
                if size <= budget:
                    best = min(best, sum(costs[k][f] for k, f in zip(names, combo, strict=True)))
            alloc = allocate_bits(costs, shapes, FORMAT_SPECS, budget)
            assert alloc.objective == pytest.approx(best, rel=1e-9)
            assert alloc.total_bytes <= budget and alloc.average_bits <= avg
            assert alloc.total_bytes == sum(
                layer_bytes(shapes[k], f, FORMAT_SPECS) for k, f in alloc.bits.items()
            )
            assert 8 * alloc.total_bytes / n == pytest.approx(alloc.average_bits)


def test_a_2_2_bit_budget_is_feasible_with_groups_of_128_only():
    costs, shapes = _format_instance(0, 4)
    budget = budget_from_average_bits(shapes, 2.2)
    alloc = allocate_bits(costs, shapes, FORMAT_SPECS, budget)
    assert alloc.average_bits <= 2.2 and alloc.total_bytes <= budget
    assert WeightFormat(2, 128) in set(alloc.bits.values())
    g32 = {f: s for f, s in FORMAT_SPECS.items() if f.group_size in (32, None)}  # today's grid
    smallest = sum(layer_bytes(s, WeightFormat(2, 32), g32) for s in shapes.values())
    with pytest.raises(ValueError, match=f"smallest feasible budget for these 4 layers is {smallest} bytes"):
        allocate_bits({k: {f: c[f] for f in g32} for k, c in costs.items()}, shapes, g32, budget)
