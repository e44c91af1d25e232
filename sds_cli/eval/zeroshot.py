"""Zero-shot accuracy through lm-eval on the in-memory model (no save/reload round trip). The `local_*` tasks
(sds_cli/tasks) are offline copies of lm-eval's standard tasks, read from `<data root>/zeroshot/*.jsonl`."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from sds_cli.errors import ConfigError

TASK_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = sorted(p.stem for p in TASK_DIR.glob("local_*.yaml"))
MANUAL_DATA = {"storycloze", "storycloze_2016", "storycloze_2018"}  # lm-eval has no downloadable copy


def zeroshot(model, tokenizer, tasks: list[str], *, data_root: str | None, batch_size: int,
             limit: float | None, num_fewshot: int, device: str,
             progress: Callable[[int], None] | None = None) -> dict:
    """Scores as the `lm_eval` CLI reports them (its `simple_evaluate` minus the environment report and the
    reseeding of the global RNGs), one task at a time to report `progress(1)` after each: bit-identical to a CLI
    run of that task; a CLI run of several tasks batches their requests together (float32 rounding, ~1e-7 rel.).

    Every task is built (its data loaded) before any is evaluated, so a bad name or missing data fails at once.
    Returns {"tasks": {task: {"acc": .., "acc_stderr": .., ...}}, "mean_acc": mean acc over the tasks}."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices about custom datasets, model kwargs
    root = str(Path(data_root).expanduser().resolve()) if data_root else None
    local_only = all(name in LOCAL_TASKS for name in tasks)
    built = [_build(name, root, local_only) for name in tasks]
    lm = HFLM(pretrained=model.to(device), tokenizer=tokenizer, batch_size=batch_size, device=device)
    scores = {}
    for loaded in built:
        for task in loaded["tasks"].values():  # as simple_evaluate: a task pinned to 0 shots stays so
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        out = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
        for task in loaded["tasks"]:  # the leaf tasks (a group's own row would count its tasks twice)
            scores[task] = {key.removesuffix(",none"): value for key, value in out["results"][task].items()
                            if key not in ("alias", "name")}
        if progress:
            progress(1)
    accs = [m["acc"] for m in scores.values() if "acc" in m]
    return {"tasks": scores, "mean_acc": sum(accs) / len(accs) if accs else None}


@functools.lru_cache(maxsize=4)
def _task_manager(data_root: str | None, local_only: bool):
    """Indexing lm-eval's ~15k task YAMLs takes ~20 s on a CPU: skipped when only local tasks are asked for,
    and done once per process otherwise. The local tasks' loader reads `data_root` from the metadata."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=not local_only, metadata={"data_root": data_root})


def _build(name: str, data_root: str | None, local_only: bool) -> dict:
    """The task (or group) built by lm-eval, its data loaded; ConfigError naming the task otherwise."""
    local = f"the local copies {', '.join(LOCAL_TASKS)} with data.root=DIR (eval=common-local or paper-local)"
    if name in MANUAL_DATA:
        raise ConfigError(
            f"zero-shot task '{name}' has no downloadable data (Story Cloze is given out on request, "
            "https://cs.rochester.edu/nlp/rocstories/); lm-eval reads a manual download through dataset_kwargs.data_dir: "
            f"list instead the path of a copy of lm_eval/tasks/storycloze/{name}.yaml with `dataset_kwargs: "
            f"{{data_dir: DIR}}`, or drop the task; offline, use {local}"
        )
    manager = _task_manager(data_root, local_only)
    if name not in manager.all_tasks and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
        raise ConfigError(f"unknown zero-shot task '{name}': not an lm-eval task; offline tasks: {local}")
    try:
        return manager.load([name])
    except OSError as err:  # a local file missing (FileNotFoundError), or the hub out of reach (ConnectionError)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if name in LOCAL_TASKS:
            raise ConfigError(f"zero-shot task '{name}': {first}") from None
        raise ConfigError(f"zero-shot task '{name}' cannot load its data from the Hugging Face hub ({first}); "
                          f"offline, use {local}") from None
