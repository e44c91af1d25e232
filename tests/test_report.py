"""sds-report over a real tiny sweep (golden Markdown), its errors, the published-number columns, the dense
baseline cache and check, and the GPU claim of the joblib launcher."""
import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sds_cli import launch, report
from sds_cli.results import dense_cache as baseline
from sds_cli.stages.redense.stage import RedenseConfig

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).with_name("golden") / "report.md"
SWEEP = ["model=tiny-llama,tiny-opt", "pruner=sparsegpt,wanda", "sparsity=2:4,3:2", "calib=embedded", "calib.seqlen=64",
         "calib.nsamples=2", "eval.datasets=[embedded]", "eval.seqlen=64", "eval.max_windows=2", "redense.iters=5",
         "redense.adjust_iters=5", "device=cpu"]
NUMBER = re.compile(r"[-+]?\d+\.\d+")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """8 jobs of tiny random models; the 4 with sparsity 3:2 fail and must still be reported."""
    tmp = tmp_path_factory.mktemp("sweep")
    # one thread: tiny matmuls gain nothing from more, and on a shared 2-core machine threads make the sweep 3x slower
    env = os.environ | {"SDS_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "from sds_cli.cli import main; main()", "-m", *SWEEP,
                           f"hydra.sweep.dir={tmp}"], check=False, cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp


def same_up_to_rounding(got: str, want: str) -> bool:
    """Equal text, and numbers equal to within 0.25. The tiny random models sit near chance (perplexity ~500), where
    the last bits of a float sum, which differ between CPUs, can flip one ADMM mask choice: the same code measured
    SDS 502.39 on one 2-core VM and 502.50 on another. The report's own arithmetic is checked exactly below."""
    if NUMBER.sub("#", got) != NUMBER.sub("#", want):
        return False
    return all(abs(float(a) - float(b)) <= 0.25 for a, b in zip(NUMBER.findall(got), NUMBER.findall(want)))


def test_sweep_report_matches_golden(sweep, capsys):
    out = sweep / "rep"
    report.main([str(sweep), "--out", str(out), "--metric", "ppl_embedded"])
    assert "tiny-opt" in capsys.readouterr().out
    got = (out / "report.md").read_text()
    if os.environ.get("SDS_UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert same_up_to_rounding(got, GOLDEN.read_text()), f"report.md differs from {GOLDEN}:\n{got}"
    assert got.count("| failed: sparsity '3:2'") == 4
    for row in (r.split(" | ") for r in got.splitlines() if r.endswith("_2:4 |")):
        assert abs(float(row[5]) - float(row[6]) - float(row[7])) <= 0.011  # SDS gain = one-shot - SDS
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 9 and csv_lines[0].startswith("model,sparsity,pruner,redense,dense,one-shot,SDS,SDS gain")
    assert r"\toprule" in (out / "report.tex").read_text()

    import matplotlib.pyplot as plt

    runs = sorted(p.name for p in sweep.iterdir() if (p / "results.json").is_file() and not p.name.endswith("3:2"))
    pngs = [out / "ppl_vs_sparsity.png"] + [out / f"layers_{name.replace(':', '_')}.png" for name in runs]
    assert len(pngs) == 5 and sorted(out.glob("*.png")) == sorted(pngs)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plt.imread(png).shape[0] > 100


def fake_run(path: Path, model="opt-125m", pruner="sparsegpt", sparsity="2:4", ppl=(27.8, 61.0, 50.0),
             redense="sds_paper", **knobs):
    """A results.json of one run; ``knobs`` go into its pruner config."""
    cfg = {"model": {"name": model}, "pruner": {"name": pruner, **knobs}, "redense": {"name": redense}, "sparsity": sparsity,
           "calib": {"source": "c4"}, "eval": {"seqlen": 2048}}
    metrics = {stage: {"ppl_wikitext2": v, "mean_acc": 0.5} for stage, v in zip(("dense", "oneshot", "sds"), ppl)}
    path.mkdir(parents=True)
    label = RedenseConfig.preset(redense).label
    (path / "results.json").write_text(json.dumps({"status": "ok", "config": cfg, "metrics": metrics, "layers": {},
                                                   "redense_label": label}))


def test_paper_columns_and_sorting(tmp_path):
    fake_run(tmp_path / "b", model="opt-350m", ppl=(22.0, 40.0, 35.0))
    fake_run(tmp_path / "a", pruner="wanda", ppl=(27.8, 82.47, 60.0))
    fake_run(tmp_path / "c")
    table = report.build_table(report.load_runs([tmp_path]), "ppl_wikitext2", paper=True)
    rows = [dict(zip(table.columns, row)) for row in table.rows]
    assert [(r["model"], r["pruner"]) for r in rows] == [("opt-125m", "sparsegpt"), ("opt-125m", "wanda"),
                                                         ("opt-350m", "sparsegpt")]
    first = rows[0]
    assert (first["paper dense"], first["paper one-shot"], first["paper SDS"]) == (27.66, 60.43, 51.30)
    assert first["SDS gain"] == pytest.approx(11.0) and first["acc% SDS gain"] == pytest.approx(0.0)
    assert first["Δ% SDS"] == pytest.approx(100 * (50 / 51.30 - 1))
    assert rows[1]["Δ% one-shot"] == pytest.approx(0.0)
    assert rows[2]["paper dense"] == 22.00 and rows[2]["paper one-shot"] is None
    assert any("2408.10473" in note for note in table.notes)
    assert first["redense"] == "SDS (paper)"


def test_tyr_rows_name_their_variant(tmp_path):
    """Týr runs that differ in the first-order term or the budget get rows of their own names."""
    for name, extra in {"plain": {}, "fo": {"first_order": True}, "paper": {"first_order": True, "budget": "paper"}}.items():
        knobs = {"search": True, "local": "obs", "accumulation": "expectation", "budget": "params"} | extra
        fake_run(tmp_path / name, pruner="tyr", sparsity=0.5, **knobs)
    names = sorted(run.pruner for run in report.load_runs([tmp_path]))
    assert names == ["tyr searched obs expectation", "tyr searched obs+first-order expectation",
                     "tyr searched obs+first-order expectation paper-budget"]


def test_published_sds_numbers_sit_beside_sds_paper_only(tmp_path):
    """The default (SDS with ADMM adjust) is not the paper's method: no published SDS number beside it, and its
    row says what ran."""
    fake_run(tmp_path / "default", redense="sds")
    row = dict(zip(*[(t := report.build_table(report.load_runs([tmp_path]), "ppl_wikitext2", paper=True)).columns,
                     t.rows[0]]))
    assert row["paper one-shot"] == 60.43 and row["paper SDS"] is None
    assert row["redense"] == "SDS: re-dense + ADMM adjust (damp 0.1), sequential, early exit"


def test_speedup_columns_from_bench_files_beside_runs(tmp_path):
    """A bench JSON in a run dir fills the speedup column of the stage whose saved model it measured."""
    fake_run(tmp_path / "a")
    fake_run(tmp_path / "b", pruner="wanda")
    bench = {"backend": "deepsparse", "prefill_speedup": 1.3, "decode_speedup": 1.1}
    (tmp_path / "a" / "bench_sds.json").write_text(json.dumps(bench | {"model": "outputs/x/a/model"}))
    (tmp_path / "a" / "bench_oneshot.json").write_text(json.dumps(bench | {"model": "a/model_oneshot",
                                                                           "prefill_speedup": 1.2}))
    (tmp_path / "a" / "notes.json").write_text(json.dumps({"model": "a/model"}))  # not a bench file
    table = report.build_table(report.load_runs([tmp_path]), "ppl_wikitext2")
    rows = {r["pruner"]: r for r in (dict(zip(table.columns, row)) for row in table.rows)}
    assert rows["sparsegpt"]["prefill× SDS"] == 1.3 and rows["sparsegpt"]["prefill× one-shot"] == 1.2
    assert rows["sparsegpt"]["decode× SDS"] == 1.1 and rows["wanda"]["prefill× SDS"] is None
    assert "prefill× dense" not in table.columns and any("deepsparse" in n for n in table.notes)
    plain = tmp_path / "plain"
    fake_run(plain / "c")
    assert not any("×" in c for c in report.build_table(report.load_runs([plain]), "ppl_wikitext2").columns)


@pytest.mark.parametrize("argv, message", [
    ([], "required: PATH"),
    (["{tmp}/nowhere"], "no such file or directory"),
    (["{tmp}"], "no results.json under"),
    (["{tmp}/run", "--metric", "ppl_c4"], "metric 'ppl_c4' is in no run; available: ppl_wikitext2"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    if "--metric" in argv:
        fake_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        report.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


def test_baseline_key_tracks_only_what_the_dense_metrics_depend_on():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["model=tiny-opt"]), resolve=True)

    def key_with(path: str, value) -> str:
        changed = copy.deepcopy(cfg)
        *parents, leaf = path.split(".")
        functools.reduce(dict.__getitem__, parents, changed)[leaf] = value
        return baseline.key(changed)

    base = baseline.key(cfg)
    for path, value in [("sparsity", 0.5), ("pruner", {"name": "wanda"}), ("redense.name", "none"),
                        ("calib.source", "c4"), ("seed", 3), ("eval.dense", False), ("eval.name", "paper")]:
        assert key_with(path, value) == base, path
    for path, value in [("eval.seqlen", 1024), ("eval.max_windows", 4), ("eval.datasets", ["embedded"]),
                        ("model.init_seed", 1), ("dtype", "bfloat16"), ("tf32", True), ("data.root", "/data")]:
        assert key_with(path, value) != base, path


def test_baseline_store_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SDS_CACHE", str(tmp_path))
    assert baseline.load("k") is None
    baseline.store("k", {"ppl_wikitext2": 27.7})
    assert baseline.load("k") == {"ppl_wikitext2": 27.7}
    assert [p.name for p in (tmp_path / "dense").iterdir()] == ["k.json"]


def test_check_published():
    assert baseline.check_published("opt-125m", 2048, 27.65 * 1.02).startswith("WARNING")
    assert baseline.check_published("facebook/opt-125m", 2048, 27.65 * 1.02) is not None
    assert baseline.check_published("opt-125m", 2048, 27.65 * 1.005) is None
    assert baseline.check_published("opt-125m", 1024, 40.0) is None
    assert baseline.check_published("tiny-opt", 2048, 500.0) is None
    assert "5.12" in baseline.check_published("llama-2-7b", 4096, 5.5)


def test_free_gpu_gives_each_process_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "LOCKS", tmp_path)
    monkeypatch.setattr(launch, "gpu_ids", lambda: ["4", "7"])
    monkeypatch.setattr(launch, "_claimed", {})
    first = launch.free_gpu()
    assert launch.free_gpu() == first == "cuda:0"
    held = launch._claimed.copy()
    launch._claimed.clear()  # as another process would see it: gpu 4 is locked, gpu 7 free
    assert launch.free_gpu() == "cuda:1"
    for handle in [*held.values(), *launch._claimed.values()]:
        handle.close()
