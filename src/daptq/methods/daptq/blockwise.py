"""Block-wise gradients of the (drift-weighted) objective: the budget preset's whole-model estimates without
holding the whole backward graph or every layer's gradient at once.

``gradient_stats`` differentiates the objective w.r.t. every named layer in one backward: the graph of the
whole model (every block's activations) and every layer's gradient exist together. Here, as activation
checkpointing does:

1. per batch, one forward of the objective with every repeated block (``VLAAdapter.block_modules()``) run
   under non-reentrant ``torch.utils.checkpoint`` (a block's inner activations are not kept: the backward
   recomputes them), recording each block call's inputs; one backward through the rest of the model gives
   the gradient of the loss w.r.t. each block call's output, and the weight gradients of the named layers
   outside blocks (small: projector, interface, embedders);
2. per block, per batch: the block's forward recomputed from its recorded inputs and one backward from the
   recorded output gradient give its layers' weight gradients for that batch; their statistics (mean, mean
   square, phi) are handed to ``reduce`` (e.g. the per-bit costs) before the next block, so only one block's
   gradients exist at a time.

Exact: the same values go through the same operations, so the result equals ``gradient_stats`` up to the
summation order of float gradients (measured in tests/test_sequential_methods.py). What is held: per block
call, its inputs and its output gradient (two activations), for the R sensitivity batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from daptq.models.adapter import VLAAdapter

from .sensitivity import GradientStats, _weights

Batch = Mapping[str, torch.Tensor]
Call = tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]  # (args, kwargs, d loss / d output)


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple | list):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _first_output(name: str, out: Any) -> torch.Tensor:
    """The block's output tensor; a tuple whose other tensors carry gradients is refused (their gradient
    would be missed by the per-block backward)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        extra = [i for i, o in enumerate(out[1:], 1) if isinstance(o, torch.Tensor) and o.requires_grad]
        if extra:
            raise ValueError(
                f"block-wise gradients: block {name!r} returns several tensors that carry gradients "
                f"(outputs {extra}); only a block whose first output carries them is supported"
            )
        return out[0]
    raise ValueError(f"block-wise gradients: block {name!r} returned {type(out).__name__}, not a tensor")


class _Sums:
    """Per layer: sum of per-batch gradients, of their squares, and of their mean absolute value."""

    def __init__(self) -> None:
        self.sum: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.abs: dict[str, float] = {}

    def add(self, name: str, g: torch.Tensor) -> None:
        g = g.detach().double()
        if name not in self.sum:
            self.sum[name], self.sq[name], self.abs[name] = torch.zeros_like(g), torch.zeros_like(g), 0.0
        self.sum[name] += g
        self.sq[name] += g * g
        self.abs[name] += float(g.abs().mean())

    def pop(self, names: Sequence[str], r: int) -> GradientStats:
        return GradientStats(
            phi={n: self.abs.pop(n) / r for n in names},
            grad_mean={n: self.sum.pop(n) / r for n in names},
            grad_sq_mean={n: self.sq.pop(n) / r for n in names},
            n_batches=r,
        )


def _checkpointed(name: str, forward: Callable[..., Any], calls: list, record: bool) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if record and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            if not args[0].requires_grad:  # the graph must reach this block's output
                args = (args[0].detach().requires_grad_(True), *args[1:])
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
            return forward(*args, **kwargs)  # no gradient flows here: nothing to keep or recompute
        out = checkpoint(forward, *args, use_reentrant=False, **kwargs)
        first = _first_output(name, out)
        if record and first.requires_grad:
            calls.append((name, _detach(args), _detach(kwargs), first))
        return out

    return run


@contextlib.contextmanager
def checkpointed_blocks(
    containers: Mapping[str, nn.Module], record: Collection[str]
) -> Iterator[list[tuple[str, tuple, dict, torch.Tensor]]]:
    """Within the block, every container in ``containers`` (qualified name -> module) runs under
    non-reentrant activation checkpointing when a gradient flows through it; each call of a container in
    ``record`` (its first input made to require grad, so the graph reaches its output) is appended to the
    yielded list as ``(name, detached args, detached kwargs, output)``. The forwards are restored on exit."""
    calls: list[tuple[str, tuple, dict, torch.Tensor]] = []
    previous = {n: m.__dict__.get("forward") for n, m in containers.items()}
    try:
        for n, m in containers.items():
            m.forward = _checkpointed(n, m.forward, calls, n in record)
        yield calls
    finally:
        calls.clear()
        for n, m in containers.items():
            if previous[n] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous[n]


def never_called(adapter: VLAAdapter, blocks: Sequence[str]) -> None:
    """A clear error when declared blocks with in-scope layers never ran as modules (no gradient reached a
    call of theirs): their layers run some other way (e.g. a joint attention over two stacks calling the
    layers' parts), so nothing can be recomputed block by block."""
    if blocks:
        raise ValueError(
            f"block-wise gradients: {type(adapter).__name__}'s blocks {list(blocks)[:3]} never ran as "
            "modules with a gradient through them (their layers are called another way, or do not affect "
            "the output); run this method on the whole model (without --sequential)"
        )


def blockwise_gradient_stats(
    adapter: VLAAdapter,
    batches: Sequence[Batch],
    names: Sequence[str],
    dim_weights: torch.Tensor | None = None,
    seed: int = 0,
    reduce: Callable[[GradientStats], None] | None = None,
) -> GradientStats:
    """``gradient_stats`` computed block by block (see the module docstring): the same statistics.

    ``reduce``: called with each group's statistics (the layers outside blocks, then each block in
    execution order); when given, the returned stats keep ``phi`` only (no gradient tensors), so at most
    one block's gradients are ever held. ``requires_grad`` flags and the blocks' ``forward`` are restored.
    """
    from daptq.methods.sequential import block_plan

    if not batches:
        raise ValueError("sensitivity: no calibration batches")
    model = adapter.model
    weights = dict(zip(names, _weights(model, names), strict=True))
    blocks, outside = block_plan(adapter, list(names))
    containers = {b.name: model.get_submodule(b.name) for b in blocks}
    members = {b.name: b.members for b in blocks if b.members}
    records: dict[str, list[list[Call]]] = {n: [] for n in members}
    flags = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator().manual_seed(seed)
    sums, r = _Sums(), len(batches)
    phi: dict[str, float] = {}
    kept: dict[str, GradientStats] = {}
    order: list[str] = []  # blocks with members, in execution order

    def hand_over(group: Sequence[str]) -> None:
        for n in group:
            if n not in sums.sum:
                raise ValueError(f"sensitivity: the adapter's objective does not depend on {n!r}")
        stats = sums.pop(group, r)
        phi.update(stats.phi)
        if reduce is not None:
            reduce(stats)
        else:
            kept[""] = _merge(kept.get(""), stats)

    try:
        with checkpointed_blocks(containers, members) as calls:
            for p in flags:
                p.requires_grad_(False)
            for n in outside:
                weights[n].requires_grad_(True)
            for batch in batches:
                calls.clear()
                loss = adapter.objective(batch, dim_weights=dim_weights, generator=generator)
                targets = [weights[n] for n in outside] + [c[3] for c in calls]
                grads = torch.autograd.grad(loss, targets, allow_unused=True) if targets else ()
                for n, g in zip(outside, grads[: len(outside)], strict=True):
                    if g is not None:
                        sums.add(n, g)
                per_block: dict[str, list[Call]] = {n: [] for n in members}
                for (n, args, kwargs, _), g in zip(calls, grads[len(outside) :], strict=True):
                    if g is not None:
                        per_block[n].append((args, kwargs, g.detach()))
                        if n not in order:
                            order.append(n)
                for n, c in per_block.items():
                    records[n].append(c)
                del loss, targets, grads
                calls.clear()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    never_called(adapter, [n for n in members if not any(records[n])])
    if outside:
        hand_over(outside)
    try:
        for p in flags:
            p.requires_grad_(False)
        for n in [*order, *(n for n in members if n not in order)]:
            module, group = containers[n], members[n]
            ws = [weights[m] for m in group]
            for w in ws:
                w.requires_grad_(True)
            for per_batch in records.pop(n):
                total: list[torch.Tensor | None] = [None] * len(ws)
                for args, kwargs, gout in per_batch:
                    with torch.enable_grad():
                        out = _first_output(n, module(*args, **kwargs))
                        gs = torch.autograd.grad(out, ws, grad_outputs=gout, allow_unused=True)
                    total = [_add(t, g) for t, g in zip(total, gs, strict=True)]
                for m, g in zip(group, total, strict=True):
                    if g is not None:
                        sums.add(m, g)
            for w in ws:
                w.requires_grad_(False)
            hand_over(group)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    whole = kept.get("")
    if whole is None:
        return GradientStats({n: phi[n] for n in names}, {}, {}, r)
    return GradientStats(
        {n: phi[n] for n in names},
        {n: whole.grad_mean[n] for n in names},
        {n: whole.grad_sq_mean[n] for n in names},
        r,
    )


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a + b


def _merge(a: GradientStats | None, b: GradientStats) -> GradientStats:
    if a is None:
        return b
    return GradientStats(
        {**a.phi, **b.phi}, {**a.grad_mean, **b.grad_mean}, {**a.grad_sq_mean, **b.grad_sq_mean}, b.n_batches
    )
