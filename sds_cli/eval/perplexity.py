"""Perplexity by the protocol of the pruning literature: the text tokenized once, cut into
non-overlapping ``seqlen`` windows (the tail dropped), exp of the mean next-token loss, in fp32."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sds_cli.errors import ConfigError


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    count = ids.numel() // seqlen
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise ConfigError(f"evaluation text has {ids.numel()} tokens, fewer than one seqlen={seqlen} window")
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, batches: torch.Tensor, device, batch_size: int = 1,
               progress: Callable[[int], None] = lambda n: None) -> tuple[float, int]:
    """Returns (perplexity, number of predicted tokens)."""
    nll, count = 0.0, 0
    for batch in batches.split(batch_size):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError("the model's loss is not finite (NaN/Inf weights or activations)")
        nll += loss.item()
        count += batch[:, 1:].numel()
        progress(len(batch))
    return math.exp(nll / count), count
