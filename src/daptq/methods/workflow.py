"""The quantize -> directory workflow behind ``daptq quantize``, ``daptq inspect`` and ``daptq methods``.

``quantize_to_directory("toy", RTNConfig(...), "out/toy-w4")`` loads the model, samples calibration data if
the method needs it, runs ``quantize_policy`` and writes the quantized policy directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

from daptq.methods import available_methods, config_type_for, quantize_policy
from daptq.methods.base import MethodConfig
from daptq.methods.record import QuantRecord
from daptq.quant.bytes import (
    checkpoint_weight_bytes,
    format_bytes,
    ideal_weight_bytes,
    mixed_spec_text,
    mixed_weight_bytes,
    row_bits_histogram,
)
from daptq.quant.spec import spec_from_bits
from daptq.strict_parse import load_yaml_strict

# The save stage's time and peak per written directory (it cannot be in the record it writes).
_SAVE_TIMINGS: dict[str, dict[str, float]] = {}


def config_from_options(
    method: str,
    config_path: str | None = None,
    w_bits: int | None = None,
    a_bits: int | None = None,
    group_size: int | None = None,
    asymmetric: bool = False,
    observer: str | None = None,
    include_encoders: bool = False,
    symmetric_range: str | None = None,
    avg_bits: float | None = None,
    method_options: dict[str, Any] | None = None,
) -> MethodConfig:
    """A method config from a YAML/JSON file or from the bit-width options (not both).

    With bit widths only, symmetric weights use the method's measured grid convention for that bit width
    (``MethodConfig.default_symmetric_range``) unless ``symmetric_range`` is given. ``method_options``: other
    fields of the method's config by name (``daptq quantize --a-bits-choices/--formats/...``). A method whose
    budget is a preset of its own (daptq) takes ``--avg-bits`` with ``--a-bits``/``--group-size`` alone."""
    config_type = config_type_for(method)
    method_options = dict(method_options or {})
    budget_grid = avg_bits is not None and w_bits is None and hasattr(config_type, "with_average_bits")
    if budget_grid and (asymmetric or observer or symmetric_range is not None):
        raise ValueError(
            f"--avg-bits: {method}'s budget grid is asymmetric min-max; --asymmetric/--observer/"
            "--symmetric-range do not apply (give a --config file for other grids)"
        )
    flags = w_bits is not None or a_bits is not None or group_size is not None or asymmetric or observer
    flags = flags or symmetric_range is not None
    if config_path is not None:
        if flags or method_options:
            raise ValueError("give either --config or the --w-bits/--a-bits/... options, not both")
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"method config not found: {path}")
        try:
            # YAML is a superset of JSON; a key given twice is refused, not "last wins"
            data = load_yaml_strict(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: does not parse: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a method config must be a mapping, got {type(data).__name__}")
        data.setdefault("method", method)
        try:
            config = config_type.from_dict(data)
        except ValueError as e:  # name the file: "WeightSpec: bits must be ..." alone does not say where
            raise ValueError(f"{path}: {e}") from None
    else:
        config = config_type()
        if w_bits is not None:
            grid = symmetric_range or config_type.default_symmetric_range(w_bits)
            spec = spec_from_bits(w_bits, a_bits, group_size, not asymmetric, observer or "minmax", grid)
            config = dataclasses.replace(config, spec=spec)
        elif flags and not budget_grid:
            raise ValueError("--a-bits/--group-size/--asymmetric/--observer/--symmetric-range need --w-bits")
    if avg_bits is not None:  # a bit budget (average bits per weight, scales and zero points counted)
        if config_path is not None:
            raise ValueError("give avg_bits in the --config file or as --avg-bits, not both")
        if hasattr(config, "with_average_bits"):  # methods whose budget is a preset of their own (daptq)
            grid = {"a_bits": a_bits, "group_size": group_size} if budget_grid else {}
            options = {k: v for k, v in grid.items() if v is not None}
            config = config.with_average_bits(avg_bits, **options, **method_options)
            method_options = {}
        elif "avg_bits" in {f.name for f in dataclasses.fields(config)}:
            config = dataclasses.replace(config, avg_bits=avg_bits)
        else:
            raise ValueError(f"--avg-bits: method {method!r} has no bit budget")
    if method_options:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(method_options) - fields)
        if unknown:
            raise ValueError(f"method {method!r} has no option {unknown[0]!r} (options: `daptq methods`)")
        config = dataclasses.replace(config, **method_options)
    if include_encoders:
        config = dataclasses.replace(config, scope=dataclasses.replace(config.scope, include_encoders=True))
    return config


def quantize_to_directory(
    model: str,
    config: MethodConfig,
    out: str | Path,
    calibration: Any = None,
    self_contained: bool = False,
    *,
    sequential: bool = False,
    max_memory: int | None = None,
    device: str = "cpu",
) -> Path:
    """Quantize the model ``model`` names with ``config`` and write the policy directory ``out``.

    ``calibration`` is a CalibrationSet, a callable building one from the loaded policy, or None.
    ``self_contained``: store every tensor (loading then needs no base checkpoint). ``sequential``: block by
    block (``daptq.methods.sequential``). ``max_memory``: bytes; refused before calibration when the
    estimate (``memory_estimate``) exceeds it. ``device``: "cpu", or "cuda" (an error without CUDA; the
    in-memory methods calibrate on the CPU today)."""
    from daptq.models.streaming import resolve_device

    if resolve_device(device).type != "cpu":
        raise ValueError(f"--device {device}: calibration on an accelerator is not implemented yet")
    from daptq.models.quantized import check_policy_out, model_digest, save_quantized_policy
    from daptq.models.registry import load_policy

    if not isinstance(model, str) or not model.strip():  # Path("") is the current directory
        raise ValueError(f"model spec must be a non-empty string, got {model!r}")
    if Path(model).is_dir():
        raise ValueError(f"{model} is already a directory; quantize its float base model instead")
    check_policy_out(out, [model])  # before any work: only an empty or daptq-written directory is replaced
    policy = load_policy(model)
    if max_memory is not None:
        est = memory_estimate(policy, sequential)
        if est["estimate_bytes"] > max_memory:
            raise ValueError(
                f"--max-memory {format_bytes(max_memory)}: {model} needs about "
                f"{format_bytes(est['estimate_bytes'])} (weights {format_bytes(est['total_weight_bytes'])}, "
                f"largest block {format_bytes(est['largest_block_bytes'])}, this process already "
                f"{format_bytes(est['process_bytes'])}"
                + ("" if sequential else "; --sequential holds one block at a time")
                + ")"
            )
    digest = model_digest(policy.model)
    if callable(calibration):
        calibration = calibration(policy)
    base = {"spec": model, "digest": digest}
    if sequential:
        from daptq.methods.sequential import quantize_policy_sequential

        record = quantize_policy_sequential(policy, config, calibration, base_model=base)
    else:
        record = quantize_policy(policy, config, calibration, base_model=base)
    from daptq.methods.sequential import peak_rss_bytes, reset_peak_rss

    reset_peak_rss()
    t0 = time.perf_counter()
    path = save_quantized_policy(policy, record, out, model, self_contained=self_contained)
    save = {"save_s": time.perf_counter() - t0, "save_peak_rss_mb": peak_rss_bytes() / 2**20}
    _SAVE_TIMINGS[str(Path(path))] = save
    return path


def quantize_from_args(args: argparse.Namespace) -> Path:
    config = config_from_options(  # by keyword: options are added by several methods
        args.method,
        config_path=args.config,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        group_size=args.group_size,
        asymmetric=args.asymmetric,
        observer=args.observer,
        include_encoders=args.include_encoders,
        symmetric_range=args.symmetric_range,
        avg_bits=args.avg_bits,
        method_options={  # the method-specific options: dest "method_<config field>"
            k.removeprefix("method_"): v
            for k, v in vars(args).items()
            if k.startswith("method_") and v is not None
        },
    )
    from daptq.methods import get_method

    calibration = None
    if get_method(config).requires_calibration():
        from daptq.data.episodes import parse_keys, policy_calibration

        keys = parse_keys(getattr(args, "calib_key", None))

        def calibration(policy):  # daptq's dataset / cache, or the user's LeRobotDataset / episode files
            return policy_calibration(
                policy, args.calibration, args.trajectories, args.calib_tasks, args.calib_seed, keys
            )

        if getattr(args, "calibration_from_policy", None) is not None:  # rollouts of a first quantized model
            calibration = _rollout_calibration(args, calibration)
    elif getattr(args, "calibration_from_policy", None) is not None:
        raise ValueError(f"--calibration-from-policy: method {args.method!r} takes no calibration data")

    max_memory = getattr(args, "max_memory", None)
    return quantize_to_directory(
        args.model,
        config,
        args.out,
        calibration,
        getattr(args, "self_contained", False),
        sequential=getattr(args, "sequential", False),
        max_memory=None if max_memory is None else parse_size(max_memory, "--max-memory"),
        device=getattr(args, "device", "cpu"),
    )


def _rollout_calibration(args: argparse.Namespace, expert: Any) -> Any:
    """``--calibration-from-policy DIR``: calibration from DIR's closed-loop rollouts on calibration seeds,
    labelled by the model being quantized, ``--rollout-mix`` of it from ``expert``
    (``daptq.data.rollout_calibration``)."""
    from daptq.data.rollout_calibration import rollout_calibration_for, rollout_source
    from daptq.models.quantized import check_not_a_source

    spec = args.calibration_from_policy
    rollout_source(spec)  # a bad directory is an error before the model loads
    check_not_a_source(args.out, [spec], "the quantization calibrated on its rollouts")

    def calibration(policy):
        return rollout_calibration_for(
            policy,
            spec,
            episodes_per_task=getattr(args, "rollout_episodes", None),
            trajectories=args.trajectories,
            mix=getattr(args, "rollout_mix", None) or 0.0,
            expert=expert,
            tasks=args.calib_tasks,
            seed=args.calib_seed,
            max_steps=getattr(args, "rollout_max_steps", None),
            progress=not getattr(args, "no_progress", False),
        )

    return calibration


def parse_size(text: str, what: str = "size") -> int:
    """``"8G"``, ``"512M"``, ``"1048576"`` -> bytes (binary units), or a ValueError naming ``what``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a size (e.g. 8G, 512M, or bytes)") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{what}: {text!r} must be a positive size")
    return int(value * scale)


def memory_estimate(policy: Any, sequential: bool) -> dict[str, Any]:
    """What the run will hold, before it starts: the weights (all of them, or outside the blocks plus the
    largest block twice when sequential) plus a fake-quant copy's codes; calibration activations are not
    known before the first forward and are not counted (the sequential loop spills them past a limit)."""
    from daptq.methods.sequential import peak_rss_bytes
    from daptq.models.streaming import estimate_memory

    adapter = policy.adapter if hasattr(policy, "adapter") else policy
    blocks = list(adapter.block_modules().values()) if sequential else []
    est = estimate_memory(adapter.model, blocks)
    if not sequential:
        est["estimate_bytes"] = est["total_weight_bytes"] * 5 // 4  # + int8 codes of every weight
    est["process_bytes"] = peak_rss_bytes()  # the interpreter and the loaded model already
    est["estimate_bytes"] = max(est["estimate_bytes"], est["process_bytes"])
    return est


def stage_table(directory: str | Path) -> str:
    """Time and peak resident memory per stage of the run that wrote ``directory`` (from its record)."""
    from daptq.models.quantized import read_quantized_policy_config

    _, qconfig = read_quantized_policy_config(directory)
    timings = {
        **((qconfig.get("record") or {}).get("timings") or {}),
        **_SAVE_TIMINGS.get(str(Path(directory)), {}),
    }
    rows = []
    for stage in ("prepare", "calibrate", "apply", "save"):
        if f"{stage}_s" in timings:
            peak = timings.get(f"{stage}_peak_rss_mb")
            rows.append([stage, f"{timings[f'{stage}_s']:.2f}", "" if peak is None else f"{peak:.0f}"])
    return _table(["stage", "time s", "peak RSS MB"], rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def stored_row_bits(directory: str | Path, qconfig: dict[str, Any]) -> dict[str, list[int]]:
    """Per-row widths of the directory's mixed-width layers (QVLA), read from the stored ``<name>.row_bits``
    tensors themselves, not from the record."""
    from safetensors import safe_open

    from daptq.models.quantized import TENSORS_FILE

    modules = qconfig.get("modules") or {}
    names = [n for n, cfg in modules.items() if isinstance(cfg, dict) and "loader" in cfg]
    if not names:
        return {}
    with safe_open(str(Path(directory) / TENSORS_FILE), framework="pt") as f:
        keys = set(f.keys())
        return {n: f.get_tensor(f"{n}.row_bits").tolist() for n in names if f"{n}.row_bits" in keys}


def inspect_text(directory: str | Path) -> str:
    """The record of a quantized policy directory as Markdown tables (checksums verified first)."""
    from daptq.models.quantized import read_quantized_policy_config

    config, qconfig = read_quantized_policy_config(directory)
    record = QuantRecord.from_dict(qconfig.get("record"))
    mixed = stored_row_bits(directory, qconfig)
    rows, mixed_rows, fp_total, ideal_total, stored_total = [], [], 0, 0, 0
    for name, m in record.modules.items():
        out, fan_in = m.weight_shape[0], 1
        for s in m.weight_shape[1:]:
            fan_in *= s
        fp = out * fan_in * 2
        if name in mixed:  # per-row widths: the record's spec names only the rounding, not the widths
            ideal, stored = mixed_weight_bytes(mixed[name], fan_in)
            spec = mixed_spec_text(mixed[name])
            hist = row_bits_histogram(mixed[name])
            avg = sum(b * c for b, c in hist.items()) / out
            mixed_rows.append(
                [name, str(out), *(str(c) for c in hist.values())]
                + [f"{avg:.3f}", format_bytes(ideal), format_bytes(stored)]
            )
        else:
            ideal = ideal_weight_bytes(out, fan_in, m.spec.weight)
            stored = checkpoint_weight_bytes(out, fan_in, m.spec.weight)
            spec = m.spec.short()
        fp_total, ideal_total, stored_total = fp_total + fp, ideal_total + ideal, stored_total + stored
        rows.append(
            [name, m.role, "x".join(map(str, m.weight_shape)), spec]
            + ["-" if v is None else str(v) for v in (m.stack, m.block, m.stream)]
            + [format_bytes(fp), format_bytes(ideal), format_bytes(stored), m.note]
        )
    rows.append(["**total**", "", "", "", "", "", "", format_bytes(fp_total), format_bytes(ideal_total)])
    rows[-1] += [format_bytes(stored_total), ""]
    base = config["base_model"]
    head = [
        f"# {directory}",
        "",
        f"method: {record.method}; base model: {base['spec']} (sha256 {str(base.get('digest'))[:16]}...)",
        f"calibration: {json.dumps(record.calibration) if record.calibration else 'none'}",
        "timings: " + ", ".join(f"{k} {v:.2f}" for k, v in record.timings.items()),
        "",
        "## Modules",
        "",
        "stack / block / stream: where the adapter places the module (- outside a block stack or stream, and "
        "in directories written before these were recorded).",
        "",
    ]
    header = ["module", "role", "shape", "spec", "stack", "block", "stream"]
    header += ["bf16 bytes", "ideal bytes", "stored bytes", "note"]
    body = [_table(header, rows)]
    if mixed_rows:
        widths = [f"{b}-bit rows" for b in row_bits_histogram([])]
        body += [
            "",
            f"## Mixed-width layers ({len(mixed_rows)}): rows by bit width, from the stored bit maps",
            "",
            "ideal: code bits / 8 + a bf16 scale per integer row; stored adds the 1-byte-per-row width map "
            "and each width group's byte padding.",
            "",
            _table(["module", "rows", *widths, "avg bits", "ideal bytes", "stored bytes"], mixed_rows),
        ]
    kept = record.decisions.get("kept_float", {})
    if kept:
        body += [
            "",
            f"## Kept float ({len(kept)})",
            "",
            _table(["module", "why"], [[n, r] for n, r in kept.items()]),
        ]
    # per-row widths are summarized by the histograms above
    other = {k: v for k, v in record.decisions.items() if k not in ("kept_float", "row_bits")}
    if other:
        body += ["", "## Decisions", "", "```json", json.dumps(other, indent=1)[:20000], "```"]
    body += ["", "## Config", "", "```yaml", yaml.safe_dump(record.config, sort_keys=False).rstrip(), "```"]
    return "\n".join(head + body)


def methods_text() -> str:
    """Every registered method with its config fields and defaults."""
    parts = []
    for name, config_type in available_methods().items():
        if name.startswith("_"):
            continue
        doc = (config_type.__doc__ or "").strip().splitlines()[0] if config_type.__doc__ else ""
        parts.append(f"{name} (config {config_type.__name__}, version {config_type.VERSION}): {doc}")
        for f in dataclasses.fields(config_type):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = default.short() if hasattr(default, "short") else default
            if hasattr(default, "active_roles"):
                shown = f"roles {list(default.active_roles)}"
            parts.append(f"    {f.name}: {shown}")
    return "\n".join(parts)
