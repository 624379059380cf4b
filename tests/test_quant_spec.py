import pytest

from daptq.quant import ActivationSpec, QuantSpec, WeightSpec, spec_from_bits, w4a8


@pytest.mark.parametrize("bits", [1, 5, 6, 7, 32, True])
def test_unsupported_weight_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        WeightSpec(bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_supported_weight_bits_accepted(bits):
    assert WeightSpec(bits=bits).bits == bits


def test_group_size_rules():
    with pytest.raises(ValueError, match="group_size"):
        WeightSpec(4, granularity="per_group")
    with pytest.raises(ValueError, match="group_size"):
        WeightSpec(4, granularity="per_group", group_size=1)
    with pytest.raises(ValueError, match="given but granularity"):
        WeightSpec(4, granularity="per_channel", group_size=32)


def test_bad_enums_and_percentile():
    with pytest.raises(ValueError, match="observer"):
        WeightSpec(observer="kl")
    with pytest.raises(ValueError, match="granularity"):
        WeightSpec(granularity="per_row")
    with pytest.raises(ValueError, match="percentile"):
        WeightSpec(observer="percentile", percentile=120)
    with pytest.raises(ValueError, match="mode"):
        ActivationSpec(mode="per_channel")
    with pytest.raises(ValueError, match="bits"):
        ActivationSpec(bits=3)
    with pytest.raises(ValueError, match="observer must be minmax"):
        ActivationSpec(mode="dynamic_per_token", observer="mse")


def test_integer_ranges():
    assert (WeightSpec(4).qmin, WeightSpec(4).qmax) == (-8, 7)
    assert (WeightSpec(3, symmetric=False).qmin, WeightSpec(3, symmetric=False).qmax) == (0, 7)
    assert (WeightSpec(8).qmin, WeightSpec(8).qmax) == (-128, 127)


@pytest.mark.parametrize(
    "spec",
    [
        w4a8(64),
        QuantSpec(WeightSpec(3, False, "per_tensor", observer="mse", scale_dtype="float32")),
        QuantSpec(WeightSpec(8), ActivationSpec(8, False, "static_per_tensor", "percentile", 99.5)),
        QuantSpec(WeightSpec(16)),
    ],
)
def test_spec_round_trips_through_dict(spec):
    d = spec.to_dict()
    assert d["version"] == 1
    assert QuantSpec.from_dict(d) == spec


def test_from_dict_rejects_unknown_fields_and_versions():
    d = w4a8().to_dict()
    d["weight"]["bitz"] = 4
    with pytest.raises(ValueError, match="unknown field"):
        QuantSpec.from_dict(d)
    d = w4a8().to_dict()
    d["version"] = 99
    with pytest.raises(ValueError, match="version"):
        QuantSpec.from_dict(d)


def test_spec_from_bits_matches_cli_meaning():
    assert spec_from_bits(4, 8, 128) == w4a8(128)
    assert spec_from_bits(8) == QuantSpec(WeightSpec(8))
    assert spec_from_bits(8, 16).activation is None
    with pytest.raises(ValueError, match="bits must be one of"):
        spec_from_bits(5)
    with pytest.raises(ValueError, match="ActivationSpec: bits"):
        spec_from_bits(4, 2, 32)


@pytest.mark.parametrize(
    "weight",
    [
        {"bits": 4.0},
        {"bits": 4, "symmetric": "false"},
        {"bits": 4, "symmetric": 0},
        {"bits": 4, "granularity": "per_group", "group_size": 32.0},
        {"bits": 4, "percentile": "99"},
        {"bits": 4, "observer": None},
    ],
)
def test_spec_fields_are_strictly_typed(weight):
    """JSON/YAML values of the wrong type are refused, never read by truthiness or float equality."""
    with pytest.raises(ValueError, match="WeightSpec"):
        QuantSpec.from_dict({"weight": weight})


@pytest.mark.parametrize("act", [{"bits": 8.0}, {"bits": 8, "symmetric": "false"}, "int8"])
def test_activation_spec_fields_are_strictly_typed(act):
    with pytest.raises(ValueError, match="ActivationSpec|activation"):
        QuantSpec.from_dict({"weight": {"bits": 8}, "activation": act})


def test_null_weight_and_percentile_int_are_handled():
    with pytest.raises(ValueError, match="weight must be a mapping"):
        QuantSpec.from_dict({"weight": None})
    assert WeightSpec(4, percentile=99).percentile == 99.0
