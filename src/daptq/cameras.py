"""Camera settings: one camera name or several joined by commas.

A leaf module (no simulator import), so model configs can validate a camera setting without loading MuJoCo.
"""

from __future__ import annotations


def parse_cameras(camera: str) -> tuple[str, ...]:
    """Camera names of a camera setting: one name ("corner3") or several joined by commas ("corner3,topview").

    Several cameras give the policy several views of one moment (a stereo cue for goals floating in the air);
    their images are stacked along a leading view axis in that order.
    """
    if not isinstance(camera, str) or not camera:
        raise ValueError(f"camera must be a non-empty string of comma-separated names, got {camera!r}")
    names = tuple(name.strip() for name in camera.split(","))
    if any(not name for name in names):
        raise ValueError(f"empty camera name in {camera!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate camera in {camera!r}")
    return names
