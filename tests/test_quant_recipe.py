import pytest
import torch
from torch import nn

from daptq.quant import QuantSpec, Recipe, Rule, WeightSpec, recipe_table, w4a8, weight_only


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 16)
        self.conv = nn.Conv2d(3, 8, 3)


W8, W4 = weight_only(8), weight_only(4, "per_group", 32)


def test_later_pattern_rule_wins_and_none_keeps_float():
    recipe = Recipe((Rule("*", W8), Rule("encoder.*", W4), Rule("encoder.2", None, "exact")))
    specs = recipe.resolve(Toy())
    assert specs == {"encoder.0": W4, "head": W8, "conv": W8}


def test_exact_rule_beats_later_pattern():
    recipe = Recipe((Rule("head", W4, "exact"), Rule("*", W8)))
    assert recipe.resolve(Toy())["head"] == W4


def test_regex_uses_fullmatch():
    specs = Recipe((Rule(r"encoder\.\d", W8, "regex"),)).resolve(Toy())
    assert set(specs) == {"encoder.0", "encoder.2"}
    with pytest.raises(ValueError, match="matches no"):
        Recipe((Rule(r"encoder", W8, "regex"),)).resolve(Toy())  # fullmatch, not search


def test_exact_rule_naming_missing_module_is_an_error():
    with pytest.raises(ValueError, match="'decoder.0', which does not exist"):
        Recipe((Rule("decoder.0", W8, "exact"),)).resolve(Toy())


def test_exact_rule_naming_non_quantizable_module_is_an_error():
    with pytest.raises(ValueError, match="a ReLU"):
        Recipe((Rule("encoder.1", W8, "exact"),)).resolve(Toy())


def test_pattern_matching_nothing_is_reported_unless_not_strict():
    recipe = Recipe((Rule("*", W8), Rule("vision.*", W4)))
    with pytest.raises(ValueError, match="'vision.\\*' \\(glob\\) matches no"):
        recipe.resolve(Toy())
    assert len(recipe.resolve(Toy(), strict=False)) == 4


def test_bad_rule_fields():
    with pytest.raises(ValueError, match="match must be"):
        Rule("x", W8, "fuzzy")
    with pytest.raises(ValueError, match="invalid regex"):
        Rule("(", W8, "regex")


def test_bit_map_is_a_recipe():
    recipe = Recipe.from_bit_map({"encoder.0": 4, "encoder.2": 8, "head": 16}, w4a8(32))
    specs = recipe.resolve(Toy())
    assert specs["encoder.0"].weight.bits == 4 and specs["encoder.2"].weight.bits == 8
    assert specs["encoder.0"].activation == w4a8().activation
    assert "head" not in specs


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_round_trips_through_files(tmp_path, suffix):
    recipe = Recipe((Rule("*", w4a8(32)), Rule(r"head", None, "regex"), Rule("conv", W8, "exact")))
    path = tmp_path / f"recipe{suffix}"
    recipe.save(path)
    assert Recipe.load(path) == recipe
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_yaml_example_parses():
    text = """
version: 1
rules:
  - target: "*"
    match: glob
    spec: {weight: {bits: 4, granularity: per_group, group_size: 32}}
  - target: head
    match: exact
    spec: null
"""
    recipe = Recipe.from_yaml(text)
    specs = recipe.resolve(Toy())
    assert specs["encoder.0"] == QuantSpec(WeightSpec(4, granularity="per_group", group_size=32))
    assert "head" not in specs


def test_recipe_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Recipe.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="does not parse"):
        Recipe.load(bad)
    with pytest.raises(ValueError, match="must end in"):
        Recipe((Rule("*", W8),)).save(tmp_path / "r.txt")


def test_recipe_table_lists_every_module_with_bytes():
    torch.manual_seed(0)
    table = recipe_table(Toy(), Recipe((Rule("*", W8), Rule("head", None, "exact"))))
    lines = table.splitlines()
    assert len(lines) == 2 + 4 + 1
    assert (
        "| encoder.0 | (64, 32) | W8c-sym-minmax | 4.00 KiB | 2.12 KiB |" in table
    )  # 2048 + 64*2 scale bytes
    assert "| head | (16, 64) | float |" in table


def test_multihead_attention_out_proj_is_not_quantizable():
    """MHA reads out_proj.weight directly, so swapping the module would silently do nothing."""
    model = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    specs = Recipe.uniform(W8).resolve(model)
    assert set(specs) == {"linear1", "linear2"}
    with pytest.raises(ValueError, match="MultiheadAttention"):
        Recipe((Rule("self_attn.out_proj", W8, "exact"),)).resolve(model)


@pytest.mark.parametrize(
    "data",
    [
        {"rules": None},
        {"rules": [{"target": None, "spec": None}]},
        {"rules": [{"target": "*", "match": None, "spec": None}]},
        {"rules": [{"target": "*", "spec": {"weight": {"bits": 4, "symmetric": "false"}}}]},
        {"rules": [{"target": "*", "spec": {"weight": {"bits": 4.0}}}]},
    ],
)
def test_recipe_fields_are_strictly_typed(data):
    with pytest.raises(ValueError, match="rules|target|match|symmetric|bits"):
        Recipe.from_dict(data)


def test_null_module_lists_are_clear_errors():
    with pytest.raises(ValueError, match="rules must be a list"):
        Recipe(None)
    with pytest.raises(ValueError, match="exclude must be a list"):
        Recipe.uniform(QuantSpec(), exclude=None)
