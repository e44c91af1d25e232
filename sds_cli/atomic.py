"""Atomic JSON files: a reader (a resumed run, a sweep worker sharing the dense cache) never sees half a file."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, body) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str))
    tmp.replace(path)
    return path
