"""Reading the JSON files daptq writes with a format name and version (run configs, quantization configs).

One reader, so every such file fails the same clear way: not JSON, a key given twice, not an object, another
format, or a version this daptq cannot read. Imports only the leaf ``daptq.strict_parse``, so ``daptq.quant``
may use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from daptq.strict_parse import loads_json_strict


def read_versioned_json(
    path: str | os.PathLike, format_name: str, format_version: int, description: str
) -> dict[str, Any]:
    """The object in ``path`` if its "format" is ``format_name`` and its "format_version" is readable.

    ``description`` names the file in errors ("not a <description>"). A missing file is FileNotFoundError;
    anything else wrong is ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{description} not found: {path}")
    try:
        content = loads_json_strict(path.read_text(encoding="utf-8"))  # a duplicate key is an error
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: unreadable, not valid JSON ({exc})") from None
    if not isinstance(content, dict) or content.get("format") != format_name:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path}: not a {description} (format={found!r}, expected {format_name!r})")
    version = content.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(
            f"{path}: {description} format_version must be an integer, got {version!r} "
            f"(this daptq reads {format_version})"
        )
    if version != format_version:
        raise ValueError(
            f"{path}: {description} format_version {content.get('format_version')!r} is not supported "
            f"(this daptq reads {format_version})"
        )
    return content
