"""Sequential (block-by-block) calibration: the loop that lets a method quantize a model larger than memory.

As llm-compressor's sequential pipeline and GPTQModel's layer loop, but over the repeated blocks a VLA adapter
declares (vision blocks, backbone layers, DiT blocks; ``QuantizableModule.stack``/``.block``)::

    prepare(adapter)
    phase A: one calibration pass of the whole policy (with weights streamed block by block when a
             ``loader`` is given) that records every block's call inputs ``(args, kwargs)`` -- in memory, or
             spilled to a temporary directory past ``max_in_memory_bytes`` -- and lets the method observe the
             in-scope modules outside any block (projector, interface, embedders) as in the whole-model path
    phase B: for each block in execution order: load it, replay its recorded inputs with the method's hooks
             on its modules only (``calibrate_modules``), round it (``apply_modules``), compute its outputs
             (quantized or float, as ``method.sequential_propagation()`` says) as the next block's inputs,
             then the per-block event ``method.on_block_end`` and the caller's ``on_block_done`` (stream the
             result to disk, free the block)

A method's parts that need the whole policy run around the loop: ``method.sequential_begin(adapter,
batches)`` at the start of phase A (drift weights, gradient sensitivities, a global bit allocation; DA-PTQ
and QVLA compute whole-model gradients block by block there, ``methods/daptq/blockwise.py``) and
``method.sequential_end(adapter, run)`` after the last block (corrections measured on the quantized policy:
QuantVLA's ATM/OHB, DA-PTQ's CSRC). With a streamed ``loader``, the blocks ``sequential_resident`` names
stay loaded through ``sequential_begin`` (a backward needs their weights) and ``sequential_end``'s passes
reload each rounded block from the scratch directory; a method that cannot stream (whole-model gradients,
corrections folded into blocks after the loop) says ``sequential_needs_whole_model()`` and is refused.

With float propagation (RTN, GPTQ with ``sequential=False``) every block sees exactly the inputs it sees in
the whole-model pass, so the quantized model equals the whole-model path's (bitwise for RTN; GPTQ's Hessians
are accumulated in the same order). With quantized propagation (GPTQ ``sequential=True``) block i+1 is
calibrated on quantized block i's outputs -- which needs block i+1's first input to be block i's output,
checked during phase A -- in one pass per block rather than one whole-model pass per layer. Propagation stays
within a stack: a stack's first block, and modules outside blocks, are calibrated on float inputs.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from daptq.methods.base import Method, MethodConfig, forward_batch
from daptq.methods.record import QuantRecord
from daptq.models.adapter import VLAAdapter

Propagation = Literal["float", "quantized"]
BlockKey = tuple[str, int]


class BlockLoader(Protocol):
    """Where block weights come from when the model is not whole in memory (``daptq.models.streaming``)."""

    def load_block(self, name: str, module: nn.Module) -> None:
        """Materialize ``module`` (the block ``name`` of the model) with its weights."""

    def free_block(self, name: str, module: nn.Module) -> None:
        """Release the block's tensors (back to the meta device)."""


@dataclass
class Block:
    """One repeated block: its key ``(stack, index)``, its container's qualified name and its in-scope
    modules (possibly none: the block is still run to propagate its outputs)."""

    key: BlockKey
    name: str
    members: list[str] = field(default_factory=list)


def block_plan(adapter: VLAAdapter, in_scope: Sequence[str]) -> tuple[list[Block], list[str]]:
    """(the adapter's blocks, the in-scope modules outside any block), blocks by stack then index."""
    containers = adapter.block_modules()
    blocks = {key: Block(key, name) for key, name in sorted(containers.items())}
    where = {m.name: (m.stack, m.block) for m in adapter.quantizable_modules() if m.block is not None}
    rest: list[str] = []
    for name in in_scope:
        key = where.get(name)
        if key is None or key not in blocks:
            rest.append(name)
        else:
            blocks[key].members.append(name)  # type: ignore[index]
    for b in blocks.values():
        outside = [n for n in b.members if not (n == b.name or n.startswith(b.name + "."))]
        if outside:
            raise ValueError(f"block {b.key} ({b.name!r}): declared modules {outside} are not inside it")
    return list(blocks.values()), rest


# ---- recorded block inputs --------------------------------------------------------------------------------
def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, Mapping):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


class InputStore:
    """Per-block lists of call inputs ``(args, kwargs)``: in memory up to ``max_in_memory_bytes``, beyond
    that written to ``directory`` (tensors and plain containers only: read with ``weights_only=True``)."""

    def __init__(self, directory: Path, max_in_memory_bytes: int | None = None) -> None:
        self.directory = directory
        self.limit = max_in_memory_bytes
        self.in_memory = 0
        self.spilled_bytes = 0
        self._entries: dict[BlockKey, list[Any]] = {}
        self._count = itertools.count()

    def append(self, key: BlockKey, call: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
        size = _nbytes(call)
        entries = self._entries.setdefault(key, [])
        if self.limit is not None and self.in_memory + size > self.limit:
            path = self.directory / f"inputs-{next(self._count)}.pt"
            try:
                torch.save(call, path)
            except Exception as e:  # noqa: BLE001 (pickling error types vary)
                raise ValueError(f"block {key}: its call inputs cannot be spilled to disk: {e}") from e
            entries.append(path)
            self.spilled_bytes += size
        else:
            entries.append(call)
            self.in_memory += size

    def replace(self, key: BlockKey, calls: list[Any]) -> None:
        self.drop(key)
        for c in calls:
            self.append(key, c)

    def calls(self, key: BlockKey) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        for entry in self._entries.get(key, []):
            if isinstance(entry, Path):
                try:
                    yield torch.load(entry, weights_only=True)
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"block {key}: spilled inputs {entry} do not load: {e}") from e
            else:
                yield entry

    def count(self, key: BlockKey) -> int:
        return len(self._entries.get(key, []))

    def drop(self, key: BlockKey) -> None:
        for entry in self._entries.pop(key, []):
            if isinstance(entry, Path):
                entry.unlink(missing_ok=True)
            else:
                self.in_memory -= _nbytes(entry)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"a block returned {type(out).__name__}; sequential propagation needs a tensor first")


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _with_first_input(call: Any, x: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = call
    if args and isinstance(args[0], torch.Tensor):
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


# ---- rounded blocks kept on disk for a pass over the quantized policy (streamed weights) ---------------
def save_rounded_block(module: nn.Module, path: Path) -> None:
    """Every parameter and buffer of a rounded block (non-persistent ones too: this is the loop's own
    scratch file, read back by ``load_rounded_block`` in the same process), as safetensors."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, owner in module.named_modules():
        for kind, table in (("p", owner._parameters), ("b", owner._buffers)):
            for attr, t in table.items():
                if t is not None:
                    tensors[f"{prefix}/{kind}/{attr}"] = t.detach().contiguous().clone()
    save_file(tensors, str(path))


def load_rounded_block(module: nn.Module, path: Path) -> None:
    """Assign the tensors ``save_rounded_block`` wrote over the block's (meta) ones; a buffer it did not
    write was None when saved and is None again (a lazily filled cache left on meta by ``free_block`` would
    otherwise be read as if it held the block's values)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for prefix, owner in module.named_modules():
        for attr in list(owner._buffers):
            if f"{prefix}/b/{attr}" not in tensors:
                owner._buffers[attr] = None
    for key, t in tensors.items():
        prefix, kind, attr = key.rsplit("/", 2)
        owner = module.get_submodule(prefix) if prefix else module
        if kind == "p":
            grad = bool(getattr(owner._parameters[attr], "requires_grad", False))
            owner._parameters[attr] = nn.Parameter(t, requires_grad=grad)
        else:
            owner._buffers[attr] = t


# ---- peak memory ------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size since start or the last ``reset_peak_rss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cuda_in_use() -> bool:
    """CUDA initialized by this process (never initialize it just to measure)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class StageMeter:
    """Wall time and peak RSS per stage into one dict (``{stage}_s``, ``{stage}_peak_rss_mb``)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def stage(self, name: str, accumulate: bool = False):
        """``accumulate``: add to the stage's time and peak so far (a stage measured in two parts)."""
        meter = self
        time_key, peak_key = f"{name}_s", f"{name}_peak_rss_mb"

        class _Stage:
            def __enter__(self):
                reset_peak_rss()
                if _cuda_in_use():
                    torch.cuda.reset_peak_memory_stats()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                elapsed, peak = time.perf_counter() - self.t0, peak_rss_bytes() / 2**20
                if accumulate:
                    elapsed += meter.timings.get(time_key, 0.0)
                    peak = max(peak, meter.timings.get(peak_key, 0.0))
                meter.timings[time_key], meter.timings[peak_key] = elapsed, peak
                if _cuda_in_use():  # device memory beside host memory (untested: no GPU in CI)
                    cuda_key = f"{name}_peak_cuda_mb"
                    cuda = torch.cuda.max_memory_allocated() / 2**20
                    meter.timings[cuda_key] = max(
                        cuda, meter.timings.get(cuda_key, 0.0) if accumulate else 0.0
                    )
                return False

        return _Stage()


# ---- the loop ---------------------------------------------------------------------------------------------
def run_sequential(
    method: Method,
    adapter: VLAAdapter,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    loader: BlockLoader | None = None,
    max_in_memory_bytes: int | None = None,
    spill_dir: str | Path | None = None,
    on_block_done: Callable[[Block, nn.Module], None] | None = None,
    meter: StageMeter | None = None,
) -> dict[str, Any]:
    """Calibrate and apply ``method`` (prepared) block by block (see the module docstring); returns what the
    loop did (blocks, calls per block, spilled bytes) for the record."""
    if method.plan is None:
        raise RuntimeError(f"{type(method).__name__}: prepare() must run before the sequential loop")
    if not method.supports_sequential():
        raise ValueError(
            f"method {method.name!r} has no per-block calibration (calibrate_modules/apply_modules); "
            "run it on the whole model"
        )
    if loader is not None and method.sequential_needs_whole_model():
        raise ValueError(
            f"method {method.name!r} block by block needs its whole model in memory (whole-model "
            "sensitivities, or corrections folded into blocks after the loop): run it without a streamed "
            "block loader"
        )
    # with a loader, a pass over the quantized policy after the loop reloads each rounded block from disk
    end_pass = loader is not None and type(method).sequential_end is not Method.sequential_end
    propagation = method.sequential_propagation()
    meter = meter or StageMeter()
    model = adapter.model
    blocks, rest = block_plan(adapter, list(method.plan.modules))
    by_key = {b.key: b for b in blocks}
    needs_data = method.requires_calibration()
    # Whose inputs phase A keeps: blocks with in-scope modules; with quantized propagation, every block of
    # their stacks (the chain runs through them). Other blocks just run (streamed when a loader is given).
    stacks = {b.key[0] for b in blocks if b.members}
    keep = {
        b.key
        for b in blocks
        if needs_data and (b.members or (propagation == "quantized" and b.key[0] in stacks))
    }
    if needs_data and not batches:
        raise ValueError(f"method {method.name!r} needs calibration batches")
    with tempfile.TemporaryDirectory(prefix="daptq-seq-", dir=spill_dir) as tmp:
        store = InputStore(Path(tmp), max_in_memory_bytes)
        first_call: dict[BlockKey, int] = {}
        follows: dict[BlockKey, bool] = {}  # block i+1's first input was block i's output, in every call
        last_out: dict[BlockKey, torch.Tensor] = {}
        handles: list[Any] = []

        recording = [True]  # phase A records block inputs; later whole-model runs (a method's second
        # pass over modules outside blocks, e.g. static scales after smoothing) only stream the blocks
        resident: set[str] = set()  # blocks a loader keeps loaded (sequential_begin's differentiated ones)
        rounded: dict[str, Path] = {}  # rounded blocks on disk, for sequential_end's passes (end_pass)

        def load(name: str, module: nn.Module) -> None:
            if loader is None or name in resident:
                return
            if name in rounded:
                load_rounded_block(module, rounded[name])
            else:
                loader.load_block(name, module)

        def free(name: str, module: nn.Module) -> None:
            if loader is not None and name not in resident:
                loader.free_block(name, module)

        def pre(key: BlockKey):
            def hook(module, args, kwargs):
                load(by_key[key].name, module)
                if not recording[0]:
                    return
                first_call.setdefault(key, len(first_call))
                prev = last_out.get((key[0], key[1] - 1))
                x = _first_input(args, kwargs)
                same = prev is not None and x is not None and (x is prev or torch.equal(x, prev))
                follows[key] = follows.get(key, True) and same
                if key in keep:
                    store.append(key, (_detach(tuple(args)), _detach(dict(kwargs))))

            return hook

        def post(key: BlockKey):
            def hook(module, _args, _kwargs, output):
                if recording[0]:
                    last_out[key] = _first_tensor(output).detach()
                    last_out.pop((key[0], key[1] - 1), None)
                free(by_key[key].name, module)

            return hook

        try:
            with meter.stage("calibrate"):
                for b in blocks:
                    module = model.get_submodule(b.name)
                    handles.append(module.register_forward_pre_hook(pre(b.key), with_kwargs=True))
                    handles.append(module.register_forward_hook(post(b.key), with_kwargs=True))

                ran = [False]

                def full_run() -> None:
                    ran[0] = True
                    for i, batch in enumerate(batches):
                        forward_batch(adapter, batch, seed=i)
                        last_out.clear()

                try:  # a data-free method observes nothing: no forward pass at all
                    recording[0] = False  # method-wide statistics first: their passes record nothing
                    if loader is not None:
                        wanted = list(method.sequential_resident(adapter))
                        for b in blocks:
                            if any(n == b.name or n.startswith(b.name + ".") for n in wanted):
                                loader.load_block(b.name, model.get_submodule(b.name))
                                resident.add(b.name)
                    try:
                        method.sequential_begin(adapter, batches)
                    finally:
                        for name in list(resident):
                            resident.discard(name)
                            loader.free_block(name, model.get_submodule(name))  # type: ignore[union-attr]
                    recording[0] = True
                    method.calibrate_modules(adapter, rest, full_run if needs_data else _nothing)
                    if keep and not ran[0]:  # nothing outside blocks observed now: record the inputs anyway
                        method.remove_hooks()
                        full_run()
                finally:
                    method.remove_hooks()
                    recording[0] = False
                    last_out.clear()
            order = sorted(blocks, key=lambda b: (first_call.get(b.key, len(first_call)), b.key))
            never = [b.name for b in order if needs_data and b.members and b.key not in first_call]
            if never:
                raise ValueError(
                    f"sequential calibration: these blocks never ran on the calibration data: {never}"
                )
            with meter.stage("apply"):
                try:
                    method.apply_modules(adapter, rest)
                finally:
                    method.remove_hooks()
        finally:
            for h in handles:
                h.remove()
        with meter.stage("apply", accumulate=True):
            for b in order:
                if b.key not in keep and not b.members:
                    continue  # nothing to round, nothing to propagate
                module = model.get_submodule(b.name)
                if loader is not None:
                    loader.load_block(b.name, module)
                calls = list(store.calls(b.key)) if needs_data else []

                def replay(_m=module, _calls=calls) -> None:
                    with torch.no_grad():
                        for args, kwargs in _calls:
                            _m(*args, **kwargs)

                try:
                    method.calibrate_modules(adapter, b.members, replay)
                finally:
                    method.remove_hooks()
                method.apply_modules(adapter, b.members)
                nxt = (b.key[0], b.key[1] + 1)
                if propagation == "quantized" and nxt in by_key and store.count(nxt):
                    if not follows.get(nxt, False) or store.count(nxt) != len(calls):
                        raise ValueError(
                            f"quantized propagation: block {by_key[nxt].name!r} does not take block "
                            f"{b.name!r}'s output as its first input in every call; run this method with "
                            "float propagation or on the whole model"
                        )
                    with torch.no_grad():
                        outs = [_first_tensor(module(*a, **k)).detach() for a, k in calls]
                    store.replace(
                        nxt, [_with_first_input(c, o) for c, o in zip(store.calls(nxt), outs, strict=True)]
                    )
                store.drop(b.key)
                del calls
                method.on_block_end(adapter, b.key)
                if on_block_done is not None:
                    on_block_done(b, model.get_submodule(b.name))
                if end_pass:
                    path = Path(tmp) / f"rounded-{len(rounded)}.safetensors"
                    save_rounded_block(model.get_submodule(b.name), path)
                    rounded[b.name] = path
                if loader is not None:
                    loader.free_block(b.name, model.get_submodule(b.name))
            try:  # corrections measured on the quantized policy (blocks streamed: reloaded as rounded)
                if end_pass:
                    for b in blocks:
                        module = model.get_submodule(b.name)
                        handles.append(module.register_forward_pre_hook(pre(b.key), with_kwargs=True))
                        handles.append(module.register_forward_hook(post(b.key), with_kwargs=True))

                def whole_run() -> None:
                    for i, batch in enumerate(batches):
                        forward_batch(adapter, batch, seed=i)

                method.sequential_end(adapter, whole_run)
            finally:
                method.remove_hooks()
                for h in handles:
                    h.remove()
                handles.clear()
        spilled = store.spilled_bytes
    return {
        "propagation": propagation,
        "blocks": [b.name for b in order],
        "outside_blocks": list(rest),
        "spilled_input_bytes": spilled,
    }


def _nothing() -> None:
    return None


def quantize_policy_sequential(
    policy: Any,
    config: MethodConfig,
    calibration: Any = None,
    *,
    base_model: dict[str, Any] | None = None,
    loader: BlockLoader | None = None,
    max_in_memory_bytes: int | None = None,
    spill_dir: str | Path | None = None,
    on_block_done: Callable[[Block, nn.Module], None] | None = None,
) -> QuantRecord:
    """``quantize_policy`` through the block loop: the same record, plus ``decisions["sequential"]`` and
    per-stage peak RSS in ``timings``. Without a ``loader`` the model is restored on failure as in
    ``quantize_policy``; with one (weights streamed) it cannot be: a failure leaves it partly quantized."""
    import contextlib

    from daptq.data.calibration import CalibrationSet
    from daptq.methods import _daptq_version, as_adapter, get_method
    from daptq.methods.registered import hold_registered, release_registered
    from daptq.methods.rotation import rotate_for_method
    from daptq.models.policy import ChunkedPolicy
    from daptq.quant.api import restored_on_failure

    if not isinstance(config, MethodConfig):
        raise ValueError(f"quantize_policy_sequential: config must be a method config, got {config!r}")
    adapter = as_adapter(policy)
    method = get_method(config)
    if method.requires_calibration() and calibration is None:
        raise ValueError(f"method {method.name!r} needs calibration data (a CalibrationSet)")
    if calibration is not None:
        if not isinstance(calibration, CalibrationSet):
            raise ValueError(f"calibration must be a CalibrationSet, got {type(calibration).__name__}")
        calibration.check(adapter.action_space)
    meter = StageMeter()
    guard = restored_on_failure(adapter.model) if loader is None else contextlib.nullcontext()
    with guard:
        with meter.stage("prepare"):
            method.prepare(adapter)
            rotate_for_method(method, adapter, streamed=loader is not None)  # daptq.methods.rotation
            held = hold_registered(method, adapter)  # registered module types: rounded after, as there
            batches = (
                [] if calibration is None else list(adapter.calibration_batches(iter(calibration.batches)))
            )
        info = run_sequential(
            method,
            adapter,
            batches,
            loader=loader,
            max_in_memory_bytes=max_in_memory_bytes,
            spill_dir=spill_dir,
            on_block_done=on_block_done,
            meter=meter,
        )
        release_registered(method, adapter, held)
    if isinstance(policy, ChunkedPolicy):
        policy.invalidate_caches()
    method.decisions["sequential"] = info
    record = method.record()
    provenance = (
        None if calibration is None else {**calibration.provenance, "samples": calibration.num_samples}
    )
    return replace(
        record,
        calibration=provenance,
        base_model=dict(base_model or {}),
        timings={**record.timings, **meter.timings},
        versions={"torch": torch.__version__, **_daptq_version()},
    )


__all__ = [
    "Block",
    "BlockLoader",
    "InputStore",
    "StageMeter",
    "block_plan",
    "peak_rss_bytes",
    "quantize_policy_sequential",
    "reset_peak_rss",
    "run_sequential",
]
