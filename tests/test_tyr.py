"""Týr-the-Pruner: the local structured pruner, the budget, the search's mutations, the physically
smaller model and its reload, and the CLI end to end on a tiny random Llama."""
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import TINY
from transformers import AutoConfig, AutoModelForCausalLM

from sds_cli.errors import ConfigError
from sds_cli.stages.tyr import search
from sds_cli.stages.tyr.local import _invert_in_place, _score, obs_levels, wanda_levels
from sds_cli.stages.tyr.search import KINDS, TyrConfig, _mutate, mix, paper_budget, params_budget, plan, uniform
from sds_cli.stages.tyr.structure import Kept, geometry, load_pruned, shrink

GQA = {"vocab_size": 128, "hidden_size": 96, "intermediate_size": 96, "num_hidden_layers": 3,
       "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny(**arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **(GQA | arch))).eval()


def problem(out=24, inp=48, tokens=400):
    """A layer with correlated inputs, as real activations are."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g) * 0.3 + torch.randn(tokens, inp, generator=g)
    return torch.randn(out, inp, generator=g), x.T @ x / tokens


def error(w0, w, h):
    d = (w - w0).double()
    return ((d @ h.double()) * d).sum().item()


@pytest.mark.parametrize("size", [1, 8])
def test_obs_levels_compensate_and_refit_exactly(size):
    w, h = problem()
    removals = [0, 1, 2, 3] if size == 8 else [0, 8, 16, 24, 40]
    levels, order = obs_levels(w, h, size, removals, rounds=4, percdamp=0.0)
    plain, _ = wanda_levels(w, h, size, removals)
    assert torch.allclose(levels[0], w, atol=1e-5)  # nothing removed: the dense weights back
    for r in removals[1:]:
        gone = (levels[r].abs().reshape(len(w), -1, size).sum((0, 2)) == 0).nonzero().flatten()
        assert sorted(gone.tolist()) == sorted(order[:r].tolist())  # each level removes a prefix of one order
        assert error(w, levels[r], h) < error(w, plain[r], h)  # compensation beats scores alone
        kept = torch.ones(w.shape[1], dtype=torch.bool)
        kept[(gone[:, None] * size + torch.arange(size)).flatten()] = False
        gradient = ((levels[r] - w).double() @ h.double())[:, kept]
        assert gradient.abs().max() < 1e-4  # the least-squares optimum on the kept columns
    assert sorted(order.tolist()) == list(range(w.shape[1] // size))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_inverse_needs_no_second_square_matrix(dtype):
    """The inverse overwrites the gram in place, with the values of the factor-then-invert form."""
    _, h = problem(inp=70)
    h = h.to(dtype)
    want = torch.cholesky_inverse(torch.linalg.cholesky(h))
    buffer = h.clone()
    hinv = _invert_in_place(buffer)
    assert hinv.data_ptr() == buffer.data_ptr() and torch.allclose(hinv, want, rtol=1e-4, atol=1e-6)


def test_each_level_is_the_float64_refit_of_its_kept_columns():
    """The OBS updates keep U equal to G_K H_KK^-1 (damped H), so a level is U itself: it matches that refit
    computed from scratch in float64 on the level's kept columns, without a product over the whole inverse."""
    w, h = problem(out=16, inp=40)
    levels, order = obs_levels(w, h, 1, [10, 25], rounds=5, percdamp=0.01)
    hd = h.double() + 0.01 * h.diagonal().double().mean() * torch.eye(40, dtype=torch.float64)
    for r in (10, 25):
        kept = order[r:].sort().values
        want = torch.zeros(16, 40, dtype=torch.float64)
        want[:, kept] = (w.double() @ hd[:, kept]) @ torch.linalg.inv(hd[kept][:, kept])
        torch.testing.assert_close(levels[r], want.float(), rtol=0, atol=2.5e-7)  # float32 rounding of float64
        assert (levels[r][:, order[:r]] == 0).all()


@pytest.mark.parametrize("size", [1, 3])
def test_first_order_adds_current_weights_times_dense_correlations(size):
    """On a small layer with two groups gone, so that the compensated U differs from W0: the score of each
    alive group S is 1/2 tr(U_S [H_alive^-1]_SS^-1 U_S^T) + tr(U_S (W0 H)_S^T), computed here directly."""
    w0, h = (t.double() for t in problem(out=5, inp=12, tokens=60))
    g, n = w0 @ h, 12 // size
    alive = torch.ones(n, dtype=torch.bool)
    alive[[0, 2]] = False
    keep = torch.ones(12, dtype=torch.bool)
    keep[(torch.tensor([0, 2])[:, None] * size + torch.arange(size)).flatten()] = False
    hinv = torch.zeros(12, 12, dtype=torch.float64)
    hinv[keep[:, None] & keep] = torch.linalg.inv(h[keep][:, keep]).flatten()  # H_alive^-1, zero elsewhere
    u = g @ hinv  # the compensated optimum on the alive columns
    assert not torch.allclose(u, w0)
    second, both = _score(u, hinv, None, alive, size), _score(u, hinv, g, alive, size)
    for s in alive.nonzero().flatten().tolist():
        cols = slice(s * size, (s + 1) * size)
        obs = 0.5 * torch.trace(u[:, cols] @ torch.linalg.inv(hinv[cols, cols]) @ u[:, cols].T)
        first = (u[:, cols] * g[:, cols]).sum()
        assert second[s].item() == pytest.approx(obs.item(), rel=1e-10)
        assert both[s].item() == pytest.approx((obs + first).item(), rel=1e-10)
        assert first.abs() > 1e-6  # so the two scores differ
    assert torch.isinf(both[~alive]).all()


def test_first_order_changes_the_removal_path_and_still_refits_exactly():
    w, h = problem()
    _, plain_order = obs_levels(w, h, 1, [24], rounds=6, percdamp=0.0)
    levels, order = obs_levels(w, h, 1, [24], rounds=6, percdamp=0.0, first_order=True)
    assert not torch.equal(order[:24].sort().values, plain_order[:24].sort().values)
    gradient = ((levels[24] - w).double() @ h.double())[:, order[24:]]
    assert gradient.abs().max() < 1e-4  # each level is still the least-squares refit of its kept columns
    assert TyrConfig.preset().first_order is False and TyrConfig.preset("tyr-paper").first_order is True


@pytest.mark.parametrize("rounds, per_round, want", [(4, None, 5), (16, None, 14), (1, None, 2), (4, 16, 3),
                                                      (4, 1, 40), (4, 40, 2)])
def test_elimination_rounds_follow_rounds_or_progressive(monkeypatch, rounds, per_round, want):
    """Levels 16 and 40 of 48 channels: ``rounds`` sets ceil(40 / rounds) channels per round, ``per_round``
    (pruner.progressive) the count itself; a level's end cuts a round short (rounds=4: 10 + 6, 10 + 10 + 4)."""
    from sds_cli.stages.tyr import local

    calls = []
    monkeypatch.setattr(local, "_score", lambda *a: calls.append(1) or _score(*a))
    w, h = problem()
    levels, _ = obs_levels(w, h, 1, [16, 40], rounds=rounds, per_round=per_round)
    assert len(calls) == want
    assert all((levels[r].abs().sum(0) == 0).sum() == r for r in (16, 40))


def test_progressive_reaches_the_local_pruner_per_kind(monkeypatch):
    """pruner.progressive as each layer's per-round count (one head, 16 channels in pruner=tyr-paper)."""
    from sds_cli.engine.stream import capture

    seen = []
    monkeypatch.setitem(search.LOCAL, "obs", lambda *a, **kw: seen.append(kw["per_round"]) or obs_levels(*a, **kw))
    model, ids = tiny(num_hidden_layers=1), torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    geo, cfg = geometry(model), TyrConfig.preset("tyr-paper", min_channels=4)
    net = plan(cfg, geo, {k: uniform(0.5, geo.count[k], 1) for k in KINDS}, 0)
    search.build_supernet(model, capture(model, ids, 2, "cpu", False), net, cfg, geo, lambda i: None)
    assert seen == [1, 16] and TyrConfig.preset().progressive == {"attention": None, "ffn": None}
    with pytest.raises(ConfigError, match="progressive"):
        TyrConfig.preset(progressive={"attention": 0, "ffn": 16})


def test_everything_removed_leaves_zeros():
    w, h = problem()
    levels, _ = obs_levels(w, h, 8, [6])
    assert levels[6].abs().sum() == 0


def test_uniform_spreads_whole_structures_to_the_exact_total():
    counts = uniform(0.5, 9, 30)
    assert sum(counts) == 135 and set(counts) == {4, 5}


def test_budget_removes_the_target_fraction_of_block_parameters():
    for arch in ({}, {"num_key_value_heads": 6}):
        geo = geometry(tiny(**arch))
        fractions = params_budget(0.5, geo)
        removed = fractions["attention"] * geo.heads * geo.head_params + fractions["ffn"] * geo.params["ffn"]
        assert removed == pytest.approx(0.5 * sum(geo.params.values()))
    assert params_budget(0.5, geometry(tiny(num_key_value_heads=6))) == {"attention": 0.5, "ffn": 0.5}
    assert params_budget(0.5, geometry(tiny()))["ffn"] > 0.5  # grouped-query: the FFN pays for kept key/value heads
    assert paper_budget(0.5, geometry(tiny())) == {"attention": 0.5, "ffn": 0.5}


@pytest.mark.parametrize("name, removes_target", [("params", True), ("paper", False)])
def test_the_paper_budget_cuts_half_the_columns_and_fewer_parameters_on_grouped_query(tmp_path, name,
                                                                                      removes_target):
    """budget=paper removes half of o_proj's and down_proj's columns; on a grouped-query model whose key/value
    heads are all still read, that is less than half the block parameters, which budget=params removes."""
    @contextmanager
    def bar(description, total):
        yield lambda n=1: None

    model, calib = tiny(num_hidden_layers=1), torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    cfg = TyrConfig.preset(search=False, min_channels=4, budget=name)
    out = search.prune(model, calib, 0.5, cfg, "cpu", 0, 2, False, None, bar, tmp_path)["extra"]
    assert out["distribution"][0]["heads_kept"] == 3
    assert (out["distribution"][0]["channels_kept"] == 48) is not removes_target
    assert (out["block_params"]["removed_fraction"] == pytest.approx(0.5, abs=0.02)) is removes_target


def test_mutations_keep_each_budget_and_stay_on_the_supernet():
    geo = geometry(tiny())
    cfg = TyrConfig.preset(min_channels=4)
    net = plan(cfg, geo, {k: uniform(0.5, geo.count[k], 3) for k in KINDS}, 0)
    rng, parent = random.Random(0), {k: [0, 0, 0] for k in KINDS}
    children = [c for c in (_mutate(parent, net, rng) for _ in range(200)) if c]
    assert len({str(c) for c in children}) > 5
    for child in children:
        for kind in KINDS:
            assert sum(child[kind]) == 0
            assert all(k in net.offsets[kind][i] for i, k in enumerate(child[kind]))


@pytest.mark.parametrize("layers, levels, reason", [(1, 9, "one decoder layer"), (3, 1, "one level per layer")])
def test_search_without_a_possible_mutation_keeps_the_centers(layers, levels, reason):
    """Once an IndexError: no child, so the first of two selection stages ranked nothing."""
    model, ids = tiny(num_hidden_layers=layers), torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    geo = geometry(model)
    cfg = TyrConfig.preset(levels=levels, min_channels=4, generations=2, offspring=4, selection=[[2, 8], [1, 16]])
    net = plan(cfg, geo, {k: uniform(0.5, geo.count[k], layers) for k in KINDS}, 0)
    centers = {k: [0] * layers for k in KINDS}
    assert reason in search.stuck(net, centers) and _mutate(centers, net, random.Random(0)) is None
    state, history = search.evolve(net, search.Fitness(model, ids, 8, "cpu", False, None), cfg, random.Random(0),
                                   lambda: None)
    assert state == centers and history == []
    assert search.stuck(plan(TyrConfig.preset(min_channels=4), geometry(tiny()), {k: [1, 1, 1] for k in KINDS}, 0),
                        {k: [0, 0, 0] for k in KINDS}) is None


def test_tyr_on_a_one_layer_model_skips_the_search_and_says_why(tmp_path):
    @contextmanager
    def bar(description, total):
        yield lambda n=1: None

    model, calib = tiny(num_hidden_layers=1), torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    cfg = TyrConfig.preset(min_channels=4, generations=2, offspring=4, selection=[[2, 8], [1, 16]], search_windows=2)
    geo = geometry(model)
    out = search.prune(model, calib, 0.5, cfg, "cpu", 0, 2, False, None, bar, tmp_path)["extra"]
    assert [it["skipped"] for it in out["iterations"]] == ["one decoder layer: no budget can move between layers"] * 2
    kept = out["distribution"][0]
    assert kept["heads_kept"] == 3 and kept["channels_kept"] == 96 - round(params_budget(0.5, geo)["ffn"] * 96)  # the centers


def test_expectation_mixes_candidates_by_density():
    cands = {0: torch.ones(2, 2), 2: torch.zeros(2, 2)}
    assert torch.allclose(mix(cands, None, 0, 4, "expectation"), torch.full((2, 2), 1 / 1.5))
    assert mix(cands, None, 2, 4, "median") is cands[2]


def _zeroed(model, kept):
    """The same removal done by zeroing: o_proj / down_proj input columns of removed structures."""
    geo = geometry(model)
    for block, keep in zip(model.model.layers, kept):
        heads = torch.zeros(geo.heads, dtype=torch.bool)
        heads[keep.heads] = True
        block.self_attn.o_proj.weight.data[:, ~heads.repeat_interleave(geo.head_dim)] = 0
        channels = torch.zeros(geo.channels, dtype=torch.bool)
        channels[keep.channels] = True
        block.mlp.down_proj.weight.data[:, ~channels] = 0


def test_the_smaller_model_computes_what_the_zeroed_one_does_and_reloads(tmp_path):
    # block 0: heads read both key/value heads evenly; block 1 unevenly (2 + 1); block 2 has no attention left
    kept = [Kept([0, 1, 3, 4], list(range(0, 96, 2))), Kept([0, 1, 5], list(range(40))), Kept([], [3, 7])]
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    model = tiny()
    dense_params = sum(p.numel() for p in model.model.layers.parameters())
    _zeroed(model, kept)
    with torch.no_grad():
        want = model(ids).logits
        shrink(model, kept)
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # two key/value heads, shared
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.linear.out_features == attn.v_proj.linear.out_features == 2 * 16  # no key/value head copied
    # exactly the removed structures' parameters are gone: 16-wide heads of 96 inputs, 96-wide channels
    head = kv_head = 2 * 16 * 96
    channels = sum(96 - len(k.channels) for k in kept)
    removed = (6 - 4) * head + (6 - 3) * head + 6 * head + 2 * kv_head + channels * 3 * 96
    assert sum(p.numel() for p in model.model.layers.parameters()) == dense_params - removed
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path)(ids).logits, got)


def test_other_families_are_refused_in_one_line():
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32))
    with pytest.raises(ConfigError, match="pruner=tyr needs"):
        geometry(opt)


QUICK = ["pruner=tyr", "pruner.iterations=2", "pruner.generations=2", "pruner.offspring=4",
         "pruner.selection=[[2,64],[1,128]]", "pruner.search_windows=4", "pruner.min_channels=4"]


def test_tyr_end_to_end_yields_a_smaller_model_that_reloads(run_main, tmp_path):
    code, err, results = run_main(*TINY, *QUICK, "model=tiny-llama", "sparsity=0.5", "save.final=true")
    assert code == 0, err
    tyr = results["tyr"]
    assert tyr["block_params"]["removed_fraction"] == pytest.approx(0.5, abs=0.03)
    assert len(tyr["distribution"]) == 2 and len(tyr["iterations"]) == 2
    assert all(len(it["fitness"]) == 2 for it in tyr["iterations"])
    assert results["config"]["redense"]["name"] == "none"  # implied
    model = load_pruned(results["saved"]["model"])
    assert sum(p.numel() for p in model.model.layers.parameters()) == tyr["block_params"]["pruned"]
    assert (Path(results["saved"]["model"]) / "modeling_tyr.py").exists()  # from_pretrained(trust_remote_code=True)


@pytest.mark.parametrize("args, message", [
    (["sparsity=2:4"], "not 2:4"),
    (["redense=sds"], "does not apply"),
    (["pruner.accumulation=mean"], "choose one of: expectation, median, off"),
    (["pruner.local=taylor"], "choose one of: obs, wanda"),
    (["pruner.budget=flops"], "choose one of: params, paper"),
    (["model=tiny-opt"], "pruner=tyr needs"),
])
def test_bad_tyr_input_is_one_line(run_main, args, message):
    given = {a.split("=")[0] for a in args}
    defaults = [d for d in ("model=tiny-llama", "sparsity=0.5") if d.split("=")[0] not in given]
    code, err, _ = run_main(*TINY, *QUICK, *defaults, *args)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("mode", ["host", "disk"])
def test_candidates_keep_the_kept_columns_only_and_widen_back_exactly(mode, tmp_path):
    from sds_cli.stages.tyr.candidates import Candidates

    w, h = problem()
    levels, order = obs_levels(w, h, 8, [1, 2, 4])
    store = Candidates(mode, tmp_path / "candidates")
    store.put((0, "attention"), levels, order, 8)
    for r, want in levels.items():
        assert torch.equal(store.get((0, "attention"), r, "cpu"), want)
    assert store.bytes() >= sum(4 * len(w) * (48 - 8 * r) for r in levels)  # (N - r) of N groups' columns
    assert store.bytes() < sum(4 * len(w) * (48 - 8 * r) for r in levels) + 4096  # a file: its zip headers
    files = list((tmp_path / "candidates").glob("*.pt"))
    assert len(files) == (mode == "disk")
    if mode == "disk" and Path("/proc/self/maps").exists():
        assert str(files[0]) in Path("/proc/self/maps").read_text()  # read back as a memory map
    with pytest.raises(ConfigError, match="choose one of: host, disk"):
        TyrConfig.preset(candidates="gpu")


def _whole_model_targets(model, windows, topk):
    with torch.no_grad():
        return [(torch.log_softmax(values, -1), index) for values, index in
                (model(w[None]).logits[0, :-1].float().topk(topk, dim=-1) for w in windows)]


def _whole_model_fitness(model, net, windows, targets, state, picks, tokens):
    """The fitness as it was computed before the block-by-block forward: the whole model, state applied."""
    from torch.nn import functional as F

    with torch.no_grad():
        dense = {(i, k): b.get_submodule(search.OUTPUTS[k]).weight.data for i, b in enumerate(model.model.layers)
                 for k in KINDS}
        search.apply(model, net, state)
        total, count = 0.0, 0
        for j in picks:
            n = min(tokens - count, windows.shape[1] - 1)
            logp, index = (t[:n] for t in targets[j])
            logq = F.log_softmax(model(windows[j, : n + 1][None]).logits[0, :n].float().gather(-1, index), -1)
            total, count = total + (logp.exp() * (logp - logq)).sum().item(), count + n
            if count >= tokens:
                break
        for (i, k), weight in dense.items():
            model.model.layers[i].get_submodule(search.OUTPUTS[k]).weight.data = weight
    return total / count


def test_block_by_block_fitness_is_the_whole_model_forward_bit_for_bit():
    """Every state of a selection stage in one pass over the blocks, each on the device alone: the same KL."""
    from sds_cli.engine.stream import capture

    model, ids = tiny(), torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    geo, cfg = geometry(model), TyrConfig.preset(min_channels=4)
    fitness, targets = search.Fitness(model, ids, 16, "cpu", False, None), _whole_model_targets(model, ids, 16)
    net = plan(cfg, geo, {k: uniform(0.5, geo.count[k], 3) for k in KINDS}, 0)
    search.build_supernet(model, capture(model, ids, 2, "cpu", False), net, cfg, geo, lambda i: None)
    rng = random.Random(0)
    states = [{k: [0, 0, 0] for k in KINDS}] + [c for c in (_mutate({k: [0, 0, 0] for k in KINDS}, net, rng)
                                                           for _ in range(6)) if c]
    got = fitness(net, states, [2, 0, 1], 40)
    assert got == [_whole_model_fitness(model, net, ids, targets, s, [2, 0, 1], 40) for s in states]
    assert len(set(got)) > 1


def test_disk_candidates_choose_what_host_ones_do_and_leave_no_file(tmp_path):
    @contextmanager
    def bar(description, total):
        yield lambda n=1: None

    calib = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("host", "disk"):
        cfg = TyrConfig.preset(min_channels=4, generations=2, offspring=4, selection=[[2, 16], [1, 32]],
                               search_windows=3, candidates=mode)
        out[mode] = search.prune(tiny(), calib, 0.5, cfg, "cpu", 0, 2, False, None, bar, tmp_path / mode)["extra"]
        assert not any((tmp_path / mode).rglob("*.pt"))
        assert all(it["candidate_bytes"] > 0 for it in out[mode]["iterations"])
    assert out["host"]["distribution"] == out["disk"]["distribution"]
    assert [it["fitness"] for it in out["host"]["iterations"]] == [it["fitness"] for it in out["disk"]["iterations"]]
