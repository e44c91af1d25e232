"""Where the configs live: inside the package (``sds_cli/conf``) once installed from a wheel or ``pip install .``,
at the top of the repository (``conf/``) in a source checkout or an editable install. Both are the same files:
pyproject.toml maps ``conf/`` to ``sds_cli.conf``."""
from __future__ import annotations

from pathlib import Path

import yaml

_HERE = Path(__file__).resolve().parent
CONF = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"


def preset(group: str, name: str) -> dict:
    """One config group's YAML preset as a dict: the single statement of its defaults."""
    data = yaml.safe_load((CONF / group / f"{name}.yaml").read_text())
    merged: dict = {}
    for base in data.pop("defaults", []):
        if base != "_self_":
            merged |= preset(group, base)
    return merged | data


def top_default(key: str):
    """A top-level knob's default, from ``conf/config.yaml``."""
    return yaml.safe_load((CONF / "config.yaml").read_text())[key]
