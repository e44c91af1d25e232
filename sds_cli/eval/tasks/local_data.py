"""Dataset loader of the `local_*` tasks: the offline copies of lm-eval's zero-shot tasks under a data root
(the layout of shared/data), so that evaluation needs no dataset hub."""
from __future__ import annotations

import json
from pathlib import Path

import datasets


def load(data_root: str | None = None, file: str = "", **_) -> datasets.DatasetDict:
    """lm-eval's `custom_dataset` hook: `file` comes from the task's dataset_kwargs, `data_root` from the
    TaskManager metadata (`lm_eval --metadata '{"data_root": "DIR"}'`); other metadata keys are ignored."""
    if not data_root:
        raise FileNotFoundError(f"zeroshot/{file} needs a data root: set data.root=DIR (the layout of shared/data)")
    path = Path(data_root).expanduser() / "zeroshot" / file
    if not path.is_file():
        raise FileNotFoundError(f"task data {path} not found (data.root={data_root} lacks zeroshot/{file})")
    with path.open(encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
