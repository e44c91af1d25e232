"""The code a run ran, in results.json: the commit where git sees one, whether the package or its configs had
uncommitted changes, and a hash of the sources that needs no git (an installed wheel is traceable too)."""
import json
import shutil
import subprocess

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sds_cli.paths import CONF
from sds_cli.results import dense_cache, record
from sds_cli.results.record import PACKAGE, Record, code_identity, git_commit, source_sha256, sources

HAS_GIT = shutil.which("git") is not None


def copy_tree(tmp_path, conf_inside=False):
    """A copy of the package and its configs: a checkout's layout (conf/ beside the package) or a wheel's."""
    package = tmp_path / "sds_cli"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    conf = package / "conf" if conf_inside else tmp_path / "conf"
    shutil.copytree(CONF, conf)
    return package, conf


def git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_source_hash_is_stable_and_covers_the_package_and_its_configs():
    names = [name for name, _ in sources()]
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"__init__.py", "results/record.py", "eval/tasks/local_data.py", "results/published.yaml",
            "conf/config.yaml", "conf/eval/paper.yaml"} <= set(names)
    assert all(name.endswith((".py", ".yaml")) for name in names)
    first = source_sha256()
    assert len(first) == 64 and int(first, 16) >= 0
    assert source_sha256() == first


def test_source_hash_follows_the_sources_only(tmp_path):
    package, conf = copy_tree(tmp_path)
    base = source_sha256(package, conf)
    assert base == source_sha256()  # names are relative: the same sources anywhere hash the same
    (package / "NOTES.txt").write_text("not a source")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert source_sha256(package, conf) == base
    pruner = package / "pruners" / "wanda.py"
    pruner.write_text(pruner.read_text() + "\n")
    changed = source_sha256(package, conf)
    assert changed != base
    preset = conf / "redense" / "sds.yaml"
    preset.write_text(preset.read_text().replace("iters: 200", "iters: 201"))
    assert source_sha256(package, conf) not in (base, changed)
    (package / "pruners" / "extra.py").write_text("")
    assert len(sources(package, conf)) == len(sources()) + 1


def test_a_wheel_layout_hashes_like_the_checkout(tmp_path):
    """Installed, the configs live inside the package (sds_cli/conf): the same names, the same hash."""
    package, conf = copy_tree(tmp_path, conf_inside=True)
    assert [name for name, _ in sources(package, conf)] == [name for name, _ in sources()]
    assert source_sha256(package, conf) == source_sha256()


def test_no_git_still_identifies_the_code(tmp_path, monkeypatch):
    package, conf = copy_tree(tmp_path)
    code = code_identity(package, conf)
    assert code == {"git_commit": None, "dirty": None, "source_sha256": source_sha256()}
    assert git_commit(code) is None
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))  # no git executable at all
    assert code_identity()["source_sha256"] == source_sha256() and code_identity()["git_commit"] is None


@pytest.mark.skipif(not HAS_GIT, reason="git not installed")
def test_dirty_means_uncommitted_changes_to_tracked_sources(tmp_path):
    package, conf = copy_tree(tmp_path)
    (tmp_path / "README.md").write_text("readme\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "snapshot")
    head = git(tmp_path, "rev-parse", "HEAD")
    clean = code_identity(package, conf)
    assert clean == {"git_commit": head, "dirty": False, "source_sha256": source_sha256()}
    assert git_commit(clean) == head

    (tmp_path / "README.md").write_text("changed\n")  # outside the package and its configs
    (package / "scratch.py").write_text("x = 1\n")  # untracked
    untracked = code_identity(package, conf)
    assert untracked["dirty"] is False and untracked["source_sha256"] != clean["source_sha256"]

    preset = conf / "pruner" / "sparsegpt.yaml"
    preset.write_text(preset.read_text() + "# edited\n")
    edited = code_identity(package, conf)
    assert edited["git_commit"] == head and edited["dirty"] is True
    assert git_commit(edited) == head + "-dirty"
    git(tmp_path, "checkout", "-q", "--", "conf")
    module = package / "sparsity.py"
    module.write_text(module.read_text() + "\n")
    assert code_identity(package, conf)["dirty"] is True


@pytest.mark.skipif(not HAS_GIT, reason="git not installed")
def test_an_untracked_copy_inside_a_checkout_has_no_commit(tmp_path):
    """A wheel installed into a virtualenv inside some checkout is not that checkout's code."""
    (tmp_path / "README.md").write_text("readme\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "snapshot")
    package, conf = copy_tree(tmp_path / "venv", conf_inside=True)
    assert code_identity(package, conf) == {"git_commit": None, "dirty": None, "source_sha256": source_sha256()}


def test_results_json_records_the_code(tmp_path):
    rec = Record(tmp_path / "results.json", {"seed": 0})
    body = json.loads(rec.write("ok").read_text())
    assert set(body["code"]) == {"git_commit", "dirty", "source_sha256"}
    assert body["code"]["source_sha256"] == source_sha256()
    assert body["git_commit"] == git_commit(body["code"])  # kept at the top level for older readers


def test_dense_cache_key_follows_the_sources(monkeypatch):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["model=tiny-opt"]), resolve=True)
    base = dense_cache.key(cfg)
    assert dense_cache.key(cfg) == base
    monkeypatch.setattr(record, "source_sha256", lambda: "0" * 64)  # an edit, committed or not
    assert dense_cache.key(cfg) != base
