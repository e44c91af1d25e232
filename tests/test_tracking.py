"""Experiment tracking (logger=): real runs logged offline to MLflow's file store and TensorBoard event files, read
back with each library's own reader; a sweep as one experiment; bad choices and missing libraries in one line."""
import math
import sys

import pytest
from conftest import TINY, run_cli

from sds_cli.errors import ConfigError
from sds_cli.results import tracking

RUN = ["model=tiny-llama", "pruner=wanda", "sparsity=2:4", "redense.iters=5", "redense.adjust_iters=5", *TINY]


def block_means(rows: list[dict], column: str) -> list[float]:
    blocks = sorted({r["block"] for r in rows})
    return [math.fsum(r[column] for r in rows if r["block"] == b) / sum(r["block"] == b for r in rows)
            for b in blocks]


def mlflow_client(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"file:{tmp_path / 'mlruns'}")


def test_mlflow_run_holds_the_config_metrics_block_errors_and_results(tmp_path, monkeypatch):
    client = mlflow_client(tmp_path, monkeypatch)
    _, results = run_cli(tmp_path, *RUN, "logger=mlflow", f"logger.tracking_uri=file:{tmp_path / 'mlruns'}")
    assert results["config"]["logger"]["name"] == "mlflow"  # every knob in results.json, the logger's too
    experiment = client.get_experiment_by_name("sds-cli")
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("run", "FINISHED")
    params = run.data.params
    assert (params["model.name"], params["pruner.name"], params["sparsity"]) == ("tiny-llama", "wanda", "2:4")
    assert params["redense.iters"] == "5" and params["eval.datasets"] == '["embedded"]'
    metrics = run.data.metrics
    for stage in ("dense", "oneshot", "sds"):
        assert metrics[f"{stage}/ppl_embedded"] == results["metrics"][stage]["ppl_embedded"]
    assert metrics["seconds/total"] == results["seconds"]["total"]
    for stage, column in (("oneshot", "error"), ("sds", "error_final")):
        history = client.get_metric_history(run.info.run_id, f"blocks/{stage}/{column}")
        assert [m.step for m in history] == [0, 1]  # tiny-llama's two blocks, one point each as it finished
        assert [m.value for m in history] == pytest.approx(block_means(results["layers"][stage], column), rel=1e-12)
    assert "results.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_tensorboard_events_hold_stage_metrics_and_block_errors(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, results = run_cli(tmp_path, *RUN, "logger=tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    for stage in ("dense", "oneshot", "sds"):
        (point,) = events.Scalars(f"{stage}/ppl_embedded")
        assert point.value == pytest.approx(results["metrics"][stage]["ppl_embedded"], rel=1e-6)  # stored as fp32
    for stage, column in (("oneshot", "error"), ("sds", "error_final")):
        points = events.Scalars(f"blocks/{stage}/{column}")
        assert [p.step for p in points] == [0, 1]
        assert [p.value for p in points] == pytest.approx(block_means(results["layers"][stage], column), rel=1e-6)
    assert "seconds/total" in events.Tags()["scalars"]


def test_a_sweep_is_one_mlflow_experiment_with_a_run_per_job(tmp_path, monkeypatch):
    client = mlflow_client(tmp_path, monkeypatch)
    proc, _ = run_cli(tmp_path, "-m", "model=tiny-llama", *TINY, "pruner=magnitude", "redense=none",
                      "sparsity=0.5,3:2", "logger=mlflow", f"logger.tracking_uri=file:{tmp_path / 'mlruns'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (experiment,) = client.search_experiments(filter_string="name = 'sweep'")  # the sweep dir's name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["0_tiny-llama_magnitude_0.5", "1_tiny-llama_magnitude_3:2"]  # the jobs' run dirs
    assert runs["0_tiny-llama_magnitude_0.5"].info.status == "FINISHED"
    assert "oneshot/ppl_embedded" in runs["0_tiny-llama_magnitude_0.5"].data.metrics
    assert runs["1_tiny-llama_magnitude_3:2"].info.status == "FAILED"  # a failed job ends its tracker run failed


def test_bad_logger_choice_is_one_line(run_main):
    code, err, results = run_main("model=tiny-llama", "logger=nope")
    assert code == 2 and results is None
    assert err.strip().splitlines() == ["error: unknown logger 'nope'; choose one of: mlflow, none, tensorboard, wandb"]


def test_a_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # importing it raises ImportError
    with pytest.raises(ConfigError, match=r"logger=mlflow needs the mlflow package .*pip install 'sds-cli\[tracking\]'"):
        tracking.start({"name": "mlflow", "tracking_uri": f"file:{tmp_path}", "experiment": None}, {}, tmp_path)


def test_wandb_is_offline_without_an_api_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing written to the home dir
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    assert tracking.TRACKERS["wandb"]("wandb", mode=None).mode == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.TRACKERS["wandb"]("wandb").mode == "online"  # not started: nothing goes out
    monkeypatch.delenv("WANDB_API_KEY")
    tracker = tracking.start({"name": "wandb", "project": "sds-cli", "entity": None, "experiment": None,
                              "mode": None}, {"model": {"name": "tiny"}}, tmp_path / "run")
    try:
        assert tracker.run.settings.mode == "offline"
        tracker.stage("oneshot", {"ppl_embedded": 3.0})
    finally:
        tracker.finish("ok")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(capsys):
    class Gone(tracking.Tracker):
        calls = 0

        def log_metrics(self, metrics, step=None):
            Gone.calls += 1
            raise ConnectionError("server gone")

    tracker = Gone("gone")
    tracker.stage("oneshot", {"ppl_embedded": 3.0})
    tracker.block("oneshot", 0, [{"block": 0, "layer": "q", "error": 0.1}])
    assert tracker.broken and Gone.calls == 1
    assert capsys.readouterr().err.count("warning: logger=gone: ConnectionError: server gone") == 1
