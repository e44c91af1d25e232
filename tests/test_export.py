"""save.format=compressed-tensors: lossless round trip through compressed-tensors' own decompression,
smaller than dense safetensors, the compressor chosen from the weights, and early, one-line failures."""
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, model_cfg

from sds_cli.engine.walk import model_linears
from sds_cli.errors import ConfigError
from sds_cli.eval.perplexity import perplexity
from sds_cli.models import load_model
from sds_cli.results import export
from sds_cli.sparsity import Pattern, mask_from_scores


def pruned(sparsity: str, layers: str = ".*", tied: bool = False):
    """tiny-llama with magnitude zeros in the selected decoder-block linears."""
    cfg = model_cfg("tiny-llama")
    cfg.arch.tie_word_embeddings = tied
    lm = load_model(cfg, "float32")
    pattern = Pattern.parse(sparsity)
    for _, _, linear in model_linears(lm.model, layers):
        linear.weight[mask_from_scores(linear.weight.abs(), pattern)] = 0
    return lm


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)  # bit patterns: tells -0.0 from 0.0, which == does not


def config_of(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("sparsity, tied", [("0.5", False), ("2:4", False), ("2:4", True)])
def test_round_trip_is_lossless(tmp_path, sparsity, tied):
    lm = pruned(sparsity, tied=tied)
    export.save_compressed(lm, tmp_path, ".*")
    back = export.load_compressed(tmp_path)
    ours, theirs = lm.model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert theirs[name].dtype == value.dtype and torch.equal(bits(theirs[name]), bits(value)), name
    assert (back.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    tokens = torch.randint(0, lm.model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, lm.model(tokens).logits)
    assert perplexity(back, tokens, "cpu") == perplexity(lm.model, tokens, "cpu")


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_smaller_than_safetensors(tmp_path, sparsity):
    """A 50% sparse fp32 linear stores half its values plus 1 bit per weight: 2.125 of 4 bytes a weight."""
    lm = pruned(sparsity)
    export.save_safetensors(lm, tmp_path / "dense", ".*")
    export.save_compressed(lm, tmp_path / "ct", ".*")
    linear_bytes = sum(linear.weight.nbytes for _, _, linear in model_linears(lm.model))
    saved = export.disk_bytes(tmp_path / "dense") - export.disk_bytes(tmp_path / "ct")
    assert saved > 0.4 * linear_bytes


@pytest.mark.parametrize("sparsity, fmt, structure", [
    ("2:4", "sparse-24-bitmask", "2:4"),
    ("1:4", "sparse-24-bitmask", "2:4"),  # 1:4 also holds 2:4
    ("4:8", "sparse-bitmask", "unstructured"),
    ("0.5", "sparse-bitmask", "unstructured"),
])
def test_compressor_follows_the_weights(tmp_path, sparsity, fmt, structure):
    export.save_compressed(pruned(sparsity), tmp_path, ".*")
    config = config_of(tmp_path)
    sparse = config["sparsity_config"]
    assert config["quant_method"] == "compressed-tensors" and config["version"] == "0.13.0"
    assert (sparse["format"], sparse["sparsity_structure"]) == (fmt, structure)
    assert sparse["targets"] == ["Linear"] and sparse["ignore"] == ["lm_head"]


def test_one_linear_off_two_four_gets_the_bitmask():
    lm = pruned("2:4")
    weights = [linear.weight for _, _, linear in model_linears(lm.model)]
    assert export.sparse_format(weights) == "sparse-24-bitmask"
    weights[3][0, :3] = 1.0  # three non-zeros in the first group of 4
    assert export.sparse_format(weights) == "sparse-bitmask"


def test_linears_left_dense_are_ignored(tmp_path):
    lm = pruned("2:4", layers="mlp")
    export.save_compressed(lm, tmp_path, "mlp")
    ignore = config_of(tmp_path)["sparsity_config"]["ignore"]
    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert sorted(ignore) == sorted([*attention, "lm_head"])
    assert torch.equal(export.load_compressed(tmp_path).model.layers[1].self_attn.q_proj.weight,
                       lm.model.model.layers[1].self_attn.q_proj.weight)


def test_cli_saves_and_records_compressed(run_main):
    code, err, results = run_main("model=tiny-llama", "pruner=magnitude", "sparsity=2:4", "redense=none",
                                  "save.final=true", "save.format=compressed-tensors", *TINY)
    assert code in (0, None), err
    saved = results["saved"]["model"]
    assert results["saved_format"] == "compressed-tensors"
    assert results["saved_bytes"]["model"] == export.disk_bytes(Path(saved))
    back = export.load_compressed(saved)
    assert (back.model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.5


def test_missing_package_fails_before_pruning(run_main, monkeypatch):
    for name in ["compressed_tensors", *(n for n in sys.modules if n.startswith("compressed_tensors."))]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it (or a cached submodule) raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e \.\[deploy\]"):
        export.compressed_tensors()
    code, err, results = run_main("model=tiny-llama", "pruner=magnitude", "sparsity=2:4", "redense=none",
                                  "save.final=true", "save.format=compressed-tensors", *TINY)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install -e .[deploy]" in err
    assert results["status"] == "failed" and "pip install -e .[deploy]" in results["error"]
    assert not {"oneshot", "dense_eval"} & results["seconds"].keys()


def test_unknown_format_names_the_choices(run_main):
    code, err, results = run_main("model=tiny-llama", "save.format=gguf", *TINY)
    assert code == 2 and "unknown save.format 'gguf'; choose one of: safetensors, compressed-tensors" in err
    assert not {"oneshot", "dense_eval"} & results["seconds"].keys()
