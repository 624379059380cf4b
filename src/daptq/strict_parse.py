"""JSON and YAML parsing that refuses duplicate keys.

``json.loads`` and ``yaml.safe_load`` keep the last of two equal keys, so a config file that says
``bits: 4`` and later ``bits: 8`` silently means 8. Every config, recipe and versioned file daptq reads
goes through these instead. A leaf module (imports nothing from daptq).
"""

from __future__ import annotations

import json
from typing import Any

import yaml


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


def load_yaml_strict(text: str) -> Any:
    """``yaml.safe_load`` refusing duplicate keys (a ``yaml.YAMLError`` naming the key and its line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
