"""What the wheel ships: pyproject.toml lists every package of the tree (the Python ones and each config group,
data-only packages under sds_cli.conf), so that an installed sds-cli has all its modules, configs and task files
(scripts/wheel_check.sh installs the wheel and runs it; this is the quick check of the list)."""
from pathlib import Path

import pytest

from sds_cli.paths import CONF

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sds_cli"


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_package_is_listed():
    listed = set(setuptools_config()["packages"])
    tree = {".".join(d.relative_to(ROOT).parts) for d in [PACKAGE, *PACKAGE.rglob("*")]
            if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))}
    assert tree - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    python = {p for p in listed if not p.startswith("sds_cli.conf")}
    assert python - tree == set(), "listed packages without Python files"


def test_every_config_group_ships():
    config = setuptools_config()
    assert config["package-dir"]["sds_cli.conf"] == "conf" and CONF.name == "conf"
    groups = {".".join(("sds_cli", "conf", *d.relative_to(ROOT / "conf").parts)) for d in
              [ROOT / "conf", *(ROOT / "conf").rglob("*")] if d.is_dir() and any(d.rglob("*.yaml"))}
    listed = set(config["packages"])
    missing = groups - listed
    assert not missing, f"config dirs the wheel would not ship (or only with a setuptools warning): {sorted(missing)}"
    assert {p for p in listed if p.startswith("sds_cli.conf")} <= groups, "listed config dirs that do not exist"
    with_yaml = {".".join(("sds_cli", "conf", *d.relative_to(ROOT / "conf").parts)) for d in
                 [ROOT / "conf", *(ROOT / "conf").rglob("*")] if d.is_dir() and any(d.glob("*.yaml"))}
    data = config["package-data"]
    assert all("*.yaml" in data.get(group, []) for group in with_yaml), "a config dir's YAML is not package data"


def test_package_data_files_are_declared():
    data = setuptools_config()["package-data"]
    assert "*.yaml" in data["sds_cli.eval.tasks"] and "published.yaml" in data["sds_cli.results"]
    assert (PACKAGE / "results" / "published.yaml").is_file() and any((PACKAGE / "eval" / "tasks").glob("*.yaml"))


def test_licence_and_python_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and project["requires-python"] == ">=3.10"
