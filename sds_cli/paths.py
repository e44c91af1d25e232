"""Where the configs live: inside the package (``sds_cli/conf``) once installed from a wheel or ``pip install .``,
at the top of the repository (``conf/``) in a source checkout or an editable install. Both are the same files:
pyproject.toml maps ``conf/`` to ``sds_cli.conf``."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import yaml

from sds_cli.errors import ConfigError

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


class Preset:
    """Base of the dataclasses read from one ``conf/GROUP/NAME.yaml`` preset (their defaults live there, once):
    ``preset(name, **overrides)`` builds one; ``CHOICES`` (knob -> valid values) is checked on construction."""

    GROUP: ClassVar[str]
    DEFAULT: ClassVar[str]
    CHOICES: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def preset(cls, name: str | None = None, **overrides):
        return cls(**preset(cls.GROUP, name or cls.DEFAULT) | overrides)

    def __post_init__(self):
        for key, choices in self.CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{self.GROUP}.{key}={getattr(self, key)!r}; choose one of: "
                                  f"{', '.join(map(str, choices))}")
