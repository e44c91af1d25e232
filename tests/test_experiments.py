"""Every `experiment=` config runs: composed from its file, with a tiny model and offline data in place of the
models and texts it names, it runs end to end (its first evaluation is where a bad eval list stops a run), and
every value its sweep lists composes into a config the pipeline accepts."""
import itertools
import json

import pytest
from conftest import DATA, ROOT, TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sds_cli.cli import check_overrides
from sds_cli.eval.zeroshot import LOCAL_TASKS, MANUAL_DATA
from sds_cli.pipeline import check_integers, unstructured
from sds_cli.sparsity import Pattern

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
EVALS = sorted(p.stem for p in (ROOT / "conf" / "eval").glob("*.yaml"))
HAS_DATA = (DATA / "zeroshot").is_dir()  # the local copies of the zero-shot tasks (shared/data layout)
KNOBS = ("pruner", "redense", "sparsity", "seed", "engine", "save", "targets", "dtype")  # the test leaves these


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def offline_tasks(tasks) -> list[str]:
    """An experiment's zero-shot tasks as a test without the hub runs them: a hub task by its local copy where
    one exists, a local task as it is, a hub task without a copy (rte) dropped, all of those only where the
    local data is present. A task that needs manually obtained data is kept: the run refuses it as it would
    refuse the user's, which is the point (no default list may name one)."""
    out = []
    for task in tasks:
        if task in MANUAL_DATA or (HAS_DATA and task in LOCAL_TASKS):
            out.append(task)
        elif HAS_DATA and f"local_{task}" in LOCAL_TASKS:
            out.append(f"local_{task}")
    return out


def sweep(cfg) -> dict[str, list[str]]:
    params = cfg.hydra.sweeper.params or {}
    return {key: str(values).split(",") for key, values in params.items()}


def test_experiments_are_found():
    assert {"demo", "cpu_protocol", "paper_opt", "paper_llama", "paper_ablation", "smollm2_offline"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EVALS)
def test_no_default_task_needs_manually_obtained_data(name):
    """A task with no downloadable data stops every run at its first evaluation: it may be added on the command
    line (conf/eval/paper.yaml says how), never listed by default."""
    tasks = set(compose_cfg(f"eval={name}").eval.zeroshot.tasks)
    assert not tasks & MANUAL_DATA, f"eval={name} lists {sorted(tasks & MANUAL_DATA)}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sweep_value_composes(name):
    """Each job of the experiment's sweep composes, and its pruner, SDS preset, sparsity and integers pass the
    checks a run makes before it loads a model."""
    grid = sweep(compose_cfg(f"experiment={name}"))
    jobs = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for job in jobs:
        overrides = check_overrides([f"experiment={name}", *(f"{k}={v}" for k, v in job.items())])
        cfg = compose_cfg(*overrides)
        for key, value in job.items():
            chosen = cfg[key].name if key in ("model", "pruner", "redense", "eval") and "name" in cfg[key] else cfg[key]
            chosen = cfg.calib.source if key == "calib" else chosen  # a calib preset is named by its source
            assert str(chosen) == value, (key, chosen, value)
        Pattern.parse(cfg.sparsity)
        check_integers(cfg)
        unstructured(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_on_a_tiny_model(name, run_main, tmp_path, monkeypatch):
    """The experiment with a tiny random Llama, embedded calibration and evaluation text, zero-shot tasks on their
    local copies (a few examples each), data.root at the shared data (or none), and a sweep cut to one job: the
    run succeeds, evaluates what the experiment asks for, and keeps the experiment's own knobs."""
    monkeypatch.setenv("SDS_CACHE", str(tmp_path / "cache"))  # the dense evaluation runs, never a cached one
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose_cfg(f"experiment={name}")
    tasks = offline_tasks(cfg.eval.zeroshot.tasks)
    overrides = [f"experiment={name}", "model=tiny-llama", *TINY, f"eval.zeroshot.tasks=[{','.join(tasks)}]",
                 "eval.zeroshot.limit=2", "eval.zeroshot.batch_size=2", f"data.root={DATA if HAS_DATA else 'null'}"]
    multirun = bool(sweep(cfg))
    code, stderr, results = run_main(*(["-m", *overrides, "hydra.sweeper.params=null"] if multirun else overrides))
    if multirun:  # one job, in the sweep dir
        found = sorted((tmp_path / "sweep").glob("*/results.json"))
        assert len(found) == 1, (found, stderr[-3000:])
        results = json.loads(found[0].read_text())
    assert code == 0 and results is not None, stderr[-3000:]
    assert results["status"] == "ok", results["error"]
    expected = compose_cfg(*overrides)
    for knob in KNOBS:
        want = expected[knob]
        assert results["config"][knob] == (OmegaConf.to_container(want) if OmegaConf.is_config(want) else want), knob
    stages = ["dense", "oneshot"] + (["sds"] if results["config"]["redense"]["name"] != "none" else [])
    assert set(results["metrics"]) == set(stages)
    for stage in stages:
        assert results["metrics"][stage]["ppl_embedded"] > 1
        if tasks:
            assert set(results["metrics"][stage]["zeroshot"]) == set(tasks)
