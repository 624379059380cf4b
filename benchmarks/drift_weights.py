"""DA-PTQ's per-dimension drift weights (``daptq.methods.daptq.drift``) on each suite's declared action space,
under each prior: the paper's virtual chain, the rigid-body fingertip Jacobian (with and without a grasped
object's centre as a further lever-arm point), and the paper's fixed 1.8 / 0.15.

The chain depends on the calibration actions; it is shown for actions uniform in [-1, 1]^D (seed 0, 4096
actions) and at a = 0. The fingertip and fixed priors do not depend on the actions.

    python benchmarks/drift_weights.py --out results/drift_weights
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from daptq.atomic import atomic_write_json, atomic_write_text

# A bowl grasped by its rim (daptq.envs.libero_expert): its centre ~5 cm from the grip site along the radius
# (world x at the home orientation) and ~2 cm below.
BOWL_CENTRE = (0.05, 0.0, -0.02)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/drift_weights")
    args = p.parse_args()
    from daptq.envs.suite import get_suite
    from daptq.methods.daptq.drift import PANDA_FINGERTIPS, DriftConfig, drift_scores
    from daptq.models.adapter import ActionSpace

    priors = {
        "chain, actions uniform in [-1, 1]": (DriftConfig(), "uniform"),
        "chain, a = 0": (DriftConfig(), "zero"),
        "fingertip (pads)": (DriftConfig(jacobian="fingertip"), "zero"),
        "fingertip (pads + bowl centre)": (
            DriftConfig(jacobian="fingertip", lever_arms=PANDA_FINGERTIPS + (BOWL_CENTRE,)),
            "zero",
        ),
        "fixed (paper 1.8 / 0.15)": (DriftConfig(jacobian="fixed"), "zero"),
    }
    result = {"command": f"python benchmarks/drift_weights.py --out {args.out}", "suites": {}}
    lines = [
        "# DA-PTQ drift weights per action dimension (normalized, mean 1)",
        "",
        f"`{result['command']}`",
        "",
    ]
    for name in ("metaworld", "libero"):
        space = ActionSpace.from_dict(get_suite(name).action_space.to_dict())
        rows = {}
        for label, (cfg, actions) in priors.items():
            a = (
                np.random.default_rng(0).uniform(-1, 1, size=(4096, space.dim))
                if actions == "uniform"
                else np.zeros((1, space.dim))
            )
            rows[label] = {"config": cfg.to_dict(), "weights": drift_scores(a, space, cfg).tolist()}
        result["suites"][name] = {"names": list(space.names), "kinds": list(space.kinds), "priors": rows}
        lines += [
            f"## {name}",
            "",
            "| prior | " + " | ".join(space.names) + " |",
            "|---" * (space.dim + 1) + "|",
        ]
        lines += [f"| {k} | " + " | ".join(f"{w:.3f}" for w in v["weights"]) + " |" for k, v in rows.items()]
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
