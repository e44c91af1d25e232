"""`sds-run`: the Hydra app. Bad input ends in one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.markup import escape

from sds_cli import launch  # noqa: F401 - registers the sds.* resolvers used by launcher configs
from sds_cli.console import console
from sds_cli.errors import ConfigError
from sds_cli.paths import CONF
from sds_cli.sparsity import structured

OOM = "out of memory; try engine.offload=true, a smaller calib.nsamples or calib.seqlen, or dtype=bfloat16"
RESUME = "; the same command plus resume=true goes on from the last finished block"
GROUPS = ("model", "calib", "pruner", "redense", "eval", "logger", "experiment")


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> list[str]:
    """Validate config-group choices before Hydra sees them (Hydra's own message spans a screen), and
    let ``model=`` take any hub id or local directory: ``model=org/name`` means ``model=hub model.path=...``."""
    out = []
    for arg in argv:
        if arg.lstrip("+~").startswith("layers="):  # llm-compressor names it targets; layers stays an alias
            arg = arg.replace("layers=", "targets=", 1)
        group, sep, value = arg.partition("=")
        group = group.lstrip("+~")
        if not sep or group not in GROUPS or value in ("", "null"):
            out.append(arg)
            continue
        choices = _choices(group)
        if group == "model" and value not in choices and "," not in value and ("/" in value or Path(value).exists()):
            out += ["model=hub", f"model.path={value}"]
            continue
        bad = [v for v in value.split(",") if v not in choices]
        if bad:
            hint = " (or a hub id / local model directory)" if group == "model" else ""
            raise ConfigError(f"unknown {group} '{bad[0]}'; choose one of: {', '.join(choices)}{hint}")
        out.append(arg)
    whole = any(a.startswith("pruner=") and structured(a.split("=", 1)[1]) for a in out)
    if whole and not any(a.lstrip("+~").startswith("redense=") for a in out):
        out.append("redense=none")  # Týr and FLAP yield a smaller dense model: nothing to re-densify
    return out


def _task(cfg: DictConfig) -> int:
    from sds_cli.pipeline import print_summary, resolved, run
    from sds_cli.results import tracking
    from sds_cli.results.record import Record

    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    record = Record(out / "results.json", resolved(cfg))
    tracker = tracking.Tracker()  # logger=none until the configured one has started
    try:
        sweep = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
        tracker = tracking.start(record.config["logger"], record.config, out, sweep)
        with record.stage("total"):
            run(cfg, record, tracker)
    except (ConfigError, FloatingPointError) as err:
        return _fail(record, tracker, str(err))
    except MemoryError:
        return _fail(record, tracker, OOM + RESUME)
    except KeyboardInterrupt:
        return _fail(record, tracker, "interrupted" + RESUME, code=130)
    except Exception as err:  # noqa: BLE001 - an unexpected bug: one line here, the traceback in the run dir
        if "out of memory" in str(err).lower():
            return _fail(record, tracker, OOM + RESUME)
        (out / "error.log").write_text(traceback.format_exc())
        return _fail(record, tracker, f"{type(err).__name__}: {err} (traceback in {out / 'error.log'})")
    record.write("ok")
    tracker.close(record, "ok")
    print_summary(record)
    return 0


def _fail(record, tracker, message: str, code: int = 2) -> int:
    record.write("failed", message)
    tracker.close(record, "failed")
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return code  # a failed job is recorded; the sweep goes on
    sys.exit(code)


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> int:
    return _task(cfg)


def main() -> None:
    debugging = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own partial traceback
    try:
        sys.argv[1:] = check_overrides(sys.argv[1:])
        _hydra_main()
    except Exception as err:
        if debugging == "1":
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, OSError):
            message = f"cannot create the run dir ({message}); choose a writable hydra.run.dir / hydra.sweep.dir"
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    finally:
        if debugging is None:
            os.environ.pop("HYDRA_FULL_ERROR")
        else:
            os.environ["HYDRA_FULL_ERROR"] = debugging
