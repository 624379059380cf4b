"""Checks of the paths a user gives, made before any work starts, with errors that name the option.

Each command checks its outputs and inputs here first, so a path that cannot work (empty, a file where a
directory goes, under a file, not writable, missing) is one ``error:`` line at start-up, not a traceback
after a long run. Every check raises ``ValueError`` (``FileNotFoundError`` for a missing input), which the
``daptq`` command prints as ``daptq <command>: error: ...``.
"""

from __future__ import annotations

import os
from pathlib import Path

_WRITABLE = os.W_OK | os.X_OK


def _writable(directory: Path) -> bool:
    """Whether new entries can be made in ``directory`` (a separate function so tests can deny it)."""
    return os.access(directory, _WRITABLE)


def _nonempty(path: str | os.PathLike | None, option: str) -> Path:
    if path is None or not str(path).strip():
        raise ValueError(f"{option}: empty path; give a file or directory name")
    if "\0" in str(path):
        raise ValueError(f"{option}: the path contains a NUL byte")
    return Path(path)  # as the command will use it: no ~ expansion (the shell's job)


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (the directory a new path would be made in)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, option: str, what: str) -> None:
    """``path`` does not exist yet: its nearest existing ancestor must be a writable directory."""
    anc = _nearest_existing(path)
    if not anc.is_dir():
        raise ValueError(f"{option} {path}: {anc} is a file, so no {what} can be made under it")
    if not _writable(anc):
        raise ValueError(f"{option} {path}: cannot create it, {anc} is not writable (permission denied)")


def check_output_dir(path: str | os.PathLike | None, option: str = "--out", *, named: bool = True) -> Path:
    """The output directory ``path`` if it can be written: an existing writable directory, or a new path
    whose nearest existing ancestor is a writable directory. Refuses an empty path, a file, a path under
    a file and an unwritable place; with ``named``, also ``.``, ``..`` and ``/`` (daptq's outputs are
    directories of their own, some replaced as a whole). Creates nothing."""
    p = _nonempty(path, option)
    if named and p.name in ("", ".", ".."):
        raise ValueError(f"{option} {path}: give the output directory a name of its own (such as out/run)")
    if p.is_symlink() and not p.exists():
        raise ValueError(f"{option} {p}: is a broken symbolic link")
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{option} {p}: is a file, not a directory")
        if not _writable(p):
            raise ValueError(f"{option} {p}: directory is not writable (permission denied)")
        return p
    _check_creatable(p, option, "directory")
    return p


def check_output_file(path: str | os.PathLike | None, option: str = "--out") -> Path:
    """The output file ``path`` if it can be written (it may exist as a file, to be replaced); a directory,
    a path under a file and an unwritable place are refused. Creates nothing."""
    p = _nonempty(path, option)
    if p.is_dir():
        raise ValueError(f"{option} {p}: is a directory, not a file")
    if p.exists():
        if not _writable(p.absolute().parent):
            raise ValueError(f"{option} {p}: its directory is not writable (permission denied)")
        return p
    _check_creatable(p, option, "file")
    return p


def check_input_dir(path: str | os.PathLike | None, option: str) -> Path:
    """An existing directory to read from (FileNotFoundError if missing, ValueError if a file)."""
    p = _nonempty(path, option)
    if not p.exists():
        raise FileNotFoundError(f"{option} {p}: no such directory")
    if not p.is_dir():
        raise ValueError(f"{option} {p}: is a file, not a directory")
    return p


def check_input_file(path: str | os.PathLike | None, option: str) -> Path:
    """An existing regular file to read from (FileNotFoundError if missing, ValueError if a directory)."""
    p = _nonempty(path, option)
    if not p.exists():
        raise FileNotFoundError(f"{option} {p}: no such file")
    if p.is_dir():
        raise ValueError(f"{option} {p}: is a directory, not a file")
    if not p.is_file():
        raise ValueError(f"{option} {p}: is not a regular file")
    return p


def not_a_quantized_policy(directory: str | os.PathLike) -> str:
    """Why ``directory`` (which has no quantization_config.json) is not a quantized policy directory:
    missing, a file, an evaluation run, an ONNX export, or (if it is none of these) a torn save."""
    d = Path(directory)
    if not d.exists():
        return f"{d}: no such directory"
    if not d.is_dir():
        return f"{d}: is a file, not a quantized policy directory"
    if (d / "episodes.jsonl").exists() or (d / "summary.json").exists():
        return f"{d}: is an evaluation run directory (daptq eval), not a quantized policy"
    if (d / "manifest.json").is_file():
        return f"{d}: is an ONNX export; load it as onnx:{d}"
    if not any(d.iterdir()):
        return f"{d}: is an empty directory, not a quantized policy"
    return (
        f"{d} is not a quantized policy directory: quantization_config.json is missing (it is written "
        "last, so an interrupted save leaves none; `daptq quantize` writes such directories)"
    )
