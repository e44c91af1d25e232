"""Every model family we claim: the engine's block-by-block replay (captured inputs, each block fed the
one before it) equals the model's own forward, for tiny random models built offline from transformers
configs. Families with per-layer attention types (sliding-window and global layers, each with its
own mask and rotary embedding) are the ones a replay with block 0's inputs gets wrong."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sds_cli.engine import replay as replay_module
from sds_cli.engine.coverage import check_coverage, coverage
from sds_cli.engine.experts import routed_forward
from sds_cli.engine.replay import ReplayMismatch, check_replay, replay
from sds_cli.engine.stream import capture, reference_outputs
from sds_cli.errors import ConfigError
from sds_cli.models import decoder_layers, fused_experts, is_router
from sds_cli.pruners import build_pruner
from sds_cli.sparsity import Pattern
from sds_cli.stages.oneshot import prune_model

TOLERANCE = 1e-5  # fp32; the replay runs the same kernels on the same inputs, measured 0 or ~1e-7
SMALL = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
SLIDING = {"sliding_window": 8}
FAMILIES = {
    "llama": SMALL,
    "mistral": SMALL | SLIDING,
    "qwen2": SMALL,
    "qwen2-sliding": SMALL | SLIDING | {"use_sliding_window": True, "max_window_layers": 2},
    "phi3": SMALL | SLIDING | {"pad_token_id": 0},
    "gemma2": SMALL | SLIDING | {"head_dim": 8},
    "gemma3_text": SMALL | SLIDING | {"head_dim": 8, "layer_types": [
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]},
    "opt": {"vocab_size": 128, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "max_position_embeddings": 64, "word_embed_proj_dim": 32},
}
GPT = {"vocab_size": 128, "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64, "bos_token_id": 0,
       "eos_token_id": 0}
FAMILIES |= {
    "gpt_neox": {k: v for k, v in SMALL.items() if k != "num_key_value_heads"},  # parallel residual
    "falcon": {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4},
    "qwen3": SMALL | {"head_dim": 8}, "olmo2": SMALL, "granite": SMALL, "cohere": SMALL, "stablelm": SMALL,
    "phi": SMALL, "gemma": SMALL | {"head_dim": 8}, "gptj": GPT | {"rotary_dim": 4},
    "bloom": {"vocab_size": 128, "hidden_size": 32, "n_layer": 4, "n_head": 4},  # ALiBi
}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
MOE_FAMILIES = {  # fused 3-D experts (transformers 5), pruned per expert through models.expert_views
    "mixtral": SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": SMALL | MOE | {"shared_expert_intermediate_size": 32},
    "qwen3_moe": SMALL | MOE | {"head_dim": 8},
    "olmoe": SMALL | {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 8},
    "deepseek_v3": SMALL | {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                            "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
                            "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "n_group": 1, "topk_group": 1},
}
FAMILIES |= {"gpt2": GPT}  # Conv1D: its [in, out] weight pruned transposed
MIXED = ("qwen2-sliding", "gemma2", "gemma3_text")  # blocks of more than one attention type


def tiny(family: str):
    config = AutoConfig.for_model(family.split("-")[0], **(FAMILIES | MOE_FAMILIES)[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def windows(n=2, seqlen=24):
    return torch.randint(1, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_replay_equals_the_models_forward(family):
    model = tiny(family)
    diffs, _ = check_replay(model, windows(1), "cpu", TOLERANCE)
    assert len(diffs) == 4 and max(diffs) <= TOLERANCE


@pytest.mark.parametrize("family", MIXED)
def test_block_zeros_inputs_would_be_caught(family):
    """The engine before per-block capture handed block 0's inputs to every block: the test above would
    have failed for these families."""
    model = tiny(family)
    stream = capture(model, windows(1), 1, "cpu", False)
    stream.kwargs = [stream.kwargs[0]] * len(stream.kwargs)
    assert replay(model, stream, reference_outputs(model, windows(1), "cpu"))[-1] > 1e-3


def test_equal_keyword_tensors_are_stored_once():
    model = tiny("gemma3_text")
    stream = capture(model, windows(4), 2, "cpu", False)
    tensors = {id(t) for block in stream.kwargs for kw in block for v in kw.values()
               for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)}
    # two attention types x (cos, sin) + positions (+ masks where sdpa needs them), however many blocks and batches
    assert len(tensors) <= 8
    assert stream.kwargs[0][0]["position_embeddings"][0] is not stream.kwargs[1][0]["position_embeddings"][0]
    assert stream.kwargs[0][0]["position_embeddings"][0] is stream.kwargs[2][1]["position_embeddings"][0]


def test_a_replay_that_differs_is_refused(monkeypatch):
    reference = replay_module.reference_outputs

    def drifted(model, window, device):
        outputs = reference(model, window, device)
        outputs[2] = outputs[2] * 1.01
        return outputs

    monkeypatch.setattr(replay_module, "reference_outputs", drifted)
    with pytest.raises(ReplayMismatch, match="block 2 .* differs"):
        check_replay(tiny("llama"), windows(1), "cpu", TOLERANCE)


def test_replay_mismatch_stops_a_run_in_one_line(run_main, monkeypatch):
    from conftest import TINY

    def mismatch(*args):
        raise ReplayMismatch("block 1 differs")

    monkeypatch.setattr("sds_cli.pipeline.check_replay", mismatch)
    code, err, results = run_main("model=tiny-llama", "pruner=wanda", "redense=none", *TINY)
    assert code == 2 and "block 1 differs" in err and "Traceback" not in err
    assert results is None or results["status"] == "failed"


@pytest.mark.parametrize("family", [*FAMILIES, *MOE_FAMILIES])
def test_every_block_matrix_is_pruned(family):
    """Coverage 100% (routers excepted): after a one-shot 50% prune, 50% zeros over every weight matrix inside the
    blocks, fused experts and Conv1D included."""
    model = tiny(family)
    assert check_coverage(model, ".*", ".*") == []
    prune_model(model, capture(model, windows(2), 1, "cpu", False), build_pruner("magnitude"), Pattern.parse(0.5), ".*")
    cover = coverage(model, ".*")
    assert cover["pruned_fraction"] == 1.0 and cover["block_params"] > 0
    assert cover["zeros_block"] == pytest.approx(0.5, abs=1e-3) and cover["zeros_pruned"] == cover["zeros_block"]
    assert (cover["router_params"] > 0) == (family in MOE_FAMILIES)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_recording_forward_equals_the_experts_own(family):
    """``routed_forward`` (which hands each expert's inputs to the statistics) computes what the experts module does."""
    model = tiny(family)
    block = decoder_layers(model)[-1]
    (experts,) = fused_experts(block).values()
    router = next(m for n, m in block.named_modules() if is_router(n, m))
    hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    _, weights, index = router(hidden)
    with torch.no_grad():
        own, seen = experts(hidden, index, weights), []
        ours = routed_forward(experts, hidden, index, weights, lambda e, x, a, w: seen.append(len(x)))
    assert torch.allclose(ours, own, atol=1e-6, rtol=1e-5) and sum(seen) == index.numel()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_matrices_left_dense_stop_the_run_unless_excluded(family, monkeypatch):
    """Block matrices the engine cannot prune (here fused experts it is told it cannot slice, as for experts without
    transformers 5's layout flags): the default selection refuses in one line naming them; an explicit selection is
    accepted and the coverage figure shows what stayed dense. Routers are never counted."""
    monkeypatch.setattr("sds_cli.models.fused_experts", lambda block: {})
    model = tiny(family)
    with pytest.raises(ConfigError, match=r"Experts") as err:
        check_coverage(model, ".*", ".*")
    assert "\n" not in str(err.value) and "targets=" in str(err.value)
    left = check_coverage(model, "self_attn", ".*")
    assert "mlp.experts.gate_up_proj" in left and not any("gate.weight" in n or "router" in n for n in left)
    prune_model(model, capture(model, windows(2), 1, "cpu", False), build_pruner("magnitude"), Pattern.parse(0.5),
                "self_attn")
    cover = coverage(model, "self_attn")
    assert cover["router_params"] > 0 and cover["zeros_pruned"] == pytest.approx(0.5, abs=1e-3)
    assert cover["pruned_fraction"] < 0.5 and cover["zeros_block"] == pytest.approx(0.5 * cover["pruned_fraction"], abs=1e-3)


def test_a_selection_of_nothing_stops_in_one_line(run_main):
    from conftest import TINY

    code, err, results = run_main("model=tiny-llama", "pruner=wanda", "redense=none", "targets=nothing_matches", *TINY)
    assert code == 2 and "selects no linear" in err and "Traceback" not in err
    assert results is None or results["status"] == "failed"
