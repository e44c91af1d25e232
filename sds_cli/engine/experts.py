"""The inputs of each expert inside a fused experts module (``models.expert_views``): the hidden states routed to it
(its gate and up matrices) and its intermediate activations (its down matrix), recorded by a forward that computes
what the module's own eager forward does, so that collecting them costs one pass of the experts."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sds_cli.models import fused_experts

# The down matrix's statistics weigh each token by its routing weight w (its input taken as w a): the expert adds
# w W_down a to the block's output, so this gram measures the error a pruned W_down adds to the block's output.
# Gate and up read the plain routed hidden states. On a random Mixtral the two forms measured a wash
# (docs/families.md); this one is kept as the block-output objective.
ROUTER_WEIGHTED_DOWN = True


def _linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool, bias: torch.Tensor | None) -> torch.Tensor:
    y = x @ weight if transposed else nn.functional.linear(x, weight)
    return y if bias is None else y + bias


def routed_forward(experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                   record: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """The experts' output as their eager forward computes it (experts in order, each on the tokens routed to it),
    calling ``record(e, x, a, w)`` with expert e's routed hidden states x, intermediate activations a and routing
    weights w; an expert no token reaches is recorded with empty tensors."""
    out = torch.zeros_like(hidden)
    t, bias = experts.is_transposed, experts.has_bias
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    for e in range(experts.down_proj.shape[0]):
        token, slot = torch.where(index == e)
        x, w = hidden[token], weights[token, slot]
        a = _linear(x, getattr(experts, up)[e], t, getattr(experts, f"{up}_bias")[e] if bias else None)
        a = experts._apply_gate(a) if experts.has_gate else experts.act_fn(a)
        record(e, x, a, w)
        y = _linear(a, experts.down_proj[e], t, experts.down_proj_bias[e] if bias else None)
        if experts.has_post_expert_norm:
            y = experts.post_expert_norm(y)
        out.index_add_(0, token, (y * w[:, None]).to(out.dtype))
    return out


def routed_names(block: nn.Module, names: list[str]) -> dict[str, tuple[str, str]]:
    """Those of ``names`` that are fused experts' matrices, as (experts path, ``{e}.{role}``)."""
    paths = fused_experts(block)
    return {n: (p, n[len(p) + 1:]) for n in names for p in paths if n.startswith(p + ".")}


def input_kind(role: str) -> str:
    """Matrices of one kind share a statistics pass: every expert's gate and up read the routed hidden states, every
    down its own intermediate activations, fixed once the gate and up matrices are."""
    return "down" if role.endswith("down_proj") else "in"


@contextmanager
def routed_inputs(block: nn.Module, names: list[str], found: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While inside, every fused experts module holding some of ``names`` runs ``routed_forward`` and hands
    ``found(name, x)`` each named matrix's input."""
    wanted: dict[str, dict[str, str]] = {}
    for name, (path, role) in routed_names(block, names).items():
        wanted.setdefault(path, {})[role] = name
    modules = fused_experts(block)
    patched = {}
    for path, roles in wanted.items():
        experts = modules[path]

        def record(e, x, a, w, roles=roles):
            for role, value in (("gate_proj", x), ("up_proj", x),
                                ("down_proj", a * w[:, None].to(a.dtype) if ROUTER_WEIGHTED_DOWN else a)):
                if f"{e}.{role}" in roles:
                    found(roles[f"{e}.{role}"], value)

        def forward(hidden, index, weights, experts=experts, record=record):
            return routed_forward(experts, hidden, index, weights, record)

        patched[experts] = vars(experts).get("forward")
        experts.forward = forward
    try:
        yield
    finally:
        for experts, previous in patched.items():
            if previous is None:
                del experts.forward
            else:
                experts.forward = previous
