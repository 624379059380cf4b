"""Quantization specs: what a tensor's integer grid looks like, validated once at construction.

Specs are plain frozen dataclasses so a recipe, a checkpoint's ``quantization_config.json`` and a method's
exported decisions all share one serializable vocabulary. Every spec carries ``version`` so old files stay
readable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SPEC_VERSION = 1

WEIGHT_BITS = (2, 3, 4, 8, 16)  # 16 means "keep the float weight" (bf16/fp32), no integer grid
ACTIVATION_BITS = (4, 8)
OBSERVERS = ("minmax", "percentile", "mse")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATION_MODES = ("static_per_tensor", "dynamic_per_token")
SCALE_DTYPES = ("float32", "bfloat16", "float16")
# Symmetric grids (see WeightSpec.symmetric_range): which of the 2^b codes the scale lets the range use.
SYMMETRIC_RANGES = ("restricted", "full", "full_exact")
# Below two bits (see WeightSpec.codebook): codes on the signed 2-bit grid restricted to these levels.
CODEBOOKS = ("uniform", "ternary", "binary")

Observer = Literal["minmax", "percentile", "mse"]
Granularity = Literal["per_tensor", "per_channel", "per_group"]
ActivationMode = Literal["static_per_tensor", "dynamic_per_token"]
ScaleDType = Literal["float32", "bfloat16", "float16"]
SymmetricRange = Literal["restricted", "full", "full_exact"]
Codebook = Literal["uniform", "ternary", "binary"]

_SCALE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _check_observer(owner: str, observer: str, percentile: float) -> None:
    if observer not in OBSERVERS:
        raise ValueError(f"{owner}: observer must be one of {OBSERVERS}, got {observer!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"{owner}: percentile must be in (50, 100], got {percentile}")


def _check_field_types(owner: str, obj: Any, types: Mapping[str, tuple[type, ...]]) -> None:
    """Strict types, no truthiness: ``symmetric: "false"`` is not a bool, ``bits: 4.0`` is not an int.
    Ints are accepted (and converted) where a float is expected."""
    for name, allowed in types.items():
        value = getattr(obj, name)
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{owner}: {name} must be {names}, got {value!r} ({type(value).__name__})")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, name, float(value))


def _reject_unknown(cls_name: str, d: Mapping[str, Any], allowed: set[str]) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls_name}: expected a mapping, got {type(d).__name__}: {d!r}")
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{cls_name}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class WeightSpec:
    """How a weight is rounded: bit width, symmetric or affine, granularity, and how the range is chosen.

    ``symmetric_range`` (symmetric grids only) chooses the scale of a group with range [lo, hi],
    amax = max(|lo|, |hi|), n = 2^(bits-1):

    - ``"restricted"`` (daptq's historical default): amax / (n - 1); code -n is never used (W2 is ternary).
    - ``"full"`` (torchao style): amax / (n - 0.5); all 2^bits codes are used, the positive extreme is
      clipped by half a step.
    - ``"full_exact"`` (llm-compressor style): max(-lo / n, hi / (n - 1)); both extremes are exact, code -n
      is used when the negative side dominates.

    Granularity refers to the weight viewed as a 2-D matrix ``[out_features, in_features]`` (a Conv2d weight
    is flattened to ``[out_channels, in_channels/groups * kh * kw]``): per-channel means one scale per output
    row, per-group one scale per ``group_size`` consecutive input elements of each row.

    ``codebook`` (below two bits; needs ``bits=2``, symmetric, min-max observer): ``"ternary"`` codes
    {-1, 0, +1} times a scale per group, the scale and threshold of Ternary Weight Networks (threshold
    0.7 mean|w|, scale the mean |w| above it), stored five codes per byte (1.6 bits); ``"binary"`` codes
    {-1, +1} (sign) times the group's mean |w| (the L2-optimal scale for sign codes), 1 bit per weight.
    ``"uniform"`` (default) is the integer grid above; it is left out of ``to_dict`` so files written before
    the field existed stay byte-identical.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    observer: Observer = "minmax"
    percentile: float = 99.9
    scale_dtype: ScaleDType = "bfloat16"
    symmetric_range: SymmetricRange = "restricted"
    codebook: Codebook = "uniform"

    def __post_init__(self) -> None:
        _check_field_types(
            "WeightSpec",
            self,
            {
                "codebook": (str,),
                "symmetric": (bool,),
                "granularity": (str,),
                "group_size": (int, type(None)),
                "observer": (str,),
                "percentile": (float, int),
                "scale_dtype": (str,),
                "symmetric_range": (str,),
            },
        )
        if self.symmetric_range not in SYMMETRIC_RANGES:
            raise ValueError(
                f"WeightSpec: symmetric_range must be one of {SYMMETRIC_RANGES}, got {self.symmetric_range!r}"
            )
        if not self.symmetric and self.symmetric_range != "restricted":
            raise ValueError("WeightSpec: symmetric_range applies to symmetric grids only (symmetric=True)")
        if type(self.bits) is not int or self.bits not in WEIGHT_BITS:
            raise ValueError(f"WeightSpec: bits must be one of {WEIGHT_BITS} (an integer), got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"WeightSpec: granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.granularity == "per_group":
            if (
                not isinstance(self.group_size, int)
                or isinstance(self.group_size, bool)
                or self.group_size < 2
            ):
                raise ValueError(
                    f"WeightSpec: per_group needs an integer group_size >= 2, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"WeightSpec: group_size={self.group_size} given but granularity={self.granularity!r}"
            )
        _check_observer("WeightSpec", self.observer, self.percentile)
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"WeightSpec: scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}"
            )
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"WeightSpec: codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if self.codebook != "uniform":
            if self.bits != 2 or not self.symmetric or self.observer != "minmax":
                raise ValueError(
                    f"WeightSpec: codebook={self.codebook!r} needs bits=2, symmetric=True, observer='minmax' "
                    f"(its scale is closed-form), got bits={self.bits}, symmetric={self.symmetric}, "
                    f"observer={self.observer!r}"
                )
            if self.symmetric_range != "restricted":
                raise ValueError(f"WeightSpec: codebook={self.codebook!r} has no symmetric_range choice")

    @property
    def is_float(self) -> bool:
        """True for bits=16: the weight is kept in floating point."""
        return self.bits == 16

    @property
    def qmin(self) -> int:
        if self.codebook != "uniform":
            return -1
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.codebook != "uniform":
            return 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_bits(self) -> float:
        """Storage bits per code: ``bits``, or 1.6 (ternary, 5 codes per byte) / 1 (binary)."""
        return {"uniform": float(self.bits), "ternary": 1.6, "binary": 1.0}[self.codebook]

    @property
    def scale_bytes(self) -> int:
        return _SCALE_BYTES[self.scale_dtype]

    def short(self) -> str:
        """A compact label such as ``W4g128-sym-mse`` (``Wtern-g64``, ``Wbin-g128`` below two bits)."""
        if self.is_float:
            return "W16(float)"
        gran = {"per_tensor": "t", "per_channel": "c"}.get(self.granularity, f"g{self.group_size}")
        if self.codebook != "uniform":
            return f"W{'bin' if self.codebook == 'binary' else 'tern'}-{gran}"
        grid = {"restricted": "sym", "full": "symfull", "full_exact": "symfullx"}[self.symmetric_range]
        return f"W{self.bits}{gran}-{grid if self.symmetric else 'asym'}-{self.observer}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["codebook"] == "uniform":  # written only when set: older files and digests stay unchanged
            del d["codebook"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightSpec:
        _reject_unknown("WeightSpec", d, set(cls.__dataclass_fields__))
        return cls(**d)


@dataclass(frozen=True)
class ActivationSpec:
    """How the input activation of a layer is rounded.

    ``static_per_tensor`` uses one scale found by calibration (observer applies); ``dynamic_per_token``
    computes a min-max scale per token (per row of the flattened input, per pixel for Conv2d) at run time.
    """

    bits: int = 8
    symmetric: bool = True
    mode: ActivationMode = "dynamic_per_token"
    observer: Observer = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        _check_field_types(
            "ActivationSpec",
            self,
            {
                "symmetric": (bool,),
                "mode": (str,),
                "observer": (str,),
                "percentile": (float, int),
            },
        )
        if type(self.bits) is not int or self.bits not in ACTIVATION_BITS:
            raise ValueError(
                f"ActivationSpec: bits must be one of {ACTIVATION_BITS} (an integer), got {self.bits!r}"
            )
        if self.mode not in ACTIVATION_MODES:
            raise ValueError(f"ActivationSpec: mode must be one of {ACTIVATION_MODES}, got {self.mode!r}")
        _check_observer("ActivationSpec", self.observer, self.percentile)
        if self.mode == "dynamic_per_token" and self.observer != "minmax":
            raise ValueError(
                "ActivationSpec: dynamic_per_token computes scales at run time; observer must be minmax"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def short(self) -> str:
        mode = "dyn-tok" if self.mode == "dynamic_per_token" else f"static-{self.observer}"
        return f"A{self.bits}-{mode}{'' if self.symmetric else '-asym'}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationSpec:
        _reject_unknown("ActivationSpec", d, set(cls.__dataclass_fields__))
        return cls(**d)


@dataclass(frozen=True)
class QuantSpec:
    """Everything that decides how one layer is quantized: a weight spec and an optional activation spec."""

    weight: WeightSpec = field(default_factory=WeightSpec)
    activation: ActivationSpec | None = None
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise ValueError(f"QuantSpec: version must be an integer, got {self.version!r}")
        if not isinstance(self.weight, WeightSpec):
            raise ValueError(f"QuantSpec: weight must be a WeightSpec, got {type(self.weight).__name__}")
        if self.activation is not None and not isinstance(self.activation, ActivationSpec):
            raise ValueError(
                f"QuantSpec: activation must be ActivationSpec or None, got {type(self.activation)}"
            )
        if self.version != SPEC_VERSION:
            raise ValueError(
                f"QuantSpec: unsupported spec version {self.version} (this daptq reads {SPEC_VERSION})"
            )

    def short(self) -> str:
        return self.weight.short() + ("" if self.activation is None else " " + self.activation.short())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "weight": self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        if not isinstance(d, Mapping):
            raise ValueError(f"QuantSpec.from_dict: expected a mapping, got {type(d).__name__}")
        _reject_unknown("QuantSpec", d, {"version", "weight", "activation"})
        act = d.get("activation")
        weight = d.get("weight", {})
        for key, value in (("weight", weight), ("activation", act)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"QuantSpec.{key} must be a mapping, got {type(value).__name__}: {value!r}")
        if weight is None:
            raise ValueError("QuantSpec.weight must be a mapping, got null")
        return cls(
            weight=WeightSpec.from_dict(weight),
            activation=None if act is None else ActivationSpec.from_dict(act),
            version=d.get("version", SPEC_VERSION),
        )


def w4a8(group_size: int = 128) -> QuantSpec:
    """The paper's W4A8 default: 4-bit symmetric per-group weights, int8 dynamic per-token activations."""
    return QuantSpec(WeightSpec(4, granularity="per_group", group_size=group_size), ActivationSpec(8))


def weight_only(
    bits: int, granularity: Granularity = "per_channel", group_size: int | None = None
) -> QuantSpec:
    """Shorthand for a symmetric min-max weight-only spec."""
    return QuantSpec(WeightSpec(bits, granularity=granularity, group_size=group_size))


def spec_from_bits(
    w_bits: int,
    a_bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    observer: Observer = "minmax",
    symmetric_range: SymmetricRange = "restricted",
) -> QuantSpec:
    """The CLI's ``--w-bits/--a-bits/--group-size``: per-group if ``group_size`` else per-channel weights;
    ``a_bits`` None or 16 means no activation quantization, otherwise dynamic per-token. A ``group_size``
    that is not an integer >= 2 is an error (0 is not "per-channel": that is ``group_size=None``)."""
    weight = WeightSpec(
        w_bits,
        symmetric,
        "per_channel" if group_size is None else "per_group",
        group_size,
        observer,
        symmetric_range=symmetric_range if symmetric else "restricted",
    )
    activation = None if a_bits in (None, 16) else ActivationSpec(a_bits)
    return QuantSpec(weight, activation)
