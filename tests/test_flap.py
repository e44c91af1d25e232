"""FLAP: the exact parameter budget, bias compensation on calibration inputs, and the smaller model with its
biases saved and reloaded (sds-cli's loader and from_pretrained with the modeling file alike)."""
from contextlib import contextmanager

import pytest
import torch
from conftest import TINY
from transformers import AutoConfig, AutoModelForCausalLM

from sds_cli.engine.stream import block_inputs, capture
from sds_cli.engine.walk import walk
from sds_cli.errors import ConfigError
from sds_cli.stages import flap
from sds_cli.stages.tyr.structure import Kept, block_params, geometry, load_pruned, shrink

GQA = {"vocab_size": 128, "hidden_size": 96, "intermediate_size": 96, "num_hidden_layers": 3,
       "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny(**arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **(GQA | arch))).eval()


@contextmanager
def bar(description, total):
    yield lambda n=1: None


CALIB = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", [{}, {"num_key_value_heads": 6}])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_flap_removes_the_target_fraction_of_block_weights_within_one_structure(arch, target):
    model = tiny(**arch)
    geo, weights = geometry(model), lambda m: sum(p.numel() for n, p in m.model.layers.named_parameters()
                                                  if n.endswith("weight") and "norm" not in n)
    dense = weights(model)
    out = flap.prune(model, CALIB, target, flap.FlapConfig.preset(), "cpu", 2, False, None, bar)["extra"]
    removed = dense - weights(model)
    assert abs(removed - target * dense) <= 2 * geo.hidden * geo.head_dim * 2  # a query head and its key/value head
    assert out["block_params"]["weights_removed_fraction"] == pytest.approx(removed / dense)
    assert block_params(model) == out["block_params"]["pruned"]
    heads = [k["heads_kept"] for k in out["distribution"]]
    assert sum(heads) < 3 * 6 and len(set(heads + [k["channels_kept"] for k in out["distribution"]])) > 1  # adaptive


def test_select_counts_key_value_heads_once_no_query_head_reads_them():
    geo = geometry(tiny())
    score = {(0, "attention"): torch.tensor([0.0, 1, 2, -9, -8, -7]), (0, "ffn"): torch.full((96,), 5.0)}
    kept = flap.select(score, geo, 1, (3 * 2 * 96 * 16 + 2 * 96 * 16) / sum(geo.params.values()))
    assert kept[0].heads == [0, 1, 2] and len(kept[0].channels) == 96  # heads 3-5 and their key/value head


@torch.no_grad()
def test_bias_compensation_lowers_the_output_error_on_calibration_inputs():
    """down_proj and o_proj of block 0 of a tiny model: W X against the kept columns' output, with and without
    the bias, on the calibration inputs the moments came from."""
    model = tiny()
    geo, moments = geometry(model), {}
    stream = capture(model, CALIB, 2, "cpu", False)
    walk(model, capture(model, CALIB, 2, "cpu", False), flap.FluctuationStage(moments))
    block = model.model.layers[0]
    inputs = [block_inputs(block, list(flap.OUTPUTS.values()), h, kw) for h, kw in stream.batches()]
    for kind in flap.KINDS:
        name, linear = flap.OUTPUTS[kind], block.get_submodule(flap.OUTPUTS[kind])
        x = torch.cat([i[name].reshape(-1, linear.in_features) for i in inputs])
        assert torch.allclose(moments[(0, kind)].mean.float(), x.mean(0), atol=1e-5)
        assert torch.allclose(moments[(0, kind)].var.float(), x.var(0), rtol=1e-4, atol=1e-7)
        size = geo.group[kind]
        kept = torch.arange(0, linear.in_features // size, 2)
        cols = (kept[:, None] * size + torch.arange(size)).flatten()
        bias = flap.compensation(linear.weight, moments[(0, kind)], cols)
        want, part = x @ linear.weight.T, x[:, cols] @ linear.weight[:, cols].T
        without, with_bias = (want - part).pow(2).sum(), (want - part - bias).pow(2).sum()
        assert with_bias < without  # the removed columns' mean comes back: lower by tokens x ||bias||^2
        assert (without - with_bias).item() == pytest.approx(len(x) * bias.pow(2).sum().item(), rel=1e-3)
        assert torch.allclose(bias, (x @ linear.weight.T - part).mean(0), atol=1e-5)  # the optimal constant


def assert_reloads_exactly(model, path, ids):
    """Saved to ``path``, the model loads back with both loaders and gives the very same logits."""
    model.save_pretrained(path)
    with torch.no_grad():
        got = model(ids).logits
        assert torch.equal(load_pruned(path)(ids).logits, got)
        hub = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
        assert torch.equal(hub(ids).logits, got)


def test_flap_model_with_biases_saves_and_reloads_with_identical_logits(tmp_path):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    model = tiny()
    flap.prune(model, CALIB, 0.5, flap.FlapConfig.preset(), "cpu", 2, False, None, bar)
    assert all(b.mlp.down_proj.bias is not None and b.mlp.down_proj.bias.abs().sum() > 0 for b in model.model.layers)
    assert_reloads_exactly(model, tmp_path / "flap", ids)
    # a block with no head left keeps o_proj's bias (the attention's whole mean output) in its NoAttention
    headless = tiny()
    shrink(headless, [Kept([], list(range(40)), True), Kept([0, 1, 5], list(range(0, 96, 3)), True),
                      Kept([0, 2], [3, 7, 50], True)])
    for block in headless.model.layers:
        for module in (getattr(block.self_attn, "o_proj", block.self_attn), block.mlp.down_proj):
            module.bias.data = torch.randn(96)
    assert_reloads_exactly(headless, tmp_path / "headless", ids)


def test_flap_end_to_end_and_bad_input(run_main, tmp_path):
    code, err, results = run_main(*TINY, "model=tiny-llama", "pruner=flap", "sparsity=0.4", "save.final=true")
    assert code == 0, err
    assert results["config"]["redense"]["name"] == "none"  # implied
    assert results["flap"]["block_params"]["weights_removed_fraction"] == pytest.approx(0.4, abs=0.03)
    saved = load_pruned(results["saved"]["model"])
    assert block_params(saved) == results["flap"]["block_params"]["pruned"]
    code, err, _ = run_main(*TINY, "model=tiny-llama", "pruner=flap", "sparsity=2:4", out=tmp_path / "bad")
    assert code == 2 and "not 2:4" in err
    with pytest.raises(ConfigError, match="choose one of: sum, mean"):
        flap.FlapConfig.preset(head_score="max")
