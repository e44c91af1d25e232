"""What a selection of linears covers: every weight matrix inside the decoder blocks is either pruned, a router
(never pruned, by design), or left dense; a run reports the fractions and refuses to leave matrices dense
unasked."""
from __future__ import annotations

import torch
from torch import nn

from sds_cli.engine.walk import selected_linears
from sds_cli.errors import ConfigError
from sds_cli.models import decoder_layers, is_router, stored


def block_matrices(block: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every weight matrix (2-D or more: linears, Conv1D, fused 3-D expert weights) inside a block, keyed by
    parameter name, with whether it belongs to a router."""
    modules = dict(block.named_modules())
    out = {}
    for name, param in block.named_parameters():
        if param.dim() >= 2 and not name.endswith("bias"):  # fused experts keep [experts, out] biases
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            out[name] = (param, is_router(owner, modules[owner]))
    return out


def _split(block: nn.Module, targets: str) -> tuple[dict, dict, dict, dict]:
    """A block's matrices as (pruned, routers, left dense), each by name, and the selected linears: a fused experts
    parameter counts as pruned when the selection holds all its experts' matrices."""
    linears = selected_linears(block, targets)
    covered: dict[int, int] = {}
    for linear in linears.values():
        param = getattr(*stored(linear))
        covered[id(param)] = covered.get(id(param), 0) + linear.weight.numel()
    pruned, routers, dense = {}, {}, {}
    for name, (param, router) in block_matrices(block).items():
        (routers if router else pruned if covered.get(id(param)) == param.numel() else dense)[name] = param
    return pruned, routers, dense, linears


def check_coverage(model: nn.Module, targets: str, default: str) -> list[str]:
    """The block matrices the selection leaves dense, wholly or in part (routers excepted). With the ``default``
    selection a run that would leave any stops: the user must exclude them knowingly, with ``targets=``."""
    left: dict[str, str] = {}
    selected = 0
    for block in decoder_layers(model):
        _, _, dense, linears = _split(block, targets)
        selected += len(linears)
        modules = dict(block.named_modules())
        for name in dense:
            left.setdefault(name, type(modules[name.rsplit(".", 1)[0]]).__name__)
    if not selected:
        raise ConfigError(f"targets={targets!r} selects no linear inside {type(model).__name__}'s decoder blocks; "
                          f"its block weight matrices are: {', '.join(f'{n} ({t})' for n, t in left.items())}")
    if left and targets == default:
        what = ", ".join(f"{n} ({t})" for n, t in left.items())
        raise ConfigError(f"{type(model).__name__}: these block weight matrices are not linears the engine knows how to "
                          f"prune, so they would stay dense: {what}; to accept that, select the rest explicitly with "
                          "targets=REGEX (a regex over linear names inside a block, e.g. targets=self_attn)")
    return sorted(left)


def coverage(model: nn.Module, targets: str) -> dict:
    """Fractions of zeros over every block weight matrix (routers excepted) and over the selected linears, with the
    parameter counts behind both."""
    counts = {"pruned": [0, 0], "block": [0, 0], "router": [0, 0]}
    for block in decoder_layers(model):
        pruned, routers, dense, linears = _split(block, targets)
        for kind, weights in (("pruned", [lin.weight for lin in linears.values()]),
                              ("block", [*pruned.values(), *dense.values()]), ("router", routers.values())):
            for w in weights:
                counts[kind][0] += w.numel()
                counts[kind][1] += int((w == 0).sum())
    return {"block_params": counts["block"][0], "pruned_params": counts["pruned"][0],
            "router_params": counts["router"][0],
            "pruned_fraction": counts["pruned"][0] / max(counts["block"][0], 1),
            "zeros_block": counts["block"][1] / max(counts["block"][0], 1),
            "zeros_pruned": counts["pruned"][1] / max(counts["pruned"][0], 1)}
