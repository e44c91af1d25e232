"""The run record (results.json): what was run, with what, how long, and what came out."""
from __future__ import annotations

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

PACKAGES = ("torch", "transformers", "datasets", "lm-eval", "hydra-core", "accelerate", "sds-cli")


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"python": platform.python_version()}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here, check=False)

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


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
            "git_commit": git_commit(),
            "seed": self.config.get("seed"),
            "host": {"name": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return write_json(self.path, body)
