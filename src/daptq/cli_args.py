"""argparse ``type=`` converters that refuse impossible values while the command line is parsed.

A value out of range is then argparse's one line, ``daptq <command>: error: argument --lr: must be a
finite number > 0, got 'nan'``, before anything is loaded, instead of a traceback (or a silent wrong
result) later. Every numeric option of every command goes through one of these.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# Largest square image a MuJoCo offscreen buffer is asked for (the reference VLA sees 96 px): larger sizes
# end in a MuJoCo FatalError or gigabytes of frames.
MAX_IMAGE_SIZE = 1024
# Processes (each loads MuJoCo and a policy) and environments per process: a typo such as 100000 would
# otherwise spawn until the machine stops answering.
MAX_WORKERS = 256
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most samplers take 32-bit seeds
# The cameras of the Meta-World scene (its MuJoCo model's camera names; a test keeps this list in step):
# checked while parsing, so `data generate --camera typo` fails before it writes a dataset's metadata.
SCENE_CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either bound may be None)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must be an integer {_bounds_text(lo, hi, False, False)}, got {text!r}"
            )
        return value

    convert.__name__ = "integer"
    return convert


def float_in(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """A finite float between ``lo`` and ``hi`` (open or closed ends); nan and inf are always refused."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(
                f"must be a finite number {_bounds_text(lo, hi, lo_open, hi_open)}, got {text!r}"
            )
        return value

    convert.__name__ = "number"
    return convert


def int_choice(choices: tuple[int, ...], what: str) -> Callable[[str], int]:
    """One of ``choices`` (``what`` names the quantity in the error: "weight bits")."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value not in choices:
            allowed = ", ".join(map(str, choices))
            raise argparse.ArgumentTypeError(f"{what} must be one of {allowed}, got {text!r}")
        return value

    convert.__name__ = "integer"
    return convert


def nonempty(text: str) -> str:
    """A non-blank string (an empty path or name is never what a user meant)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def cameras(text: str) -> str:
    """One scene camera or several comma-separated (``corner3,topview``), each a camera of the scene."""
    from daptq.cameras import parse_cameras

    try:
        names = parse_cameras(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    unknown = [n for n in names if n not in SCENE_CAMERAS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown camera {unknown[0]!r}; the scene has: {', '.join(SCENE_CAMERAS)}"
        )
    return text


positive_int = int_in(1)
workers_int = int_in(1, MAX_WORKERS)
nonnegative_int = int_in(0)
seed_int = int_in(0, MAX_SEED)
image_size_int = int_in(8, MAX_IMAGE_SIZE)
