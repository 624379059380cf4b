"""Reading the JSON files daptq writes with a format name and version (run configs, quantization configs).

One reader, so every such file fails the same clear way: not JSON, not an object, another format, or a
version this daptq cannot read. A leaf module (imports nothing from daptq), so ``daptq.quant`` may use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: unreadable, not valid JSON ({exc})") from None
    if not isinstance(content, dict) or content.get("format") != format_name:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{path}: not a {description} (format={found!r}, expected {format_name!r})")
    if content.get("format_version") != format_version:
        raise ValueError(
            f"{path}: {description} format_version {content.get('format_version')!r} is not supported "
            f"(this daptq reads {format_version})"
        )
    return content
