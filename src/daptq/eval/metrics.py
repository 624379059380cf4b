"""Metric functions for paired closed-loop evaluation; each one is defined in docs/evaluation.md.

Pure numpy/scipy on arrays, no simulator, so each is unit-tested against a hand computation.
Conventions: ``ee`` arrays are end-effector positions ``(T + 1, 3)`` in metres (the pose after reset, then the
pose after each of the T actions); ``actions`` are ``(T, action_dim)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

DEFAULT_DIVERGENCE_THRESHOLD_M = 0.02
DEFAULT_HF_CUTOFF = 0.25  # cycles per control step: the upper half of the spectrum (Nyquist is 0.5)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; sensible at 0 or n successes, unlike Wald's.

    scipy computes it exactly at the edges (0/n gives a lower bound of exactly 0, n/n an upper bound of
    exactly 1), where the textbook formula lands ~1e-17 on the wrong side of p and breaks error bars.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return (0.0, 1.0)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    p = successes / n
    return (min(float(ci.low), p), max(float(ci.high), p))


def mcnemar_exact(candidate: Sequence[bool], reference: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test on paired outcomes: a two-sided binomial test of the discordant pairs at p = 1/2.

    ``b`` counts pairs where only the candidate succeeded, ``c`` where only the reference did. With no
    discordant pair the outcomes are identical and the p-value is 1.
    """
    cand = np.asarray(candidate, dtype=bool)
    ref = np.asarray(reference, dtype=bool)
    if cand.shape != ref.shape or cand.ndim != 1:
        raise ValueError(
            f"mcnemar_exact needs two equal-length 1-D sequences, got {cand.shape} and {ref.shape}"
        )
    b = int(np.sum(cand & ~ref))
    c = int(np.sum(~cand & ref))
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return {"only_candidate": b, "only_reference": c, "p_value": p}


def paired_bootstrap_diff(
    candidate: Sequence[float],
    reference: Sequence[float],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``candidate - reference`` and its percentile bootstrap interval, resampling episode pairs."""
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cand.shape != ref.shape or cand.ndim != 1 or cand.size == 0:
        raise ValueError(
            f"paired_bootstrap_diff needs two equal non-empty 1-D arrays, got {cand.shape}, {ref.shape}"
        )
    diff = cand - ref
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(lo), float(hi)


def hold_last(x: np.ndarray, length: int) -> np.ndarray:
    """Pad ``x`` along axis 0 to ``length`` rows by repeating its last row: an ended episode holds its
    pose."""
    x = np.asarray(x)
    if x.shape[0] == 0:
        raise ValueError("hold_last: cannot pad an empty trajectory")
    if x.shape[0] >= length:
        return x[:length]
    pad = np.repeat(x[-1:], length - x.shape[0], axis=0)
    return np.concatenate([x, pad], axis=0)


def deviation_curve(ee_a: np.ndarray, ee_b: np.ndarray) -> np.ndarray:
    """Per-step Euclidean distance between two end-effector paths; the shorter one holds its last pose."""
    ee_a = np.asarray(ee_a, dtype=np.float64)
    ee_b = np.asarray(ee_b, dtype=np.float64)
    if ee_a.ndim != 2 or ee_b.ndim != 2 or ee_a.shape[1] != ee_b.shape[1]:
        raise ValueError(
            f"deviation_curve needs (T, D) arrays with equal D, got {ee_a.shape} and {ee_b.shape}"
        )
    length = max(ee_a.shape[0], ee_b.shape[0])
    return np.linalg.norm(hold_last(ee_a, length) - hold_last(ee_b, length), axis=1)


def time_to_divergence(
    deviation: np.ndarray, threshold: float = DEFAULT_DIVERGENCE_THRESHOLD_M
) -> int | None:
    """First step index whose deviation exceeds ``threshold`` (strictly), or None if it never does."""
    if threshold <= 0:
        raise ValueError(f"divergence threshold must be positive, got {threshold}")
    above = np.flatnonzero(np.asarray(deviation) > threshold)
    return int(above[0]) if above.size else None


def drift_metrics(
    ee_candidate: np.ndarray, ee_reference: np.ndarray, threshold: float = DEFAULT_DIVERGENCE_THRESHOLD_M
) -> dict[str, float | int | None]:
    """Mean, max and final deviation (m), area under the curve (m*step, trapezoid), time to divergence."""
    dev = deviation_curve(ee_candidate, ee_reference)
    auc = float(np.sum((dev[1:] + dev[:-1]) / 2.0)) if dev.size > 1 else 0.0
    return {
        "drift_mean": float(dev.mean()),
        "drift_max": float(dev.max()),
        "drift_final": float(dev[-1]),
        "drift_auc": auc,
        "time_to_divergence": time_to_divergence(dev, threshold),
    }


def gripper_closed(grip: np.ndarray) -> np.ndarray:
    """Binary gripper command: Meta-World closes the gripper for a positive command."""
    return np.asarray(grip) > 0.0


def gripper_toggles(grip: np.ndarray) -> int:
    """Number of open<->close changes of the binary gripper command within one episode."""
    closed = gripper_closed(grip)
    return int(np.sum(closed[1:] != closed[:-1]))


def gripper_disagreements(grip_candidate: np.ndarray, grip_reference: np.ndarray) -> int:
    """Steps at which the binary gripper commands of two equal-length sequences differ."""
    a, b = np.asarray(grip_candidate), np.asarray(grip_reference)
    if a.shape != b.shape:
        raise ValueError(f"gripper_disagreements needs equal shapes, got {a.shape} and {b.shape}")
    return int(np.sum(gripper_closed(a) != gripper_closed(b)))


def action_error(actions: np.ndarray, target: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension mean absolute and root-mean-square error of ``actions`` against ``target``."""
    a = np.asarray(actions, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if a.shape != t.shape or a.ndim != 2:
        raise ValueError(f"action_error needs equal (T, D) arrays, got {a.shape} and {t.shape}")
    err = a - t
    return {"mae": np.abs(err).mean(axis=0).tolist(), "rmse": np.sqrt((err**2).mean(axis=0)).tolist()}


def mean_jerk(ee: np.ndarray) -> float:
    """Mean norm of the third finite difference of the end-effector path (m/step^3); 0 below 4 poses."""
    ee = np.asarray(ee, dtype=np.float64)
    if ee.shape[0] < 4:
        return 0.0
    return float(np.linalg.norm(np.diff(ee, n=3, axis=0), axis=1).mean())


def high_frequency_share(signal: np.ndarray, cutoff: float = DEFAULT_HF_CUTOFF) -> np.ndarray:
    """Share of each column's spectral power (mean removed) at frequencies >= ``cutoff`` cycles/step.

    One value per column of a ``(T, D)`` array (or a scalar-shaped array for a 1-D signal); a constant
    column has no power and gets 0.
    """
    if not 0.0 < cutoff <= 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5] cycles/step, got {cutoff}")
    x = np.asarray(signal, dtype=np.float64)
    squeeze = x.ndim == 1
    x = x[:, None] if squeeze else x
    if x.ndim != 2:
        raise ValueError(f"high_frequency_share needs a (T,) or (T, D) array, got shape {x.shape}")
    if x.shape[0] < 2:
        share = np.zeros(x.shape[1])
    else:
        power = np.abs(np.fft.rfft(x - x.mean(axis=0), axis=0)) ** 2
        if x.shape[0] % 2 == 0:
            power[1:-1] *= 2.0  # one-sided spectrum: every bin but DC and Nyquist stands for two (Parseval)
        else:
            power[1:] *= 2.0
        freqs = np.fft.rfftfreq(x.shape[0])
        total = power[1:].sum(axis=0)
        high = power[freqs >= cutoff].sum(axis=0)
        share = np.divide(high, total, out=np.zeros_like(total), where=total > 1e-20)
    return share[0] if squeeze else share


def episode_metrics(
    arrays: dict[str, np.ndarray], divergence_threshold: float, hf_cutoff: float
) -> dict[str, float | int | list[float] | None]:
    """Every metric of an episode record that its per-step arrays determine (``ee``, ``actions``; paired:
    ``ref_ee``, ``ref_actions``, ``shadow_actions``; with the reseed floor ``floor_ee``; where the suite
    declares a manipulated object, ``objects``, ``ref_objects`` and ``floor_objects``: ``object_drift_*``).

    One function computes them when an episode is recorded and again when a record is read back, so a
    record whose numbers were edited (or whose arrays were swapped) no longer matches its arrays."""

    def behaviour(ee: np.ndarray, actions: np.ndarray) -> dict[str, Any]:
        grip = actions[:, -1] if actions.shape[0] else np.zeros(0)
        return {
            "jerk": mean_jerk(ee),
            "hf_share": np.atleast_1d(high_frequency_share(actions, hf_cutoff)).tolist(),
            "grip_toggles": gripper_toggles(grip),
        }

    ee, actions = arrays["ee"], arrays["actions"]
    out: dict[str, Any] = behaviour(ee, actions)
    if "ref_ee" in arrays:
        ref_ee, shadow = arrays["ref_ee"], arrays["shadow_actions"]
        out.update({f"ref_{k}": v for k, v in behaviour(ref_ee, arrays["ref_actions"]).items()})
        out.update(drift_metrics(ee, ref_ee, divergence_threshold))
        out.update({f"action_{k}": v for k, v in action_error(actions, shadow).items()})
        out["grip_disagreements"] = gripper_disagreements(actions[:, -1], shadow[:, -1])
        if "floor_ee" in arrays:
            floor = drift_metrics(arrays["floor_ee"], ref_ee, divergence_threshold)
            out.update({f"floor_{k}": v for k, v in floor.items()})
        if "objects" in arrays and "ref_objects" in arrays:
            ref_objects = arrays["ref_objects"]
            drift = drift_metrics(arrays["objects"], ref_objects, divergence_threshold)
            out.update({f"object_{k}": v for k, v in drift.items()})
            if "floor_objects" in arrays:
                drift = drift_metrics(arrays["floor_objects"], ref_objects, divergence_threshold)
                out.update({f"floor_object_{k}": v for k, v in drift.items()})
    return out
