"""The replay guard: the engine's block-by-block replay must reproduce the model's own forward."""
from __future__ import annotations

import torch
from torch import nn

from sds_cli.engine.stream import Stream, capture, hidden_states, output_forms, reference_outputs
from sds_cli.errors import ConfigError
from sds_cli.models import decoder_layers


class ReplayMismatch(ConfigError):
    """The engine's block-by-block replay does not reproduce the model's own forward."""

@torch.no_grad()
def replay(model: nn.Module, stream: Stream, reference: list) -> list[float]:
    """Run ``stream`` through every block as the stages do (each block fed the one before it) and return,
    per block, the relative difference of its output to ``reference`` (the model's own, ``reference_outputs``)."""
    diffs = []
    for i, block in enumerate(decoder_layers(model)):
        block.to(stream.device)
        stream = stream.through(block)
        block.to("cpu")
        want = hidden_states(reference[i]).to(stream.hidden[0])
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
    reference = reference_outputs(model, window, device)
    forms = output_forms(reference)
    diffs = replay(model, capture(model, window, 1, device, offload=True, forms=forms), reference)
    for i, (diff, block) in enumerate(zip(diffs, decoder_layers(model))):
        if not diff <= tolerance:
            raise ReplayMismatch(
                f"block {i} ({type(block).__name__}) replayed on its captured inputs differs from "
                f"{type(model).__name__}'s own forward by {diff:.2e} (relative, tolerance {tolerance:g}); "
                "the engine cannot prune this model family faithfully")
    return diffs, forms
