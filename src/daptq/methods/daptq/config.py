"""DAPTQConfig: every constant of DA-PTQ as a validated, documented option, and the two presets.

- ``DAPTQConfig.paper()``: faithful to the paper. W4A8 (4-bit symmetric weights in groups of 128, int8
  dynamic per-token activations), scope = backbone + interface + action head (what the paper quantizes: its
  -42.5% memory needs the VLM quantized, not only the head); DA-MPA ranks the action-head layers by
  drift-weighted sensitivity, the top 30% and the last ``float_dit_blocks`` DiT blocks stay float; CSRC at the
  adapter's interface modules, folded before rounding. Pipeline order of paper-notes section 4.
- ``DAPTQConfig.budget(average_bits=...)``: daptq's own. Whole model (backbone, interface, action head; the
  encoders with ``include_encoders=True``), one bit width per layer from ``bits`` chosen exactly (MILP) under
  an average-bit or byte budget from per-(layer, bits) drift-weighted loss estimates, CSRC on top; rounding
  by RTN or GPTQ.

Each field's comment says what it is; ``docs/daptq.md`` maps them to the paper's equations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from daptq.methods.base import MethodConfig
from daptq.methods.rotation import check_rotation
from daptq.methods.scope import DEFAULT_ROLES, Scope
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec, w4a8

from .allocation import FLOAT_BITS, FORMAT_SETS, WeightFormat
from .compensation import CSRCOptions
from .drift import DriftConfig

PAPER_ROLES = DEFAULT_ROLES  # backbone, interface, action head; the frozen encoders by flag
Estimator = Literal["drift_fisher", "drift_taylor", "unweighted_fisher", "action_deviation"]
ACTIVATION_CHOICES = (4, 8, FLOAT_BITS)


def budget_spec(activation_bits: int | None = None, group_size: int = 32) -> QuantSpec:
    """The budget preset's base grid: asymmetric min-max weights in groups of ``group_size`` (the bit width is
    chosen per layer), activations float unless ``activation_bits`` is given (dynamic per-token).

    The group size bounds the smallest budget: 2-bit codes cost 2 + 16/g + 2/g bits per weight with bf16
    scales and 2-bit zero points (g=32: 2.56; g=64: 2.28; g=128: 2.14)."""
    act = None if activation_bits in (None, 16) else ActivationSpec(activation_bits)
    return QuantSpec(WeightSpec(4, symmetric=False, granularity="per_group", group_size=group_size), act)


@dataclass(frozen=True)
class DAPTQConfig(MethodConfig):
    """DA-PTQ's options; defaults are the ``paper`` preset (see the module docstring)."""

    VERSION = 1

    spec: QuantSpec = field(default_factory=w4a8)
    scope: Scope = field(default_factory=lambda: Scope(roles=PAPER_ROLES))
    preset: Literal["paper", "budget"] = "paper"
    # --- drift prior (Eqs. 12-17) -----------------------------------------------------------------------
    drift_damping: float = 3e-4  # lambda of the damped pseudo-inverse (paper)
    translation_weight: float = 1.8  # w_x = w_y (paper)
    rotation_weight: float = 0.15  # w_theta (paper)
    gripper: Literal["chain", "separate"] = "chain"  # the gripper is the chain's last joint (paper's formula)
    gripper_weight: float = 1.0  # gripper="separate": its score relative to the chain's mean
    action_scale: float = 1.0  # action units -> virtual joint increments (rad)
    # "chain": paper's virtual chain; "fingertip": rigid-body Jacobian to the fingertips; "fixed": 1.8/0.15
    drift_jacobian: Literal["chain", "fingertip", "fixed"] = "chain"  # (drift.py's docstring)
    drift_weighted: bool = True  # False: sensitivities from the unweighted loss (ablation)
    # --- sensitivity (Eqs. 18-19) -----------------------------------------------------------------------
    sensitivity_batches: int = 8  # R: calibration batches whose gradients are averaged
    sensitivity_seed: int = 0  # seeds the diffusion timesteps/noise of the sensitivity passes
    # --- DA-MPA, paper preset (Eq. 20) ------------------------------------------------------------------
    use_mpa: bool = True  # False: every in-scope layer at the spec's bits ("CSRC only" ablation)
    keep_float_fraction: float = 0.3  # k: share of ranked layers kept float (paper: 30%)
    rank_roles: tuple[str, ...] = ("action_head",)  # roles ranked by phi (the interface is always quantized)
    float_dit_blocks: int = 2  # last N blocks of the action-head stack kept float (paper: 2; variant: 1)
    # the stack those blocks are counted in; None: the one stack the adapter declares action-head blocks in
    action_head_stack: str | None = None
    # --- budget preset ----------------------------------------------------------------------------------
    bits: tuple[int, ...] = (2, 3, 4, 8, 16)  # candidate weight bit widths per layer (on the spec's grid)
    formats: tuple[str, ...] = ()  # or candidate (bits, group) formats, e.g. GROUPED_FORMATS; replaces bits
    average_bits: float | None = None  # budget in bits per weight (scales and zero points counted)
    budget_bytes: int | None = None  # or a budget in bytes of the in-scope layers' weights
    estimator: Estimator = "drift_fisher"  # per-(layer, bits) damage estimate driving the allocation
    latency_weight: float = 0.0  # objective += latency_weight * MiB read per forward (memory-bound model)
    # activation-aware allocation: per layer also an activation width from these ({4, 8, 16}; 16 = float),
    # priced by activation_costs (drift-weighted Fisher of the output perturbation); empty: every layer takes
    # the spec's activation (as before)
    activation_choices: tuple[int, ...] = ()
    activation_mode: Literal["dynamic_per_token", "static_per_tensor"] = "dynamic_per_token"
    activation_cost_weight: float = 1.0  # activation cost multiplier beside the weight term
    # with activation_choices and latency_weight > 0: latency += latency_compute * MiB of weights read at the
    # activation width (compute of an A4 layer costs a quarter of an A16 one)
    latency_compute: float = 1.0
    rounding: Literal["rtn", "gptq"] = "rtn"  # how in-scope weights are rounded
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    # "hadamard": fold randomized Hadamard rotations into the weights first (daptq.methods.rotation)
    rotation: str | None = None
    # interactions: re-estimate the costs on the model rounded as allocated and re-solve, this many times
    # (daptq.methods.daptq.reestimate; 0: the one additive allocation)
    reestimate_rounds: int = 0
    # static activation scales per denoising step for the action head's static layers, observed on the
    # rounded and compensated model (daptq.methods.step_scales); needs static_per_tensor activations
    step_scales: bool = False
    # --- CSRC (Eqs. 4-7) --------------------------------------------------------------------------------
    use_csrc: bool = True  # False: no compensation ("DA-MPA only" ablation)
    interface_layers: tuple[str, ...] = ()  # empty: the adapter's interface_modules()
    csrc_mode: Literal["diagonal", "cross_channel", "both"] = "both"
    g_min: float = 0.5
    g_max: float = 2.0
    csrc_eps: float = 1e-6
    csrc_rank: int = 16
    lambda_f: float = 1.0
    lambda_i: float = 1e-3
    weighting: Literal["uniform", "variance_ratio"] = "variance_ratio"
    csrc_max_iter: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rotation(self.rotation, "DAPTQConfig.rotation")
        self.drift_config()  # validates the drift constants
        self.csrc_options()  # validates the CSRC constants
        if self.sensitivity_batches < 1:
            raise ValueError(f"DAPTQConfig.sensitivity_batches must be >= 1, got {self.sensitivity_batches}")
        if not 0.0 <= self.keep_float_fraction <= 1.0:
            raise ValueError(
                f"DAPTQConfig.keep_float_fraction must be in [0, 1], got {self.keep_float_fraction}"
            )
        if self.float_dit_blocks < 0:
            raise ValueError(f"DAPTQConfig.float_dit_blocks must be >= 0, got {self.float_dit_blocks}")
        bad = [b for b in self.bits if b not in (2, 3, 4, 8, FLOAT_BITS)]
        if bad or not self.bits or len(set(self.bits)) != len(self.bits):
            raise ValueError(
                f"DAPTQConfig.bits must be distinct values from (2, 3, 4, 8, 16), got {self.bits}"
            )
        formats = self.weight_formats()
        if formats and self.bits != DAPTQConfig.bits:
            raise ValueError("DAPTQConfig: give candidate bits or formats, not both")
        if len({f.label for f in formats}) != len(formats):
            raise ValueError(f"DAPTQConfig.formats must be distinct, got {self.formats}")
        if self.preset == "budget":
            if (self.average_bits is None) == (self.budget_bytes is None):
                raise ValueError(
                    "DAPTQConfig: the budget preset needs exactly one of average_bits, budget_bytes"
                )
            if self.average_bits is not None and not 0 < self.average_bits < 16:  # 16: nothing quantized
                raise ValueError(f"DAPTQConfig.average_bits must be in (0, 16), got {self.average_bits}")
            if self.budget_bytes is not None and self.budget_bytes <= 0:
                raise ValueError(f"DAPTQConfig.budget_bytes must be > 0, got {self.budget_bytes}")
        elif self.average_bits is not None or self.budget_bytes is not None:
            raise ValueError("DAPTQConfig: average_bits/budget_bytes apply to preset='budget' only")
        if self.latency_weight < 0:
            raise ValueError(f"DAPTQConfig.latency_weight must be >= 0, got {self.latency_weight}")
        if self.activation_choices:
            bad = [a for a in self.activation_choices if a not in ACTIVATION_CHOICES]
            if bad or len(set(self.activation_choices)) != len(self.activation_choices):
                raise ValueError(
                    f"DAPTQConfig.activation_choices must be distinct values from {ACTIVATION_CHOICES}, "
                    f"got {self.activation_choices}"
                )
            if self.preset != "budget":
                raise ValueError("DAPTQConfig.activation_choices (per-layer widths) needs preset='budget'")
            if self.estimator == "action_deviation":
                raise ValueError(
                    "DAPTQConfig.activation_choices are priced from gradients; use a gradient estimator, "
                    "not estimator='action_deviation'"
                )
        if self.activation_cost_weight < 0 or self.latency_compute < 0:
            raise ValueError("DAPTQConfig: activation_cost_weight and latency_compute must be >= 0")
        if not 0 <= self.gptq_damp < 1 or self.gptq_block_size < 1:
            raise ValueError("DAPTQConfig: need 0 <= gptq_damp < 1 and gptq_block_size >= 1")
        if type(self.reestimate_rounds) is not int or self.reestimate_rounds < 0:
            raise ValueError(
                f"DAPTQConfig.reestimate_rounds must be an integer >= 0, got {self.reestimate_rounds!r}"
            )
        if self.reestimate_rounds and (
            self.preset != "budget" or self.activation_choices or self.estimator == "action_deviation"
        ):
            raise ValueError(
                "DAPTQConfig.reestimate_rounds re-prices weight choices of the budget preset from gradients: "
                "it needs preset='budget', no activation_choices and a gradient estimator (not "
                "action_deviation)"
            )

    # --- the presets ------------------------------------------------------------------------------------
    @classmethod
    def paper(cls, **overrides: Any) -> DAPTQConfig:
        """The paper's DA-PTQ at W4A8 on the backbone, interface and action head."""
        return cls(**{"preset": "paper", **overrides})

    @classmethod
    def budget(
        cls,
        average_bits: float | None = 3.0,
        budget_bytes: int | None = None,
        activation_bits: int | None = None,
        group_size: int = 32,
        **overrides: Any,
    ) -> DAPTQConfig:
        """Whole-model allocation of ``bits`` under a budget (``average_bits`` or ``budget_bytes``)."""
        if budget_bytes is not None:
            average_bits = None
        base: dict[str, Any] = {
            "preset": "budget",
            "spec": budget_spec(activation_bits, group_size),
            "scope": Scope(),
            "average_bits": average_bits,
            "budget_bytes": budget_bytes,
        }
        return cls(**{**base, **overrides})

    def with_average_bits(
        self,
        average_bits: float,
        a_bits: int | None = None,
        group_size: int | None = None,
        **options: Any,
    ) -> DAPTQConfig:
        """``--avg-bits``: the ``budget`` preset at that average (a bit budget is what selects it).

        ``a_bits`` (``--a-bits``): every layer's activations at that width (dynamic per token); ``group_size``
        (``--group-size``): the base grid's group; ``options``: other fields (``--a-bits-choices`` ...)."""
        if self.preset != "budget" and self != DAPTQConfig():
            raise ValueError(
                "--avg-bits selects the budget preset; give the other options in a --config file"
            )
        if self.preset == "budget":
            spec = self.spec
            if a_bits is not None or group_size is not None:
                base = budget_spec(a_bits, group_size or self.spec.weight.group_size or 32)
                spec = QuantSpec(base.weight, base.activation if a_bits is not None else spec.activation)
            return replace(self, average_bits=average_bits, budget_bytes=None, spec=spec, **options)
        return DAPTQConfig.budget(
            average_bits=average_bits, activation_bits=a_bits, group_size=group_size or 32, **options
        )

    def with_options(self, **options: Any) -> DAPTQConfig:
        """The CLI's method options (``daptq quantize --a-bits-choices ...``) as fields of this config."""
        return replace(self, **options)

    # --- views as the modules' own option objects -------------------------------------------------------
    def weight_formats(self) -> tuple[WeightFormat, ...]:
        """The parsed ``formats`` (empty: the candidates are ``bits`` on the spec's own grid); a set name
        (``"sub2"``: binary and ternary formats plus the grouped grid; ``"grouped"``) stands for its list."""
        names = [n for f in self.formats for n in FORMAT_SETS.get(f, (f,))]
        return tuple(WeightFormat.parse(f) for f in names)

    def activation_spec(self, bits: int) -> ActivationSpec | None:
        """The activation spec of one ``activation_choices`` entry (None for 16: float activations)."""
        return None if bits == FLOAT_BITS else ActivationSpec(bits, mode=self.activation_mode)

    def drift_config(self) -> DriftConfig:
        return DriftConfig(
            self.drift_damping,
            self.translation_weight,
            self.rotation_weight,
            self.gripper,
            self.gripper_weight,
            self.action_scale,
            jacobian=self.drift_jacobian,
        )

    def csrc_options(self) -> CSRCOptions:
        return CSRCOptions(
            self.csrc_mode,
            self.g_min,
            self.g_max,
            self.csrc_eps,
            self.csrc_rank,
            self.lambda_f,
            self.lambda_i,
            self.weighting,
            self.csrc_max_iter,
        )
