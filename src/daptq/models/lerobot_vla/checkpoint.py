"""lerobot's checkpoint directory for pi0 / pi0.5 / SmolVLA, read key for key and written in the same layout.

A directory (``save_pretrained`` of a lerobot policy) holds ``config.json`` (``type``: pi0 / pi05 / smolvla),
``model.safetensors`` (the policy's state dict: every key under ``model.``) and the normalization statistics
of its processors: ``policy_preprocessor.json`` whose ``normalizer_processor`` step names a
``policy_preprocessor_step_N_normalizer_processor.safetensors`` with flat keys ``<feature>.<stat>``
(``observation.state.mean``, ``action.std``, ``action.q01``...) and ``policy_postprocessor.json`` with the
``unnormalizer_processor`` for the actions. Checkpoints from before the processors (lerobot < 0.4) kept the
statistics as buffers in ``model.safetensors`` (``normalize_inputs.buffer_observation_state.mean``,
``unnormalize_outputs.buffer_action.mean``...); those are read as statistics too.

Key mapping (explicit, every accepted difference is listed): the ``model.`` prefix may be absent (openpi's
converted files); ``...vision_tower.vision_model.`` is ``...vision_tower.`` in this ``transformers``; pi0's
``time_mlp_in/out`` are ``action_time_mlp_in/out`` (lerobot renames them the same way); pi0.5 files with plain
RMSNorm ``weight``s for the expert (whose norms are adaptive) have them dropped, as lerobot does. Tied
weights: PaliGemma's ``lm_head.weight`` is its embedding; a file may hold either or both (equal, else
refused), and what it held is recorded. The pi0 expert's ``lm_head.weight`` (unused, never read at inference)
may be absent. Anything else missing, unexpected or mis-shaped is an error listing every such key. Only
safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from daptq.atomic import atomic_write_bytes, atomic_write_json
from daptq.integrity import sha256_file
from daptq.models.family_common import MismatchFormat, compare_keys
from daptq.models.lerobot_vla.config import LeRobotVLAConfig
from daptq.models.lerobot_vla.modeling import FlowMatchingVLA, build_model

PREFIX = "model."
# The wording this loader has always used ("2 missing: a, b; 1 unexpected: c", sorted).
MISMATCH = MismatchFormat(
    part_sep="; ", item_sep=", ", shape="{key}: file {got} vs model {want}", more=" ...", sort=True
)
PRE, POST = "policy_preprocessor", "policy_postprocessor"
ADARMS_STALE = re.compile(
    r"paligemma_with_expert\.gemma_expert\.model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight"
)
LEGACY_STATS = ("normalize_inputs.buffer_", "normalize_targets.buffer_", "unnormalize_outputs.buffer_")


def tie_names(config: LeRobotVLAConfig) -> tuple[str, str] | None:
    """(lm_head, embedding) parameter names tied in this family, or None."""
    if not config.tie_word_embeddings:
        return None
    if config.type == "smolvla":
        return (
            "vlm_with_expert.vlm.lm_head.weight",
            "vlm_with_expert.vlm.model.text_model.embed_tokens.weight",
        )
    return (
        "paligemma_with_expert.paligemma.lm_head.weight",
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight",
    )


def optional_keys(config: LeRobotVLAConfig) -> set[str]:
    """Parameters a checkpoint may omit because nothing reads them (the pi0 expert's LM head)."""
    return {"paligemma_with_expert.gemma_expert.lm_head.weight"} if config.type != "smolvla" else set()


@dataclass
class Statistics:
    """Per-feature normalization statistics (``observation.state``, ``action``) and their modes."""

    stats: dict[str, dict[str, torch.Tensor]]
    modes: dict[str, str]  # "STATE" / "ACTION" -> MEAN_STD | MIN_MAX | QUANTILES | QUANTILE10 | IDENTITY
    source: str = ""

    _KEYS = {
        "MEAN_STD": ("mean", "std"),
        "MIN_MAX": ("min", "max"),
        "QUANTILES": ("q01", "q99"),
        "QUANTILE10": ("q10", "q90"),
    }

    def _pair(self, feature: str, kind: str) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        mode = self.modes.get(kind, "IDENTITY")
        if mode == "IDENTITY":
            return None
        if mode not in self._KEYS:
            raise ValueError(f"normalization mode {mode!r} for {kind} is not supported")
        a, b = self._KEYS[mode]
        s = self.stats.get(feature, {})
        if a not in s or b not in s:
            raise ValueError(
                f"{self.source or 'statistics'}: {kind} is normalized {mode} but {feature!r} has no "
                f"{a!r}/{b!r} (has {sorted(s)})"
            )
        return mode, s[a].double(), s[b].double()

    def normalize(self, x: torch.Tensor, feature: str, kind: str) -> torch.Tensor:
        p = self._pair(feature, kind)
        if p is None:
            return x
        mode, a, b = p
        x64 = x.double()
        out = (x64 - a) / (b + 1e-8) if mode == "MEAN_STD" else 2 * (x64 - a) / (b - a + 1e-8) - 1
        return out.to(x.dtype)

    def unnormalize(self, x: torch.Tensor, feature: str, kind: str) -> torch.Tensor:
        p = self._pair(feature, kind)
        if p is None:
            return x
        mode, a, b = p
        x64 = x.double()
        out = x64 * b + a if mode == "MEAN_STD" else (x64 + 1) / 2 * (b - a + 1e-8) + a
        return out.to(x.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modes": dict(self.modes),
            "stats": {f: {k: v.tolist() for k, v in s.items()} for f, s in sorted(self.stats.items())},
        }


@dataclass
class LoadedCheckpoint:
    model: FlowMatchingVLA
    config: LeRobotVLAConfig
    raw_config: dict[str, Any]
    statistics: Statistics
    files: dict[str, str]  # name -> sha256
    tie: dict[str, Any] = field(default_factory=dict)
    key_notes: list[str] = field(default_factory=list)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


def canonical_keys(
    tensors: Mapping[str, torch.Tensor], config: LeRobotVLAConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's keys -> this module tree's names (without ``model.``), with a note per rule applied."""
    notes: list[str] = []
    keys = list(tensors)
    prefixed = any(k.startswith(PREFIX) for k in keys)
    if not prefixed and keys:
        notes.append("keys without the 'model.' prefix (openpi-converted layout)")
    out: dict[str, torch.Tensor] = {}
    renamed = set()
    for k, v in tensors.items():
        name = k[len(PREFIX) :] if prefixed and k.startswith(PREFIX) else k
        if prefixed and not k.startswith(PREFIX):
            name = "\0" + k  # outside the policy's model: unexpected
        if ".vision_tower.vision_model." in name:
            name = name.replace(".vision_tower.vision_model.", ".vision_tower.")
            renamed.add("vision_tower.vision_model. -> vision_tower.")
        if config.type == "pi0" and name.split(".")[0] in ("time_mlp_in", "time_mlp_out"):
            name = "action_" + name
            renamed.add("time_mlp_* -> action_time_mlp_*")
        if config.type == "pi05" and ADARMS_STALE.fullmatch(name):
            renamed.add("dropped the expert's plain RMSNorm weights (pi0.5's norms are adaptive; as lerobot)")
            continue
        if name in out:
            raise ValueError(f"checkpoint keys {k!r} and another key both map to {name!r}")
        out[name] = v
    notes += sorted(renamed)
    return out, notes


def read_statistics(
    directory: Path, tensors: dict[str, torch.Tensor], config: LeRobotVLAConfig
) -> tuple[Statistics, list[Path]]:
    """The normalization statistics: processor files, else legacy buffers popped from ``tensors``."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    used: list[Path] = []
    for name, step in ((PRE, "normalizer_processor"), (POST, "unnormalizer_processor")):
        path = directory / f"{name}.json"
        if not path.is_file():
            continue
        used.append(path)
        for entry in _read_json(path).get("steps", []):
            if entry.get("registry_name") != step or not entry.get("state_file"):
                continue
            state_file = directory / str(entry["state_file"])
            if state_file.parent != directory or not state_file.is_file():
                raise FileNotFoundError(
                    f"{path}: step {step!r} names state file {entry['state_file']!r}, not found"
                )
            used.append(state_file)
            for flat, t in _load_safetensors(state_file).items():
                feature, _, stat = flat.rpartition(".")
                stats.setdefault(feature, {})[stat] = t.float()
    for k in [
        k
        for k in tensors
        if k.startswith(tuple("\0" + p for p in LEGACY_STATS)) or k.startswith(LEGACY_STATS)
    ]:
        rest = k.lstrip("\0")
        for p in LEGACY_STATS:
            if rest.startswith(p):
                feature, _, stat = rest[len(p) :].rpartition(".")
                stats.setdefault(feature.replace("_", "."), {}).setdefault(stat, tensors.pop(k).float())
                break
    modes = {k: str(v) for k, v in config.normalization_mapping.items()}
    st = Statistics(stats, modes, str(directory))
    for feature, kind in (("observation.state", "STATE"), ("action", "ACTION")):
        if modes.get(kind, "IDENTITY") != "IDENTITY" and feature not in stats:
            raise FileNotFoundError(
                f"{directory}: no normalization statistics for {feature!r} ({kind} is {modes[kind]}); "
                "expected "
                f"{PRE}.json / {POST}.json with their normalizer state files, or legacy buffers in "
                "model.safetensors"
            )
    return st, used


def load_state(model: FlowMatchingVLA, tensors: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Copy ``tensors`` (canonical names) into ``model``: every key accounted for, else a ValueError listing
    the missing, unexpected and mis-shaped ones. Returns what happened to the tied weights."""
    config = model.config
    expected = dict(model.state_dict())
    tie = tie_names(config)
    record: dict[str, Any] = {}
    if tie is not None:
        head, emb = tie
        have = [n for n in (head, emb) if n in tensors]
        record = {"tied": [head, emb], "stored": have}
        if len(have) == 2 and (
            tensors[head].shape != tensors[emb].shape or not torch.equal(tensors[head], tensors[emb])
        ):
            raise ValueError(
                f"{source}: tied weights differ: {head!r} and {emb!r} must be the same tensor (the "
                "model ties "
                "the LM head to the embedding); refusing to pick one"
            )
        if len(have) == 1:
            tensors = {**tensors, head: tensors[have[0]], emb: tensors[have[0]]}
    m = compare_keys(expected, tensors, optional=optional_keys(config))
    m.unexpected = [k.lstrip("\0") for k in m.unexpected]  # "\0" marks a key outside the policy's model.
    m.raise_if_any(source, config.type, MISMATCH)
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for k in expected:
            if k not in tensors:
                record.setdefault("absent_unused", []).append(k)
                continue
            target = params.get(k, buffers.get(k))
            target.copy_(tensors[k].to(target.dtype))
    if tie is not None:
        head, emb = tie
        if model.get_parameter(head) is not model.get_parameter(emb):
            raise ValueError(f"{source}: the model's {head!r} is not tied to {emb!r} after loading")
    return record


def load_lerobot_checkpoint(
    directory: str | Path, *, vlm_config: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> LoadedCheckpoint:
    """Build the family's network from ``directory`` (see the module docstring) and load it key for key."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"lerobot checkpoint {d}: not a directory")
    files = {n: d / n for n in ("config.json", "model.safetensors")}
    for n, p in files.items():
        if not p.is_file():
            raise FileNotFoundError(f"lerobot checkpoint {d}: {n} is missing")
    raw = _read_json(files["config.json"])
    if isinstance(raw, Mapping) and "daptq_reference" in raw:  # libero_smolvla.REFERENCE_KEY (no import back)
        raise ValueError(
            f"lerobot checkpoint {d}: config.json has 'daptq_reference': this is daptq's LIBERO reference "
            f"VLA (SmolVLA's layout on stand-in frozen encoders, not SmolVLM's towers); load it as "
            f"libero-smolvla:{d}"
        )
    vlm = _read_json(Path(vlm_config)) if vlm_config is not None else None
    config = LeRobotVLAConfig.from_lerobot(raw, vlm)
    tensors, notes = canonical_keys(_load_safetensors(files["model.safetensors"]), config)
    statistics, stat_files = read_statistics(d, tensors, config)
    model = _skeleton(config)
    tie = load_state(model, tensors, str(files["model.safetensors"]))
    model = model.to(dtype).eval()
    used = [*files.values(), *stat_files] + ([Path(vlm_config)] if vlm_config is not None else [])
    return LoadedCheckpoint(
        model, config, raw, statistics, {str(p): sha256_file(p) for p in used}, tie, notes
    )


def _skeleton(config: LeRobotVLAConfig) -> FlowMatchingVLA:
    """The network with its initializers skipped where ``transformers`` allows (every weight is
    overwritten)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover (older transformers)
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return build_model(config)


def save_lerobot_checkpoint(
    model: FlowMatchingVLA,
    directory: str | Path,
    statistics: Mapping[str, Mapping[str, Any]],
    *,
    store_tied: str = "lm_head",
    legacy_statistics: bool = False,
) -> Path:
    """Write ``model`` in lerobot's layout (``config.json``, ``model.safetensors`` under ``model.``, processor
    JSON + statistics files, or legacy buffers). ``store_tied``: which of the tied pair the file holds
    ("lm_head" as lerobot's hub files, "embed", or "both")."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tie = tie_names(config)
    if tie is not None:
        head, emb = tie
        if store_tied == "lm_head":
            state.pop(emb)
        elif store_tied == "embed":
            state.pop(head)
        elif store_tied != "both":
            raise ValueError(f"store_tied must be 'lm_head', 'embed' or 'both', got {store_tied!r}")
    tensors = {PREFIX + k: v for k, v in state.items()}
    flat = {
        f"{f}.{s}": torch.as_tensor(v, dtype=torch.float32)
        for f, st in statistics.items()
        for s, v in st.items()
    }
    if legacy_statistics:
        for f, st in statistics.items():
            where = "unnormalize_outputs.buffer_" if f == "action" else "normalize_inputs.buffer_"
            for s, v in st.items():
                tensors[where + f.replace(".", "_") + "." + s] = torch.as_tensor(v, dtype=torch.float32)
    else:
        state_in = {k: v for k, v in flat.items() if not k.startswith("action.")} | {
            k: v for k, v in flat.items() if k.startswith("action.")
        }
        state_out = {k: v for k, v in flat.items() if k.startswith("action.")}
        for name, reg, st, idx in (
            (PRE, "normalizer_processor", state_in, 2),
            (POST, "unnormalizer_processor", state_out, 0),
        ):
            state_file = f"{name}_step_{idx}_{reg}.safetensors"
            atomic_write_bytes(d / state_file, save(st))
            atomic_write_json(
                d / f"{name}.json",
                {
                    "name": name,
                    "steps": [{"registry_name": reg, "config": {"eps": 1e-8}, "state_file": state_file}],
                },
            )
    atomic_write_bytes(d / "model.safetensors", save(tensors))
    atomic_write_json(d / "config.json", config.to_lerobot())
    return d
