"""Per-linear calibration statistics gathered from the stream, and replay of finished submodules."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sds_cli.engine.experts import input_kind, routed_names
from sds_cli.engine.stream import Stream, block_inputs, move_to
from sds_cli.errors import ConfigError


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input X (tokens as columns).

    ``gram`` is the mean of x x^T over tokens (fp32); Wanda needs only its diagonal, SparseGPT and the
    SDS reconstruction need all of it. The SDS stages also pair each token with the dense model's
    input to the same layer, x_ref: ``cross`` is the mean of x_ref x^T, ``ref_gram`` of x_ref x_ref^T."""

    gram: torch.Tensor
    tokens: int
    cross: torch.Tensor | None = None
    ref_gram: torch.Tensor | None = None
    held: LayerStats | None = None  # the same statistics over held-out batches the fit does not see
    _eigh: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def sqnorm(self) -> torch.Tensor:
        return torch.diagonal(self.gram)

    def eigh(self, which: str = "gram") -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecomposition of ``gram`` or ``ref_gram``, computed once: linears fed the same input share
        one LayerStats (``engine.collect``), so q/k/v and gate/up share one decomposition."""
        if which not in self._eigh:
            self._eigh[which] = torch.linalg.eigh(getattr(self, which))
        return self._eigh[which]


def check_held_out(held_out: int, batches: int) -> None:
    if held_out and not 0 < held_out < batches:
        raise ConfigError(f"{held_out} held-out calibration batches leave none to fit on: there are {batches}; "
                          f"choose 0 to {batches - 1}")


@torch.no_grad()
def collect(block: nn.Module, stream: Stream, names: list[str],
            reference: tuple[nn.Module, Stream] | None = None, shared: bool = False,
            held_out: int = 0) -> dict[str, LayerStats]:
    """Per-linear input statistics over the stream: the mean of x x^T; with a ``reference`` (the dense
    block and its own stream) also the cross term x_ref x^T and the reference's own x_ref x_ref^T.
    Linears fed the same tensor (q/k/v, gate/up) share one computation and one ``LayerStats``. The
    block's forward stops once every named input is seen (attention inputs alone skip the MLP); where
    the caller knows that all ``names`` share one input (``shared``, a group of ``input_groups``), at the
    first, so that q and k (or gate) are not computed only to reach v's (or up's) input. The last ``held_out``
    batches go into ``LayerStats.held`` instead of the main statistics: windows a fit never sees, to judge it on."""
    check_held_out(held_out, len(stream.hidden))
    if shared and names[0] not in routed_names(block, names):
        return dict.fromkeys(names, collect(block, stream, names[:1], reference, held_out=held_out)[names[0]])
    if reference and (routed := list(routed_names(block, names))):
        raise ConfigError(f"{routed[0]}: statistics against the dense model's inputs pair each token's dense and "
                          "pruned inputs, which a fused expert lacks (the two routers pick different tokens); use "
                          "redense.inputs=sparse redense.target=dense_weights, or leave the experts out with targets=")
    owner: dict[str, str] = {}  # linear -> the first linear fed the same input
    sums: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}  # (linear, held out) -> sums over tokens
    tokens: dict[tuple[str, bool], int] = {}
    ref_batches = reference[1].batches() if reference else None
    for b, (h, kw) in enumerate(stream.batches()):
        xr = block_inputs(reference[0], names, *next(ref_batches)) if reference else {}
        xs = block_inputs(block, names, h, kw)
        if not owner:
            first = {}
            owner = {n: first.setdefault((id(xs[n]), id(xr.get(n))), n) for n in names}
        for n in dict.fromkeys(owner.values()):
            x = xs[n].reshape(-1, xs[n].shape[-1]).float()
            terms = {"gram": x.T @ x}
            if reference:
                r = xr[n].reshape(-1, xr[n].shape[-1]).float()
                terms |= {"cross": r.T @ x, "ref_gram": r.T @ r}
            key = (n, b >= len(stream.hidden) - held_out)
            sums[key] = {k: sums[key][k] + v for k, v in terms.items()} if key in sums else terms
            tokens[key] = tokens.get(key, 0) + len(x)
    for (n, _), s in sums.items():
        if not torch.isfinite(s["gram"]).all():
            raise FloatingPointError(f"the calibration activations entering {n} contain NaN or Inf "
                                     "(overflow in a half-precision dtype? try dtype=float32)")

    def stats(n: str, held: bool) -> LayerStats:
        s, t = sums.get((n, held), {}), tokens.get((n, held), 0)
        return LayerStats(tokens=t, **{k: v / max(t, 1) for k, v in s.items()},
                          held=stats(n, True) if held_out and not held else None)
    return {n: stats(owner[n], False) for n in names}


@torch.no_grad()
def input_groups(block: nn.Module, stream: Stream, names: list[str]) -> list[list[str]]:
    """The named linears grouped by the input they share (q/k/v, gate/up), in the order the block's forward
    reaches them (found on the first batch), for stages that re-collect each group's inputs after the
    groups before it have changed."""
    groups: dict[object, list[str]] = {}
    routed = routed_names(block, names)
    for n, x in block_inputs(block, names, *next(stream.batches())).items():  # the inputs live on: no id is reused
        groups.setdefault((routed[n][0], input_kind(routed[n][1])) if n in routed else id(x), []).append(n)
    return list(groups.values())

class Frozen:
    """Replays the outputs of a block's submodules (not the linears themselves) whose selected linears are
    all final, one per calibration batch.

    A sequential stage runs the block's batches once per input group. Groups run in forward order, so a
    submodule whose linears are done also has a fixed input: its outputs are recorded on the next pass and
    replayed on the later ones (the attention runs once after o_proj is final, not again for gate/up, down
    and the stream to the next block). With ``linears``, finished linears replay their own outputs too
    (q/k/v while o_proj's and the MLP's inputs are collected, gate/up for the stream to the next block): on
    the CPU a linear costs more than keeping its outputs, on an accelerator the reverse. ``restore`` gives
    every submodule its own forward back."""

    def __init__(self, block: nn.Module, names: list[str], stream: Stream, linears: bool = False):
        self.block, self.names, self.stream, self.linears = block, set(names), stream, linears
        self.outputs: dict[str, list] = {}
        self.patched: dict[nn.Module, Callable | None] = {}

    def freeze(self, done: set[str]) -> None:
        for path, module in self.block.named_modules():
            inside = {n for n in self.names if n.startswith(path + ".") or (self.linears and n == path)}
            if path and inside and inside <= done and not any(path == f or path.startswith(f + ".") for f in self.outputs):
                self.outputs[path], self.patched[module] = [], vars(module).get("forward")  # None: the class's
                module.forward = self._replaying(module.forward, self.outputs[path])

    def _replaying(self, forward, outputs: list):
        calls = itertools.count()

        def replay(*args, **kwargs):
            i = next(calls) % len(self.stream.hidden)  # each pass reaches a finished submodule once per batch
            if i == len(outputs):
                outputs.append(move_to(forward(*args, **kwargs), self.stream.store))
            return move_to(outputs[i], self.stream.device)
        return replay

    def restore(self) -> None:
        for module, forward in self.patched.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        self.patched.clear()
        self.outputs.clear()


def relative_error(weight: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 from the second moment X X^T alone."""
    diff = weight - new
    return ((diff @ gram) * diff).sum().item() / max(((weight @ gram) * weight).sum().item(), 1e-30)
