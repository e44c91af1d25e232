"""Dense baselines: a cache so a sweep evaluates each model's dense model once, and a check against the
published dense perplexity, so that a wrong eval protocol shows up before hours of pruning are spent on it."""
from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from importlib import metadata
from pathlib import Path

import yaml

from sds_cli.atomic import write_json

FORMAT = 1  # bump when the evaluation code changes what a dense metric means
LIBRARIES = ("torch", "transformers", "datasets", "lm-eval", "sds-cli")
EVAL_IGNORED = ("name", "dense")  # labels and switches, not inputs of the dense metrics
PUBLISHED = Path(__file__).with_name("published.yaml")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _device_type(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def _local_id(path: str | None) -> list | None:
    """A local file, or the files of a local model directory, named by path, size and mtime (hashing their content
    would cost more than the cache saves); None for anything else, e.g. a hub id."""
    local = Path(path).expanduser() if path else None
    if not local or not local.exists():
        return None
    files = sorted(p for p in local.iterdir() if p.is_file()) if local.is_dir() else [local]
    return [str(local.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def key(cfg: dict) -> str:
    """Hash of exactly what determines the dense metrics (a resolved run config in): `sparsity`, `pruner` and
    `redense` play no part, `calib` and `seed` only where the `validation` text (the calibration source outside
    the calibration windows) is evaluated."""
    ev = {k: v for k, v in cfg["eval"].items() if k not in EVAL_IGNORED}
    material = {
        "format": FORMAT,
        "model": cfg["model"],
        "dtype": cfg.get("dtype", "float32"),
        "tf32": bool(cfg.get("tf32", False)),
        "device": _device_type(str(cfg.get("device", "auto"))),
        "model_files": _local_id(cfg["model"].get("path")),
        "model_package": _version(cfg["model"]["package"]) if cfg["model"].get("package") else None,
        "eval": ev,
        "eval_file": _local_id(ev.get("path")),
        "data_root": str(Path(cfg["data"]["root"]).expanduser().resolve()) if cfg.get("data", {}).get("root") else None,
        "versions": {name: _version(name) for name in LIBRARIES},
        "code": _code_version(),
    }
    if "validation" in ev.get("datasets", []):
        material |= {"calib": cfg["calib"], "seed": cfg["seed"], "calib_file": _local_id(cfg["calib"].get("path"))}
    blob = json.dumps(material, sort_keys=True, default=str)
    name = re.sub(r"[^\w.]+", "-", str(cfg["model"]["name"])).strip("-")
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _code_version() -> str:
    """The hash of the package's sources and configs (``record.source_sha256``), so that a change to the code never
    reuses an older baseline: uncommitted edits included, each dirty state its own, and with no git at all."""
    from sds_cli.results.record import source_sha256

    return source_sha256()


def _path(key: str) -> Path:
    from sds_cli.models import cache_root  # imports torch: not at module level, which sds-report imports

    return cache_root() / "dense" / f"{key}.json"


def load(key: str) -> dict | None:
    """The cached dense metrics, or None (a missing or unreadable entry is a miss, never an error)."""
    try:
        return json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None


def store(key: str, metrics: dict) -> Path:
    """Written atomically: sweep workers may store the same key at once."""
    return write_json(_path(key), metrics)


@cache
def published() -> dict:
    return yaml.safe_load(PUBLISHED.read_text())


def norm_sparsity(value) -> str:
    """0.5, "0.5" and "0.50" are one sparsity; N:M stays as written."""
    text = str(value).strip()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def lookup(**context) -> list[dict]:
    """Published entries all of whose fields (other than value and source) equal those given."""
    pub = published()
    context["model"] = pub["aliases"].get(context.get("model"), context.get("model"))
    if "sparsity" in context:
        context["sparsity"] = norm_sparsity(context["sparsity"])
    found = []
    for entry in pub["entries"]:
        fields = {k: norm_sparsity(v) if k == "sparsity" else v for k, v in entry.items() if k not in ("value", "source")}
        if all(k in context and context[k] == v for k, v in fields.items()):
            found.append(entry)
    return found


def check_published(model_name: str, seqlen: int, ppl: float, tolerance: float = 0.01) -> str | None:
    """A warning when a published dense WikiText-2 perplexity of this model at this seqlen exists and `ppl` is
    more than `tolerance` (relative) off every one of them; None otherwise. Only meaningful for the full protocol
    (all windows: no eval.max_windows)."""
    entries = lookup(model=model_name, metric="ppl_wikitext2", seqlen=seqlen, pruner="dense")
    if not entries or any(abs(ppl / e["value"] - 1) <= tolerance for e in entries):
        return None
    ref = entries[0]
    return (f"WARNING: dense WikiText-2 perplexity of {model_name} at seqlen {seqlen} is {ppl:.2f}, but "
            f"{ref['source']} reports {ref['value']:.2f} ({100 * (ppl / ref['value'] - 1):+.1f}%, more than "
            f"{100 * tolerance:g}% off): the eval data or protocol differs from the published one; "
            f"pruned results will not be comparable")
