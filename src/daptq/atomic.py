"""Atomic file writes, the one implementation every daptq package uses.

A temporary file in the target directory is written, flushed to disk, given normal permissions and renamed
over the target, so a reader (or a resumed run) never sees half a file; an interrupted write leaves nothing.
This module is a leaf: it imports nothing from daptq, so even ``daptq.quant`` may use it.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temp file in the same directory, fsync, then os.replace: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Pretty, key-sorted JSON (stable diffs, stable config comparisons on resume)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], compressed: bool = True) -> None:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


# ---- whole directories -------------------------------------------------------------------------------------
# A directory daptq writes (a quantized policy, a checkpoint, an ONNX export) is assembled in a hidden sibling
# ``.NAME.daptq-tmp-PID-RAND`` and swapped in. Where the filesystem can exchange two paths atomically (Linux
# renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs, tmpfs) the target is never missing; elsewhere the old target is
# first renamed to ``.NAME.daptq-old-PID-RAND``, and a kill between the two renames leaves no target. Either
# way the names carry the writer's process id, so a later save or load of the same target recognises the
# leftovers of a writer that died, puts a torn swap's old directory back and deletes the rest.

TMP_TAG = "daptq-tmp"
OLD_TAG = "daptq-old"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<tag>daptq-tmp|daptq-old)-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's own save is in flight (it cleans up after itself)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def leftovers(target: str | os.PathLike) -> list[tuple[Path, str, int]]:
    """``(path, tag, pid)`` of every hidden temp/backup directory a save of ``target`` left beside it."""
    target = Path(target)
    found = []
    try:
        entries = list(target.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == target.name:
            found.append((p, m["tag"], int(m["pid"])))
    return found


def recover_directory(target: str | os.PathLike) -> list[str]:
    """Clean what killed saves of ``target`` left; returns one line per action taken (empty: nothing to do).

    A missing ``target`` beside the backup of a swap that never finished gets that backup back (the state
    before the killed save); temp directories of dead writers are deleted; a live writer's are left alone.
    """
    target = Path(target)
    dead = [(p, tag) for p, tag, pid in leftovers(target) if not _pid_alive(pid)]
    done: list[str] = []
    olds = sorted((p for p, tag in dead if tag == OLD_TAG), key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not os.path.lexists(target):
        os.rename(olds[0], target)
        done.append(
            f"restored {target} from {olds[0].name}: a save was killed while swapping directories, "
            "the previous version is back"
        )
    for p, _ in dead:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by a killed save of {target.name}")
    return done


def describe_leftovers(target: str | os.PathLike) -> str:
    """What saves of ``target`` left beside it, for an error about a missing ``target`` ("" if nothing)."""
    found = leftovers(target)
    if not found:
        return ""
    parts = [
        f"{p.name} ({'backup of the previous version' if tag == OLD_TAG else 'new version being written'}, "
        f"process {pid} {'running' if _pid_alive(pid) else 'gone'})"
        for p, tag, pid in found
    ]
    return f"; a save of it is in progress or was interrupted, beside it: {', '.join(parts)}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_in_directory(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target`` (replacing it); the old content is deleted."""
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old content
    else:
        old = _sibling(target, OLD_TAG)
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def write_directory(
    target: str | os.PathLike,
    build: Callable[[Path], None],
    check_replaceable: Callable[[Path], None] | None = None,
) -> Path:
    """Write the directory ``target`` all at once: ``build(tmp)`` fills a hidden sibling, which then replaces
    ``target``. ``check_replaceable(target)`` runs first when ``target`` exists and raises to refuse (only
    what daptq wrote may be replaced). Leftovers of earlier killed saves of ``target`` are cleaned first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    if os.path.lexists(target) and check_replaceable is not None:
        check_replaceable(target)
    tmp = _sibling(target, TMP_TAG)
    tmp.mkdir()
    try:
        build(tmp)
        swap_in_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
