"""The block-by-block engine shared by every stage and every model family.

The inputs of the first decoder block are captured once; each stage then walks the blocks in order,
gathering per-linear input statistics, changing the block's weights, and recomputing its outputs so
that the next block sees the activations of the model as modified so far. Only the current block
and (unless offloaded) the activations live on the accelerator."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sds_cli.engine.experts import routed_inputs
from sds_cli.models import decoder_layers


def move_to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


class _Captured(Exception):
    pass


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
            yield h.to(self.device), move_to(kw, self.device)

    @torch.no_grad()
    def through(self, block: nn.Module) -> Stream:
        """The outputs of ``block`` (block ``index``): the stream entering the next block."""
        out = [hidden_states(block(h, **kw)).to(self.store) for h, kw in self.batches()]
        return Stream(out, self.kwargs, self.device, self.store, self.index + 1)


def hidden_states(output):
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
def _stubbed(model: nn.Module, device, record: Callable[[int, torch.Tensor, dict], None], forms: list[int]):
    """The model with every decoder block replaced by a stub that hands ``record`` what the model's
    forward gives it, and passes the hidden states on unchanged in the block's own output form
    (``forms``: 0 a tensor, k a k-tuple); the last one stops the forward. Embeddings, masks and rotary
    embeddings still run, so the cost is that of the embeddings alone."""
    layers = decoder_layers(model)

    def stub(i):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            record(i, h, kw)
            if i == len(layers) - 1:
                raise _Captured
            return (h, *[None] * (forms[i] - 1)) if forms[i] else h
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


@contextmanager
def outside_blocks(model: nn.Module, device):
    """Everything of the model but its decoder blocks (embeddings, final norm, head) on ``device`` meanwhile."""
    layers = decoder_layers(model)
    _move_non_block_params(model, layers, device)
    try:
        yield
    finally:
        _move_non_block_params(model, layers, "cpu")


@torch.no_grad()
def reference_outputs(model: nn.Module, window: torch.Tensor, device) -> list:
    """Each block's output (on the CPU) in the model's own forward on ``window``, one block on the
    device at a time."""
    layers, outputs = decoder_layers(model), []

    def arrive(block, args):
        block.to(device)

    def leave(block, args, out):
        outputs.append(move_to(out, "cpu"))
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
            forms: list[int] | None = None) -> Stream:
    """Run the embeddings on the calibration windows and keep what enters the first block, and for
    every block the keyword inputs the model's forward gives it. ``windows`` is split into batches of
    ``batch_size``, or is a list of batches already (of any lengths: each keeps its own keyword inputs).
    ``forms`` (each block's output form, from ``check_replay``) saves a forward of one window through the
    whole model."""
    layers = decoder_layers(model)
    store = torch.device("cpu") if offload else torch.device(device)
    batches = windows.split(batch_size) if isinstance(windows, torch.Tensor) else windows
    forms = forms or output_forms(reference_outputs(model, batches[0][:1], device))
    intern = _Interner(store)
    hidden, kwargs = [], [[] for _ in layers]

    def record(i, h, kw):
        if i == 0:
            hidden.append(h.to(store))
        kwargs[i].append(intern(kw))

    with _stubbed(model, device, record, forms):
        for batch in batches:
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    return Stream(hidden, kwargs, torch.device(device), store)


def output_forms(outputs: list) -> list[int]:
    return [len(out) if isinstance(out, tuple) else 0 for out in outputs]


def block_inputs(block: nn.Module, names: list[str], h: torch.Tensor, kw: dict) -> dict[str, torch.Tensor]:
    """The inputs of the named linears on one batch, in the order the forward reaches them: a module's input, or
    for a fused expert's matrix the tokens routed to it (``engine.experts``); the forward stops once all are seen."""
    modules, seen = dict(block.named_modules()), {}

    def found(n, x):
        seen[n] = x
        if len(seen) == len(names):
            raise _Captured

    handles = [modules[n].register_forward_pre_hook(lambda module, args, n=n: found(n, args[0]))
               for n in names if n in modules]
    try:
        with routed_inputs(block, [n for n in names if n not in modules], found):
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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
