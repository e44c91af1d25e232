"""The block-by-block engine shared by every stage and every model family.

The inputs of the first decoder block are captured once; each stage then walks the blocks in order,
gathering per-linear input statistics, changing the block's weights, and recomputing its outputs so
that the next block sees the activations of the model as modified so far. Only the current block
and (unless offloaded) the activations live on the accelerator."""
from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .models import block_linears, decoder_layers
from .pruners.base import ConfigError, LayerStats

if TYPE_CHECKING:
    from .checkpoint import StageCheckpoint


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Captured(Exception):
    pass


class ReplayMismatch(ConfigError):
    """The engine's block-by-block replay does not reproduce the model's own forward."""


@dataclass
class Stream:
    """Hidden states entering block ``index``, one tensor per calibration batch, and for every block
    and batch the keyword inputs the model's forward hands that block (attention mask, positions,
    rotary embeddings): blocks of different attention types (sliding-window and global) get different
    ones. Equal keyword tensors are stored once (``_Interner``)."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]  # [block][batch]
    device: torch.device
    store: torch.device
    index: int = 0

    def batches(self):
        for h, kw in zip(self.hidden, self.kwargs[self.index]):
            yield h.to(self.device), _to(kw, self.device)

    @torch.no_grad()
    def through(self, block: nn.Module) -> Stream:
        """The outputs of ``block`` (block ``index``): the stream entering the next block."""
        out = [_hidden(block(h, **kw)).to(self.store) for h, kw in self.batches()]
        return Stream(out, self.kwargs, self.device, self.store, self.index + 1)


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class _Interner:
    """Keeps one stored copy of each distinct keyword tensor: the masks and rotary embeddings repeat
    across blocks of one attention type and across equally shaped batches."""

    def __init__(self, store: torch.device):
        self.store, self.seen = store, {}

    def __call__(self, obj):
        if isinstance(obj, torch.Tensor):
            same = self.seen.setdefault((obj.shape, obj.dtype), [])
            for kept in same:
                if torch.equal(kept, obj.to(kept.device)):
                    return kept
            same.append(obj.to(self.store))
            return same[-1]
        if isinstance(obj, (tuple, list)):
            return type(obj)(self(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self(v) for k, v in obj.items() if k not in ("past_key_value", "past_key_values", "cache")}
        return obj


def _move_non_block_params(model: nn.Module, layers: nn.ModuleList, device) -> None:
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is not None and id(tensor) not in inside:
                    tensor.data = tensor.data.to(device)


@contextmanager
def _stubbed(model: nn.Module, device, record: Callable[[int, torch.Tensor, dict], None], kinds: list[int]):
    """The model with every decoder block replaced by a stub that hands ``record`` what the model's
    forward gives it, and passes the hidden states on unchanged in the block's own output form
    (``kinds``: 0 a tensor, k a k-tuple); the last one stops the forward. Embeddings, masks and rotary
    embeddings still run, so the cost is that of the embeddings alone."""
    layers = decoder_layers(model)

    def stub(i):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            record(i, h, kw)
            if i == len(layers) - 1:
                raise _Captured
            return (h, *[None] * (kinds[i] - 1)) if kinds[i] else h
        return forward

    _move_non_block_params(model, layers, device)
    for i, block in enumerate(layers):
        block.forward = stub(i)
    try:
        yield
    finally:
        for block in layers:
            del block.forward
        _move_non_block_params(model, layers, "cpu")


@torch.no_grad()
def _reference_outputs(model: nn.Module, window: torch.Tensor, device) -> list:
    """Each block's output (on the CPU) in the model's own forward on ``window``, one block on the
    device at a time."""
    layers, outputs = decoder_layers(model), []

    def arrive(block, args):
        block.to(device)

    def leave(block, args, out):
        outputs.append(_to(out, "cpu"))
        block.to("cpu")

    handles = [b.register_forward_pre_hook(arrive) for b in layers] + [b.register_forward_hook(leave) for b in layers]
    _move_non_block_params(model, layers, device)
    try:
        model(window.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        _move_non_block_params(model, layers, "cpu")
    return outputs


@torch.no_grad()
def capture(model: nn.Module, windows: torch.Tensor, batch_size: int, device, offload: bool,
            kinds: list[int] | None = None) -> Stream:
    """Run the embeddings on the calibration windows and keep what enters the first block, and for
    every block the keyword inputs the model's forward gives it. ``kinds`` (each block's output form,
    from ``check_replay``) saves a forward of one window through the whole model."""
    layers = decoder_layers(model)
    store = torch.device("cpu") if offload else torch.device(device)
    kinds = kinds or _kinds(_reference_outputs(model, windows[:1], device))
    intern = _Interner(store)
    hidden, kwargs = [], [[] for _ in layers]

    def record(i, h, kw):
        if i == 0:
            hidden.append(h.to(store))
        kwargs[i].append(intern(kw))

    with _stubbed(model, device, record, kinds):
        for batch in windows.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    return Stream(hidden, kwargs, torch.device(device), store)


@torch.no_grad()
def replay(model: nn.Module, stream: Stream, reference: list) -> list[float]:
    """Run ``stream`` through every block as the stages do (each block fed the one before it) and return,
    per block, the relative difference of its output to ``reference`` (the model's own, ``_reference_outputs``)."""
    diffs = []
    for i, block in enumerate(decoder_layers(model)):
        block.to(stream.device)
        stream = stream.through(block)
        block.to("cpu")
        want = _hidden(reference[i]).to(stream.hidden[0])
        if not torch.isfinite(want).all():
            raise FloatingPointError(f"the activations leaving block {i} contain NaN or Inf "
                                     "(overflow in a half-precision dtype? try dtype=float32)")
        diffs.append(((stream.hidden[0] - want).norm() / want.norm().clamp_min(1e-30)).item())
    return diffs


def check_replay(model: nn.Module, window: torch.Tensor, device, tolerance: float) -> tuple[list[float], list[int]]:
    """Replay ``window`` block by block on its captured inputs and compare each block's output with the
    model's own forward. Raises ``ReplayMismatch`` naming the first block beyond ``tolerance``: a model
    whose forward does more between blocks than the engine replays is refused, never pruned wrongly.
    Returns the per-block differences and each block's output form for ``capture``."""
    reference = _reference_outputs(model, window, device)
    kinds = _kinds(reference)
    diffs = replay(model, capture(model, window, 1, device, offload=True, kinds=kinds), reference)
    for i, (diff, block) in enumerate(zip(diffs, decoder_layers(model))):
        if not diff <= tolerance:
            raise ReplayMismatch(
                f"block {i} ({type(block).__name__}) replayed on its captured inputs differs from "
                f"{type(model).__name__}'s own forward by {diff:.2e} (relative, tolerance {tolerance:g}); "
                "the engine cannot prune this model family faithfully")
    return diffs, kinds


def _kinds(outputs: list) -> list[int]:
    return [len(out) if isinstance(out, tuple) else 0 for out in outputs]


@torch.no_grad()
def collect(block: nn.Module, stream: Stream, names: list[str],
            reference: tuple[nn.Module, Stream] | None = None, shared: bool = False) -> dict[str, LayerStats]:
    """Per-linear input statistics over the stream: the mean of x x^T; with a ``reference`` (the dense
    block and its own stream) also the cross term x_ref x^T and the reference's own x_ref x_ref^T.
    Linears fed the same tensor (q/k/v, gate/up) share one computation and one ``LayerStats``. The
    block's forward stops once every named input is seen (attention inputs alone skip the MLP); where
    the caller knows that all ``names`` share one input (``shared``, a group of ``input_groups``), at the
    first, so that q and k (or gate) are not computed only to reach v's (or up's) input."""
    if shared:
        return dict.fromkeys(names, collect(block, stream, names[:1], reference)[names[0]])
    owner: dict[str, str] = {}  # linear -> the first linear fed the same input
    sums: dict[str, dict[str, torch.Tensor]] = {}
    tokens = 0
    ref_batches = reference[1].batches() if reference else None
    for h, kw in stream.batches():
        xr = _inputs(reference[0], names, *next(ref_batches)) if reference else {}
        xs = _inputs(block, names, h, kw)
        tokens += h.shape[0] * h.shape[1]
        if not owner:
            first = {}
            owner = {n: first.setdefault((id(xs[n]), id(xr.get(n))), n) for n in names}
        for n in dict.fromkeys(owner.values()):
            x = xs[n].reshape(-1, xs[n].shape[-1]).float()
            terms = {"gram": x.T @ x}
            if reference:
                r = xr[n].reshape(-1, xr[n].shape[-1]).float()
                terms |= {"cross": r.T @ x, "ref_gram": r.T @ r}
            sums[n] = {k: sums[n][k] + v for k, v in terms.items()} if n in sums else terms
    for n, s in sums.items():
        if not torch.isfinite(s["gram"]).all():
            raise FloatingPointError(f"the calibration activations entering {n} contain NaN or Inf "
                                     "(overflow in a half-precision dtype? try dtype=float32)")
    stats = {n: LayerStats(tokens=tokens, **{k: v / tokens for k, v in s.items()}) for n, s in sums.items()}
    return {n: stats[owner[n]] for n in names}


@torch.no_grad()
def input_groups(block: nn.Module, stream: Stream, names: list[str]) -> list[list[str]]:
    """The named linears grouped by the input they share (q/k/v, gate/up), in the order the block's forward
    reaches them (found on the first batch), for stages that re-collect each group's inputs after the
    groups before it have changed."""
    groups: dict[int, list[str]] = {}
    for n, x in _inputs(block, names, *next(stream.batches())).items():  # the inputs live on: no id is reused
        groups.setdefault(id(x), []).append(n)
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
                outputs.append(_to(forward(*args, **kwargs), self.stream.store))
            return _to(outputs[i], self.stream.device)
        return replay

    def restore(self) -> None:
        for module, forward in self.patched.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        self.patched.clear()
        self.outputs.clear()


def _inputs(block: nn.Module, names: list[str], h: torch.Tensor, kw: dict) -> dict[str, torch.Tensor]:
    """The inputs of the named submodules on one batch, in the order the forward reaches them; the forward
    stops once all are seen."""
    modules, seen = dict(block.named_modules()), {}

    def hook(n):
        def store(module, args):
            seen[n] = args[0]
            if len(seen) == len(names):
                raise _Captured
        return store

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        _until_captured(block, h, kw)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _until_captured(block: nn.Module, h: torch.Tensor, kw: dict) -> None:
    try:
        block(h, **kw)
    except _Captured:
        pass


def walk(model: nn.Module, stream: Stream, step: Callable[[int, nn.Module, Stream, dict[str, nn.Linear]], list],
         progress: Callable[[int], None] = lambda i: None, checkpoint: StageCheckpoint | None = None,
         layers: str = ".*", skip: Callable[[int, nn.Module], None] = lambda i, block: None,
         advance: Callable[[Stream, nn.Module], Stream] = Stream.through) -> list[dict]:
    """Visit the blocks in order: move block ``i`` to the device, let ``step`` change its selected
    linears and return their records, then recompute its outputs for the next block (``advance``). Blocks the
    ``checkpoint`` holds are restored instead (``skip`` lets a stage keep side streams in step). Returns every
    record."""
    blocks = decoder_layers(model)
    done = checkpoint.finished() if checkpoint else 0
    records: list[dict] = []
    for i, block in enumerate(blocks):
        block.to(stream.device)
        linears = selected_linears(block, layers)
        if i < done:
            records += checkpoint.restore(i, linears)
            if done < len(blocks):
                skip(i, block)
        else:
            rows = [asdict(r) for r in step(i, block, stream, linears)]
            if checkpoint:
                checkpoint.save(i, linears, rows)
            records += rows
        if i + 1 < len(blocks) and done < len(blocks):
            stream = advance(stream, block)
        block.to("cpu")
        progress(i)
    return records


def selected_linears(block: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    regex = re.compile(pattern)
    return {n: m for n, m in block_linears(block).items() if regex.search(n)}


def model_linears(model: nn.Module, pattern: str = ".*") -> Iterator[tuple[int, str, nn.Linear]]:
    """(block index, name, linear) for every selected linear inside the decoder blocks."""
    for i, block in enumerate(decoder_layers(model)):
        for name, linear in selected_linears(block, pattern).items():
            yield i, name, linear


def mask_fingerprints(model: nn.Module, pattern: str) -> dict[str, str]:
    """SHA-1 of each selected linear's zero pattern, keyed ``block.name``: two models share a sparsity
    pattern exactly when their fingerprints match (a saved and reloaded model, a resumed run)."""
    return {f"{i}.{name}": hashlib.sha1((linear.weight == 0).cpu().numpy().tobytes()).hexdigest()
            for i, name, linear in model_linears(model, pattern)}
