"""The run record (results.json): what was run, with what, how long, and what came out."""
from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from sds_cli.atomic import write_json
from sds_cli.paths import CONF

PACKAGES = ("torch", "transformers", "datasets", "lm-eval", "hydra-core", "accelerate", "sds-cli")


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"python": platform.python_version()}


PACKAGE = Path(__file__).resolve().parents[1]  # the sds_cli package these sources were imported from
SOURCE_SUFFIXES = (".py", ".yaml")


def _git(*args: str, cwd: Path) -> str | None:
    """git's stdout, or None where git is missing, fails or takes too long."""
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=cwd, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def sources(package: Path | None = None, conf: Path | None = None) -> list[tuple[str, Path]]:
    """Every .py and .yaml of the package and of its configs, as (name, path) sorted by name. Names are relative
    to the package, the configs' under ``conf/`` wherever they live (inside the package once installed, at the
    top of a checkout), so a wheel and the checkout it was built from list the same names."""
    package = (package or PACKAGE).resolve()
    conf = (conf or CONF).resolve()
    found = {p.relative_to(package).as_posix(): p for p in package.rglob("*")
             if p.suffix in SOURCE_SUFFIXES and p.is_file() and not p.is_relative_to(conf)}
    found |= {f"conf/{p.relative_to(conf).as_posix()}": p for p in conf.rglob("*")
              if p.suffix in SOURCE_SUFFIXES and p.is_file()}
    return sorted(found.items())


def source_sha256(package: Path | None = None, conf: Path | None = None) -> str:
    """SHA-256 over the names and contents of ``sources()``: the code a run ran, with or without git."""
    digest = hashlib.sha256()
    for name, path in sources(package, conf):
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def code_identity(package: Path | None = None, conf: Path | None = None) -> dict:
    """``git_commit`` (the checkout's HEAD, None where the package is not a tracked part of a git checkout, e.g.
    an installed wheel), ``dirty`` (uncommitted changes to tracked files of the package or its configs; None
    without a commit) and ``source_sha256`` (always: ``source_sha256()``)."""
    package = (package or PACKAGE).resolve()
    conf = (conf or CONF).resolve()
    commit = dirty = None
    # a wheel installed into a virtualenv inside some checkout sits in that checkout's tree, untracked
    if _git("ls-files", "--error-unmatch", "--", str(package / "__init__.py"), cwd=package) is not None:
        commit = (_git("rev-parse", "HEAD", cwd=package) or "").strip() or None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no", "--", str(package), str(conf), cwd=package)
        dirty = None if status is None else bool(status.strip())
    return {"git_commit": commit, "dirty": dirty, "source_sha256": source_sha256(package, conf)}


def git_commit(code: dict | None = None) -> str | None:
    """The commit, suffixed ``-dirty`` where the package or its configs have uncommitted changes; None without git.
    The top-level ``git_commit`` of results.json, kept beside ``code`` for readers of older records."""
    code = code or code_identity()
    if not code["git_commit"]:
        return None
    return code["git_commit"] + ("-dirty" if code["dirty"] else "")


def peak_memory() -> dict[str, float]:
    import resource

    peak = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        peak["gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


@dataclass
class Record:
    """Accumulates a run's results; written once, at the end, with its status."""

    path: Path
    config: dict
    metrics: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    code: dict = field(default_factory=code_identity)  # taken when the run starts: the code it runs

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)

    def write(self, status: str, error: str | None = None) -> Path:
        body = {
            "status": status,
            "error": error,
            "config": self.config,
            "metrics": self.metrics,
            "seconds": self.seconds,
            "peak_memory": peak_memory(),
            "layers": self.layers,
            **self.extra,
            "versions": versions(),
            "code": self.code,
            "git_commit": git_commit(self.code),
            "seed": self.config.get("seed"),
            "host": {"name": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return write_json(self.path, body)
