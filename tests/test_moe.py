"""Fused mixture-of-experts: each expert is pruned through the engine as the linear it would be unfused, on the
tokens routed to it, by every pruner and by SDS."""
import copy

import pytest
import torch
from conftest import TINY
from test_families import tiny, windows

from sds_cli.engine import experts as experts_module
from sds_cli.engine.stats import LayerStats
from sds_cli.engine.stream import capture
from sds_cli.models import block_linears, decoder_layers
from sds_cli.pruners import build_pruner
from sds_cli.sparsity import Pattern
from sds_cli.stages.oneshot import prune_model
from sds_cli.stages.redense.stage import RedenseConfig, sds_model, snapshot

HALF = Pattern.parse(0.5)
TOLERANCE = 1e-5  # absolute, on weights of about 0.02: the engine sums the gram per batch, this test at once


@torch.no_grad()
def routed_by_hand(model) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Block 0's experts module and, per expert, its routed hidden states x, activations a = silu(G x) * (U x) and
    routing weights w, from the module's own inputs in the model's forward (Mixtral's layout: gate rows first)."""
    experts = decoder_layers(model)[0].mlp.experts
    calls = []
    handle = experts.register_forward_pre_hook(lambda module, args: calls.append(args))
    for window in windows(2):
        model(window[None], use_cache=False)
    handle.remove()
    hidden, index, weights = (torch.cat(parts) for parts in zip(*calls))
    half = experts.gate_up_proj.shape[1] // 2
    out = []
    for e in range(len(experts.gate_up_proj)):
        token, slot = torch.where(index == e)
        x = hidden[token]
        gate, up = x @ experts.gate_up_proj[e, :half].T, x @ experts.gate_up_proj[e, half:].T
        out.append((x, torch.nn.functional.silu(gate) * up, weights[token, slot]))
    return experts, out


def test_an_expert_pruned_by_the_engine_equals_it_pruned_alone():
    """SparseGPT through the engine on block 0's experts equals SparseGPT on each expert's matrices as standalone
    linears with the statistics of the tokens routed to it (the down matrix's inputs weighted by the routing
    weights where ``ROUTER_WEIGHTED_DOWN``): the same mask, weights within ``TOLERANCE``."""
    model = tiny("mixtral")
    dense, routed = routed_by_hand(model)
    dense = copy.deepcopy(dense)
    half = dense.gate_up_proj.shape[1] // 2
    sparsegpt = build_pruner("sparsegpt")
    records = prune_model(model, capture(model, windows(2), 1, "cpu", False), sparsegpt, HALF, ".*")
    views = block_linears(decoder_layers(model)[0])
    for e, (x, a, w) in enumerate(routed):
        down_input = a * w[:, None] if experts_module.ROUTER_WEIGHTED_DOWN else a
        for role, weight, inputs in (("gate_proj", dense.gate_up_proj[e, :half], x),
                                     ("up_proj", dense.gate_up_proj[e, half:], x),
                                     ("down_proj", dense.down_proj[e], down_input)):
            alone, mask = sparsegpt(weight.detach().clone(), LayerStats(inputs.T @ inputs / len(x), len(x)), HALF)
            engine = views[f"mlp.experts.{e}.{role}"].weight
            assert torch.equal(engine == 0, mask) and (engine - alone).abs().max() <= TOLERANCE, (e, role)
            assert next(r["tokens"] for r in records if r["block"] == 0 and r["layer"] == f"mlp.experts.{e}.{role}") == len(x)


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_every_pruner_and_sds_prune_every_expert(pruner):
    """Every pruner leaves each expert's gate, up and down matrices at exactly 50%, and SDS keeps them there."""
    model = tiny("mixtral")
    dense = snapshot(model, ".*")
    stream = capture(model, windows(2), 1, "cpu", False)
    prune_model(model, stream, build_pruner(pruner), HALF, ".*", sequential=True)
    records = sds_model(model, stream, dense, build_pruner(pruner), HALF, ".*", RedenseConfig.preset("sds", iters=5,
                                                                                                  adjust_iters=4))
    experts = [r for r in records if ".experts." in r["layer"]]
    assert len(experts) == 4 * 4 * 3 and all(r["sparsity"] == 0.5 for r in experts)
    for block in decoder_layers(model):
        for name, linear in block_linears(block).items():
            assert (linear.weight == 0).float().mean().item() == 0.5, name


def test_an_expert_no_token_reaches_is_pruned_by_magnitude():
    """An expert the router never picks has no statistics: magnitude prunes it (its records say 0 tokens) and SDS
    keeps its one-shot weights."""
    model = tiny("mixtral")

    def never_three(router, args, out):
        logits, weights, index = out
        spare = torch.tensor([next(e for e in range(3) if e not in row) for row in index.tolist()])
        return logits, weights, torch.where(index == 3, spare[:, None], index)

    for block in decoder_layers(model):
        block.mlp.gate.register_forward_hook(never_three)
    magnitude = {n: build_pruner("magnitude")(lin.weight.clone(), None, HALF)[0]
                 for n, lin in block_linears(decoder_layers(model)[1]).items() if ".3." in n}
    dense = snapshot(model, ".*")
    stream = capture(model, windows(2), 1, "cpu", False)
    records = prune_model(model, stream, build_pruner("sparsegpt"), HALF, ".*")
    unseen = [r for r in records if ".experts.3." in r["layer"]]
    assert len(unseen) == 4 * 3 and all(r["tokens"] == 0 for r in unseen)
    assert all(r["tokens"] > 0 for r in records if ".experts.3." not in r["layer"])
    views = block_linears(decoder_layers(model)[1])
    assert all(torch.equal(views[n].weight, w) for n, w in magnitude.items())
    sds = sds_model(model, stream, dense, build_pruner("sparsegpt"), HALF, ".*", RedenseConfig.preset("sds", iters=5))
    assert all(r["kept"] == "oneshot" for r in sds if ".experts.3." in r["layer"])
    assert all(torch.equal(views[n].weight, w) for n, w in magnitude.items())


def test_the_cli_prunes_every_expert_of_the_tiny_mixtral_preset(run_main):
    """`sds-run model=tiny-mixtral`: every expert matrix pruned by stage 1 and SDS, with its routed tokens recorded."""
    code, err, results = run_main("model=tiny-mixtral", "pruner=sparsegpt", "sparsity=0.5", "redense.iters=5",
                                  "redense.adjust_iters=5", *TINY)
    assert code == 0, err
    for stage in ("oneshot", "sds"):
        cover = results["coverage"][stage]
        assert cover["pruned_fraction"] == 1.0 and cover["zeros_pruned"] == cover["zeros_block"] == 0.5
    tokens = results["config"]["calib"]["nsamples"] * results["config"]["calib"]["seqlen"]
    for block in (0, 1):  # each token reaches top-k = 2 experts: the experts' token counts add up to twice the tokens
        gates = [r for r in results["layers"]["oneshot"] if r["block"] == block and r["layer"].endswith("gate_proj")]
        assert len(gates) == 4 and sum(r["tokens"] for r in gates) == 2 * tokens
