"""Should a fused expert's down-matrix statistics weigh each token by its routing weight? Prunes a random Mixtral
(8 experts, top 2, hidden 128, intermediate 256) with SparseGPT at 50% on 32 x 64 random tokens (about 512
per expert) both ways and prints, as JSON, the relative error of every MoE block's
output (each block fed the dense model's inputs) and of the logits on held-out tokens.

    python scripts/moe_router_weights.py"""
from __future__ import annotations

import copy
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sds_cli.engine import experts as experts_module
from sds_cli.engine.stream import capture
from sds_cli.models import decoder_layers
from sds_cli.pruners import build_pruner
from sds_cli.sparsity import Pattern
from sds_cli.stages.oneshot import prune_model

ARCH = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2}


def tokens(seed: int, windows: int) -> torch.Tensor:
    return torch.randint(0, ARCH["vocab_size"], (windows, 64), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def moe_outputs(model, ids) -> list[torch.Tensor]:
    """Each block's MoE output and the logits."""
    outs = []
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: outs.append(o)) for b in decoder_layers(model)]
    logits = model(ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    return [*outs, logits]


def relative(a, b) -> float:
    return ((a - b).pow(2).sum() / b.pow(2).sum()).item()


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **ARCH)).eval()
    held = tokens(1, 8)
    reference = moe_outputs(dense, held)
    mlp_inputs = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: mlp_inputs.append(a[0])) for b in decoder_layers(dense)]
    dense(held, use_cache=False)
    for h in hooks:
        h.remove()
    result = {}
    for weighted in (False, True):
        experts_module.ROUTER_WEIGHTED_DOWN = weighted
        model = copy.deepcopy(dense)
        prune_model(model, capture(model, tokens(0, 32), 4, "cpu", False), build_pruner("sparsegpt"), Pattern.parse(0.5),
                    r"experts")
        blocks = [relative(b.mlp(x), ref) for b, x, ref in zip(decoder_layers(model), mlp_inputs, reference)]
        result["weighted" if weighted else "unweighted"] = {
            "moe_block_error": blocks, "logits_error": relative(moe_outputs(model, held)[-1], reference[-1])}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
