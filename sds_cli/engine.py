"""The block-by-block engine shared by every stage and every model family.

The inputs of the first decoder block are captured once; each stage then walks the blocks in order,
gathering per-linear input statistics, changing the block's weights, and recomputing its outputs so
that the next block sees the activations of the model as modified so far. Only the current block
and (unless offloaded) the activations live on the accelerator."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .models import block_linears, decoder_layers
from .pruners.base import LayerStats

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


@dataclass
class Stream:
    """Hidden states entering a block, one tensor per calibration batch, and the keyword inputs
    (attention mask, positions, rotary embeddings) the blocks need for that batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    device: torch.device
    store: torch.device

    def batches(self):
        for h, kw in zip(self.hidden, self.kwargs):
            yield h.to(self.device), _to(kw, self.device)

    @torch.no_grad()
    def through(self, block: nn.Module) -> Stream:
        out = []
        for h, kw in self.batches():
            y = block(h, **kw)
            out.append((y[0] if isinstance(y, tuple) else y).to(self.store))
        return Stream(out, self.kwargs, self.device, self.store)


def _move_non_block_params(model: nn.Module, layers: nn.ModuleList, device) -> None:
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is not None and id(tensor) not in inside:
                    tensor.data = tensor.data.to(device)


@torch.no_grad()
def capture(model: nn.Module, windows: torch.Tensor, batch_size: int, device, offload: bool) -> Stream:
    """Run the embeddings on the calibration windows and keep what enters the first block."""
    layers = decoder_layers(model)
    store = torch.device("cpu") if offload else torch.device(device)
    _move_non_block_params(model, layers, device)
    hidden, kwargs = [], []

    def grab(module, args, kw):
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.to(store))
        kwargs.append(_to({k: v for k, v in kw.items() if k not in ("past_key_value", "past_key_values")}, store))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        _move_non_block_params(model, layers, "cpu")
    return Stream(hidden, kwargs, torch.device(device), store)


@torch.no_grad()
def collect(block: nn.Module, stream: Stream, names: list[str],
            reference: tuple[nn.Module, Stream] | None = None) -> dict[str, LayerStats]:
    """Per-linear input statistics over the stream: the mean of x x^T; with a ``reference`` (the dense
    block and its own stream) also the cross term x_ref x^T and the reference's own x_ref x_ref^T.
    Linears fed the same tensor (q/k/v) share one computation."""
    modules = dict(block.named_modules())
    ref_modules = dict(reference[0].named_modules()) if reference else {}
    sums: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    tokens = 0

    def capture_into(table, mods):
        return [mods[n].register_forward_pre_hook(lambda m, a, n=n: table.__setitem__(n, a[0])) for n in names]

    ref_batches = reference[1].batches() if reference else None
    for h, kw in stream.batches():
        xs, xr = {}, {}
        handles = capture_into(xs, modules)
        if reference:
            handles += capture_into(xr, ref_modules)
            rh, rkw = next(ref_batches)
            reference[0](rh, **rkw)
        block(h, **kw)
        for hd in handles:
            hd.remove()
        tokens += h.shape[0] * h.shape[1]
        done: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for n in names:
            key = (id(xs[n]), id(xr.get(n)))
            if key not in done:
                x = xs[n].reshape(-1, xs[n].shape[-1]).float()
                terms = {"gram": x.T @ x}
                if reference:
                    r = xr[n].reshape(-1, xr[n].shape[-1]).float()
                    terms |= {"cross": r.T @ x, "ref_gram": r.T @ r}
                done[key] = terms
            for k, v in done[key].items():
                sums[n][k] = sums[n][k] + v if k in sums[n] else v.clone()
    for n, s in sums.items():
        if not torch.isfinite(s["gram"]).all():
            raise FloatingPointError(f"the calibration activations entering {n} contain NaN or Inf "
                                     "(overflow in a half-precision dtype? try dtype=float32)")
    return {n: LayerStats(tokens=tokens, **{k: v / tokens for k, v in s.items()}) for n, s in sums.items()}


def walk(model: nn.Module, stream: Stream, step: Callable[[int, nn.Module, Stream, dict[str, nn.Linear]], list],
         progress: Callable[[int], None] = lambda i: None, checkpoint: StageCheckpoint | None = None,
         layers: str = ".*", skip: Callable[[int, nn.Module], None] = lambda i, block: None) -> list[dict]:
    """Visit the blocks in order: move block ``i`` to the device, let ``step`` change its selected
    linears and return their records, then recompute its outputs for the next block. Blocks the ``checkpoint`` holds
    are restored instead (``skip`` lets a stage keep side streams in step). Returns every record."""
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
            stream = stream.through(block)
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
