"""Byte accounting: what each layer's weights cost in fp16, in the ideal bit-packed format, and as stored.

Rule (per Linear/Conv2d layer, weights only; the bias is reported separately and kept in float everywhere):
- ``fp16``: 2 bytes per weight, the reference everything is compared with.
- ``ideal``: ceil(n_weights * bits / 8) for the codes + one scale per group in the spec's ``scale_dtype``
  + (if asymmetric) one ``bits``-bit zero point per group. 16-bit (float) layers count 2 bytes per weight.
  Ternary codes count ceil(n / 5) bytes (base 3, 1.6 bits), binary ceil(n / 8), both stored that way too.
- mixed-width layers (per-row widths in {16, 8, 4, 2, 0}, QVLA): see ``mixed_weight_bytes``; a module
  declares itself one with ``row_widths() -> per-row widths``.
- ``stored``: what daptq really keeps: for fake-quant layers the checkpoint form (codes in 2/4/8-bit
  containers: 2-bit 4 per byte, 3- and 4-bit 2 per byte, 8-bit 1 byte; scales in their dtype; zero points 1
  byte each); for packed layers the packed buffers' ``nbytes`` (int4 tinygemm also stores a bf16 zero per
  group); for float layers the weight's own ``nbytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from .fake import QUANT_MODULE_TYPES, group_layout
from .spec import WeightSpec


def container_bits(bits: int) -> int:
    """Bits one code occupies in daptq's checkpoint packing."""
    return {2: 2, 3: 4, 4: 4, 8: 8}[bits]


# Codes per byte of the sub-2-bit codebooks (WeightSpec.codebook): ternary in base 3 (3^5 = 243 <= 256).
CODES_PER_BYTE = {"ternary": 5, "binary": 8}


def codebook_code_bytes(n_codes: int, spec: WeightSpec) -> int:
    """Bytes of ``n_codes`` ternary (5 per byte) or binary (8 per byte) codes, ideal and stored alike."""
    return math.ceil(n_codes / CODES_PER_BYTE[spec.codebook])


def ideal_weight_bytes(out_features: int, fan_in: int, spec: WeightSpec) -> int:
    if spec.is_float:
        return out_features * fan_in * 2
    rows, groups, _ = group_layout(out_features, fan_in, spec)
    n_groups = rows * groups
    if spec.codebook != "uniform":  # symmetric: codes and one scale per group, no zero points
        return codebook_code_bytes(out_features * fan_in, spec) + n_groups * spec.scale_bytes
    codes = math.ceil(out_features * fan_in * spec.bits / 8)
    zero_points = 0 if spec.symmetric else math.ceil(n_groups * spec.bits / 8)
    return codes + n_groups * spec.scale_bytes + zero_points


def checkpoint_weight_bytes(out_features: int, fan_in: int, spec: WeightSpec) -> int:
    """Bytes save_quantized writes for one fake-quant layer's codes, scales and zero points."""
    if spec.is_float:
        return out_features * fan_in * 2
    rows, groups, _ = group_layout(out_features, fan_in, spec)
    n_groups = rows * groups
    if spec.codebook != "uniform":
        return codebook_code_bytes(out_features * fan_in, spec) + n_groups * spec.scale_bytes
    codes = math.ceil(out_features * fan_in * container_bits(spec.bits) / 8)
    return codes + n_groups * spec.scale_bytes + (0 if spec.symmetric else n_groups)


MIXED_INT_BITS = (8, 4, 2)  # the integer widths of a mixed-width layer (16 = float16 row, 0 = pruned row)


def mixed_weight_bytes(row_bits: Sequence[int], fan_in: int, scale_bytes: int = 2) -> tuple[int, int]:
    """(ideal, stored) weight bytes of a layer whose output rows have their own widths (QVLA's
    ``MixedBitLinear``), from the per-row widths alone.

    ideal: ``ceil(sum(bits) x fan_in / 8)`` + one scale per integer row. stored: the checkpoint's tensors:
    a 1-byte width per row, each integer width's rows packed as one group (8-bit 1, 4-bit 2, 2-bit 4 codes
    per byte, the group padded to a whole byte), one scale per integer row, float16 rows; pruned rows cost
    nothing."""
    bits = [int(b) for b in row_bits]
    bad = sorted(set(bits) - {16, 0, *MIXED_INT_BITS})
    if bad:
        raise ValueError(f"mixed_weight_bytes: widths {bad} are not in (16, 8, 4, 2, 0)")
    n = {b: bits.count(b) for b in (16, 0, *MIXED_INT_BITS)}
    n_scaled = sum(n[b] for b in MIXED_INT_BITS)
    ideal = math.ceil(sum(bits) * fan_in / 8) + n_scaled * scale_bytes
    codes = sum(math.ceil(n[b] * fan_in * container_bits(b) / 8) for b in MIXED_INT_BITS)
    stored = len(bits) + codes + n_scaled * scale_bytes + n[16] * fan_in * 2
    return ideal, stored


def row_bits_histogram(row_bits: Sequence[int]) -> dict[int, int]:
    """{width: rows} over the widths of a mixed-width layer, widest first (zero counts kept)."""
    bits = [int(b) for b in row_bits]
    return {b: bits.count(b) for b in (16, *MIXED_INT_BITS, 0)}


def mixed_spec_text(row_bits: Sequence[int]) -> str:
    """A mixed-width layer's rows in one line: ``mixed rows 16:2 8:5 4:20 2:3 0:2 (avg 4.06 b)``."""
    hist = row_bits_histogram(row_bits)
    n = max(1, sum(hist.values()))
    avg = sum(b * c for b, c in hist.items()) / n
    return "mixed rows " + " ".join(f"{b}:{c}" for b, c in hist.items()) + f" (avg {avg:.2f} b)"


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class ByteRow:
    name: str
    kind: str  # "float", "fake-quant" or the packed module's class name
    shape: tuple[int, ...]
    spec: str
    n_weights: int
    fp16_bytes: int
    ideal_bytes: int
    stored_bytes: int
    bias_bytes: int
    rows_by_bits: dict[int, int] | None = None  # mixed-width layers: {width: rows}


@dataclass(frozen=True)
class ByteReport:
    rows: tuple[ByteRow, ...]

    @property
    def fp16_bytes(self) -> int:
        return sum(r.fp16_bytes for r in self.rows)

    @property
    def ideal_bytes(self) -> int:
        return sum(r.ideal_bytes for r in self.rows)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.rows)

    @property
    def bias_bytes(self) -> int:
        return sum(r.bias_bytes for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "total": {
                "fp16_bytes": self.fp16_bytes,
                "ideal_bytes": self.ideal_bytes,
                "stored_bytes": self.stored_bytes,
                "bias_bytes": self.bias_bytes,
            },
        }

    def to_markdown(self) -> str:
        lines = [
            "| module | kind | shape | spec | fp16 | ideal | stored | ideal/fp16 |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in (*self.rows, None):
            if r is None:
                name, kind, shape, spec = "**total**", "", "", ""
                fp, ideal, stored = self.fp16_bytes, self.ideal_bytes, self.stored_bytes
            else:
                name, kind, shape, spec = r.name, r.kind, str(r.shape), r.spec
                fp, ideal, stored = r.fp16_bytes, r.ideal_bytes, r.stored_bytes
            ratio = f"{ideal / fp:.3f}" if fp else "-"
            lines.append(
                f"| {name} | {kind} | {shape} | {spec} | {format_bytes(fp)} | {format_bytes(ideal)} "
                f"| {format_bytes(stored)} | {ratio} |"
            )
        return "\n".join(lines)


def model_bytes(model: nn.Module) -> ByteReport:
    """One row per Linear/Conv2d (float, fake-quant or packed) in ``named_modules`` order."""
    rows = []
    for name, m in model.named_modules():
        bias = getattr(m, "bias", None)
        bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
        if callable(getattr(m, "row_widths", None)):  # per-row widths (QVLA's MixedBitLinear)
            bits = [int(b) for b in m.row_widths()]
            out_f, fan_in = m.out_features, m.in_features
            ideal, stored = mixed_weight_bytes(bits, fan_in)
            rows.append(
                ByteRow(
                    name,
                    "mixed-width",
                    (out_f, fan_in),
                    mixed_spec_text(bits),
                    out_f * fan_in,
                    out_f * fan_in * 2,
                    ideal,
                    stored,
                    bias_bytes,
                    row_bits_histogram(bits),
                )
            )
        elif hasattr(m, "weight_storage_bytes"):  # packed deployable module
            out_f, fan_in = m.out_features, m.in_features
            spec = m.spec.weight
            rows.append(
                ByteRow(
                    name,
                    type(m).__name__,
                    (out_f, fan_in),
                    m.spec.short(),
                    out_f * fan_in,
                    out_f * fan_in * 2,
                    ideal_weight_bytes(out_f, fan_in, spec),
                    m.weight_storage_bytes(),
                    bias_bytes,
                )
            )
        elif isinstance(m, QUANT_MODULE_TYPES):
            w = m.weight
            out_f, fan_in = w.shape[0], w[0].numel()
            spec = m.spec.weight
            stored = (
                w.numel() * w.element_size()
                if spec.is_float
                else checkpoint_weight_bytes(out_f, fan_in, spec)
            )
            rows.append(
                ByteRow(
                    name,
                    "fake-quant",
                    tuple(w.shape),
                    m.spec.short(),
                    w.numel(),
                    w.numel() * 2,
                    ideal_weight_bytes(out_f, fan_in, spec),
                    stored,
                    bias_bytes,
                )
            )
        elif isinstance(m, nn.Linear | nn.Conv2d):
            w = m.weight
            rows.append(
                ByteRow(
                    name,
                    "float",
                    tuple(w.shape),
                    str(w.dtype).removeprefix("torch."),
                    w.numel(),
                    w.numel() * 2,
                    w.numel() * 2,
                    w.numel() * w.element_size(),
                    bias_bytes,
                )
            )
    return ByteReport(tuple(rows))
