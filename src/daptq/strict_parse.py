"""JSON and YAML parsing that refuses duplicate keys (and YAML alias bombs).

``json.loads`` and ``yaml.safe_load`` keep the last of two equal keys, so a config file that says
``bits: 4`` and later ``bits: 8`` silently means 8. YAML aliases can make a 1 kB file stand for 10^8
values ("billion laughs"), which an error message's repr then spells out until memory runs out. Every
config, recipe and versioned file daptq reads goes through these instead. A leaf module (imports nothing
from daptq).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

# Values a YAML document may stand for once its aliases are expanded (a method config has a few hundred).
MAX_YAML_NODES = 100_000


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_json_strict(text: str) -> Any:
    """``json.loads`` refusing duplicate keys in any object (ValueError, as for malformed JSON)."""
    return json.loads(text, object_pairs_hook=_unique_pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key given twice (merge keys ``<<`` may still override)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 (PyYAML's signature)
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node, limit: int) -> None:
    """Refuse a document whose aliases expand to more than ``limit`` nodes, or that refers to itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "recursive alias", node.start_mark)
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            total = 1
        open_nodes.discard(key)
        if total > limit:
            raise yaml.constructor.ConstructorError(
                None, None, f"expands to more than {limit} values (YAML aliases)", node.start_mark
            )
        sizes[key] = total
        return total

    size(root)


def load_yaml_strict(text: str) -> Any:
    """``yaml.safe_load`` refusing duplicate keys and alias bombs (a ``yaml.YAMLError`` naming the
    problem and its line)."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, MAX_YAML_NODES)
        return loader.construct_document(node)
    finally:
        loader.dispose()
