"""The Python API: ``sds_cli.run`` is the CLI's run, ``sds_cli.prune`` the same stages on a model in memory."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, model_cfg, run_cli

import sds_cli

RUN = ["model=tiny-llama", "pruner=wanda", "sparsity=2:4", "redense.iters=5", "redense.adjust_iters=5", *TINY]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("cli"), *RUN)[1]


def test_run_is_the_cli_run(cli_run, tmp_path):
    result = sds_cli.run(RUN, run_dir=tmp_path / "api")
    written = json.loads((tmp_path / "api" / "results.json").read_text())
    assert written["status"] == "ok" and result.run_dir == tmp_path / "api"
    assert result.metrics == cli_run["metrics"] and written["metrics"] == cli_run["metrics"]
    assert result.mask_sha1 == cli_run["mask_sha1"]
    for stage in ("oneshot", "sds"):  # whole-model accounting: every block matrix pruned, 2:4 = half zeros
        cover = written["coverage"][stage]
        assert cover["pruned_fraction"] == 1.0 and cover["zeros_pruned"] == cover["zeros_block"] == 0.5
    assert written["left_dense"] == []
    for stage in ("oneshot", "sds"):  # the stage's seconds by part, within the stage's own time
        parts = written["profile"][stage]
        assert {"collect", "prune", "advance"} <= set(parts) and all(v >= 0 for v in parts.values())
        assert 0 < sum(parts.values()) <= written["seconds"][stage]
    assert "capture" in written["profile"]["oneshot"]
    assert [r["error_final"] for r in result.layers["sds"]] == [r["error_final"] for r in cli_run["layers"]["sds"]]
    q = result.model.model.layers[0].self_attn.q_proj.weight
    assert ((q.reshape(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_run_bad_input_raises_config_error_and_records_failure(tmp_path):
    with pytest.raises(sds_cli.ConfigError, match="unknown pruner 'nope'"):
        sds_cli.run(["pruner=nope"], run_dir=tmp_path / "bad")
    with pytest.raises(sds_cli.ConfigError, match="N:M needs 0 < N < M"):
        sds_cli.run([*RUN, "sparsity=3:2"], run_dir=tmp_path / "bad")
    assert json.loads((tmp_path / "bad" / "results.json").read_text())["status"] == "failed"


def test_prune_in_memory_equals_the_cli_run(cli_run):
    from sds_cli import data
    from sds_cli.models import load_model

    lm = load_model(model_cfg("tiny-llama"), "float32")
    windows = data.calibration_windows(lm.tokenizer, "embedded", 4, 64, 0, None)
    result = sds_cli.prune(lm.model, lm.tokenizer, windows, pruner="wanda", sparsity="2:4",
                           redense_options={"iters": 5, "adjust_iters": 5})
    assert result.model is lm.model and result.mask_sha1 == cli_run["mask_sha1"]


def test_prune_takes_texts_and_refuses_what_it_cannot_do():
    from sds_cli.models import load_model

    lm = load_model(model_cfg("tiny-llama"), "float32")
    texts = [" ".join(f"word{i}" for i in range(300))] * 2
    result = sds_cli.prune(lm.model, lm.tokenizer, texts, pruner="magnitude", sparsity=0.5, redense="none", seqlen=64)
    assert set(result.layers) == {"oneshot"} and all(r["sparsity"] == 0.5 for r in result.layers["oneshot"])
    for structured in ("tyr", "flap"):
        with pytest.raises(sds_cli.ConfigError, match="for Týr and FLAP use sds_cli.run"):
            sds_cli.prune(lm.model, lm.tokenizer, texts, pruner=structured)
    with pytest.raises(sds_cli.ConfigError, match="no text holds 4096 tokens"):
        sds_cli.prune(lm.model, lm.tokenizer, ["short"], seqlen=4096)
    with pytest.raises(sds_cli.ConfigError, match="tensor of token ids"):
        sds_cli.prune(lm.model, lm.tokenizer, torch.zeros(2, 8))
