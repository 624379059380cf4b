"""Integrity of the directories daptq writes: file digests, self-checked JSON, and who may be replaced.

Every file that decides how a saved policy behaves is covered by a sha256: tensors and graphs by a digest
recorded in the JSON file written last, and that JSON file by a digest of its own content
(``content_sha256``, over the canonical JSON of every other key), so an edited layout, record or manifest
field fails to load instead of changing the policy's actions. A leaf module: ``daptq.quant`` may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

CONTENT_KEY = "content_sha256"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_digest(obj: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``obj`` without its own ``content_sha256`` key."""
    body = {k: v for k, v in obj.items() if k != CONTENT_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def signed(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` with its ``content_sha256`` set."""
    return {**obj, CONTENT_KEY: content_digest(obj)}


def check_signed(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse a JSON object whose content does not match its recorded ``content_sha256``."""
    recorded = obj.get(CONTENT_KEY)
    if not isinstance(recorded, str):
        raise ValueError(f"{path}: no '{CONTENT_KEY}' (its content is not checksummed); refusing to load it")
    try:
        actual = content_digest(obj)
    except ValueError as exc:  # NaN / Infinity: never written by daptq
        raise ValueError(f"{path}: content is not valid JSON for daptq ({exc})") from None
    if actual != recorded:
        raise ValueError(
            f"{path}: content checksum mismatch (sha256 {actual[:16]}..., recorded {recorded[:16]}...); the "
            "file was edited or corrupted after it was saved"
        )


def check_file_digests(directory: Path, files: Any, required: Collection[str], owner: Path) -> None:
    """Every name in ``files`` (a map name -> sha256, from ``owner``) exists in ``directory`` with that
    digest; ``required`` names must all be listed, and nothing outside the directory may be named."""
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{owner}: 'files' must map each file of the directory to its sha256; it is missing")
    missing = sorted(set(required) - set(files))
    if missing:
        raise ValueError(f"{owner}: 'files' does not list {', '.join(missing)}")
    for name, expected in files.items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"{owner}: 'files' names {name!r}, not a plain file name of the directory")
        if not isinstance(expected, str):
            raise ValueError(f"{owner}: 'files' entry {name!r} must be a sha256 hex string")
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: {name} is missing (listed in {owner.name})")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"{path}: checksum mismatch (sha256 {actual[:16]}..., recorded {expected[:16]}...); the file "
                "was changed or corrupted after it was saved, or belongs to another save"
            )


def check_daptq_directory(
    target: Path, marker: str, format_name: str, allowed: Collection[str], what: str, hint: str = ""
) -> None:
    """Raise unless ``target`` is empty or a directory daptq wrote: ``marker`` is a JSON object whose
    "format" is ``format_name`` and every entry is one of ``allowed`` (a file a user added would be lost)."""
    if target.is_symlink():
        raise ValueError(f"{target} is a symbolic link; refusing to replace it (give the real directory)")
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; refusing to replace it")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    found = None
    try:
        content = json.loads((target / marker).read_text(encoding="utf-8"))
        found = content.get("format") if isinstance(content, dict) else None
    except (OSError, ValueError, RecursionError):
        pass
    if found != format_name:
        raise ValueError(
            f"{target} exists and is not {what} (no {marker} with format {format_name!r}); refusing to "
            f"replace it{hint}"
        )
    foreign = [e for e in entries if e not in allowed]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{target} is {what} but also holds files daptq did not write ({shown}); refusing to replace it"
            f"{hint}"
        )
