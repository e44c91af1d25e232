"""Side-by-side benchmark of the one-shot SparseGPT stage: sds-cli (`sds_cli.prune`) against llm-compressor's
`oneshot`, run one after the other (never concurrently) on the same model, the same calibration windows and the
same number of threads, each pruned model scored with sds-cli's perplexity code on the same windows.

    python scripts/bench_prune.py --llmc-python /tmp/llmc-venv/bin/python --sparsity 2:4,0.5 --sequential both \
        --nsamples 32 --seqlen 512 --threads 2 --out bench_prune.json

Work: a conf/model preset (default SmolLM2-135M, fp32); calibration `--nsamples` x `--seqlen` windows of
`wikitext-2/valid.txt` under `--data-root`, drawn by `sds_cli.data.calibration_windows` with seed 0; SparseGPT
with sds-cli's preset knobs (conf/pruner/sparsegpt.yaml: blocksize, percdamp) on every linear of the decoder
blocks, never lm_head. Timed: `sds_cli.prune(..., redense="none")` (its replay check and capture included) and
llm-compressor's `oneshot(...)` call; model loading is not timed on either side. Scored: perplexity on the first
`--eval-windows` x `--eval-seqlen` windows of WikiText-2 raw test and on validation windows (the calibration text
outside the calibration windows), the zeros over the pruned linears, whether every linear holds the pattern,
whether everything else is left untouched, and how many pruned positions agree with sds-cli's first variant (also
for block 0 alone, whose inputs are the same for both tools).

llm-compressor 0.14.0 cannot share sds-cli's venv (it pins transformers<=5.17 and compressed-tensors 0.19); it runs
in the interpreter given by `--llmc-python` (a venv with `pip install torch==2.13.0 llmcompressor==0.14.0`) through
scripts/bench_prune_llmc.py. Without it, sds-cli is timed alone. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_prune_llmc.py"
CALIB_SOURCE = "wikitext2-valid"  # wikitext-2/valid.txt, lines joined by "\n" (shared/data's CPU protocol)
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time sds-cli's one-shot SparseGPT stage against llm-compressor's oneshot on the same work, "
                    "in turn, with the same threads and calibration windows; score both with sds-cli's perplexity.",
        epilog="Example: python scripts/bench_prune.py --llmc-python /tmp/llmc-venv/bin/python --nsamples 32 "
               "--seqlen 512 --out bench_prune.json")
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model preset (default: %(default)s)")
    parser.add_argument("--sparsity", default="2:4",
                        help="N:M or a fraction; comma-separated for several, e.g. 2:4,0.5 (default: %(default)s)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides (default: 2)")
    parser.add_argument("--sequential", choices=("false", "true", "both"), default="false",
                        help="sds-cli's oneshot.sequential; 'both' reports each as its own row. false is the "
                             "schedule llm-compressor's sequential pipeline runs (default: %(default)s)")
    parser.add_argument("--data-root", default="../shared/data", help="the shared/data layout (default: %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=32,
                        help="windows of test and validation text scored (default: %(default)s, the protocol)")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (default: 512)")
    parser.add_argument("--llmc-python", help="python of a venv holding llmcompressor==0.14.0 (and torch==2.13.0); "
                                              "without it only sds-cli is timed")
    parser.add_argument("--llmc-timeout", type=int, default=7200, help="seconds before the llm-compressor "
                                                                       "worker is stopped (default: %(default)s)")
    parser.add_argument("--out", help="write the rows as JSON to this file")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(f"[bench_prune {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=HERE, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def model_dir(cfg, lm, tmp: Path) -> Path:
    """A Hugging Face model dir holding the very weights sds-cli loads: the dequantized safetensors cache of a GGUF
    model (named as sds_cli.models._load_gguf names it), a local model dir, or else a save of the loaded model."""
    from sds_cli import models

    if cfg.source == "gguf":
        gguf = models._gguf_file(cfg)
        cached = models.cache_root() / "models" / f"{cfg.name}-{gguf.stat().st_size}"
        if (cached / "config.json").is_file():
            return cached
    elif cfg.source == "hub" and (Path(str(cfg.path)).expanduser() / "config.json").is_file():
        return Path(str(cfg.path)).expanduser()
    saved = tmp / "model"
    lm.model.save_pretrained(saved)
    lm.tokenizer.save_pretrained(saved)
    return saved


def llmc_probe(python: str | None) -> tuple[dict | None, str]:
    """(versions, '') when `python` runs the worker with llmcompressor importable, else (None, why not)."""
    if not python:
        return None, "no --llmc-python given"
    try:
        done = subprocess.run([python, str(WORKER), "--probe"], check=False, capture_output=True, text=True,
                              timeout=300, env=worker_env())
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{python} does not run ({type(err).__name__}: {err})"
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, f"{python} failed to report its packages: {(done.stderr.strip().splitlines() or [''])[-1]}"
    if not found.get("llmcompressor"):
        return None, f"llmcompressor is not installed in {python}"
    return found, ""


def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                  "TOKENIZERS_PARALLELISM": "false"}


def targets(model) -> list[tuple[str, object]]:
    """(block.name, nn.Linear) of every linear in the decoder blocks: what both tools prune."""
    from sds_cli.engine.walk import model_linears

    return [(f"{i}.{name}", linear) for i, name, linear in model_linears(model, ".*")]


def untouched_snapshot(model) -> dict:
    pruned = {id(linear.weight) for _, linear in targets(model)}
    return {name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in pruned}


def check_sparsity(model, pattern, before: dict, reference: dict | None) -> tuple[dict, dict]:
    """What the pruned model holds: zeros over the pruned linears, the pattern per linear, the parameters that
    must not change, and the share of pruned-linear positions whose zero/non-zero state matches `reference`."""
    import torch

    zeros = total = held = agree = first_agree = first_total = 0
    fractions, masks = [], {}
    for name, linear in targets(model):
        w = linear.weight.detach()
        mask = w == 0
        masks[name] = mask
        zeros += int(mask.sum())
        total += mask.numel()
        fractions.append(float(mask.float().mean()))
        if pattern.nm:
            rows, cols = w.shape
            held += cols % pattern.m == 0 and bool(((~mask).reshape(rows, -1, pattern.m).sum(-1) <= pattern.n).all())
        else:
            held += abs(fractions[-1] - pattern.sparsity) <= 0.005
        if reference is not None:
            same = int((mask == reference[name]).sum())
            agree += same
            if name.startswith("0."):  # block 0: both tools see the same inputs, so only the layer math differs
                first_agree, first_total = first_agree + same, first_total + mask.numel()
    params = dict(model.named_parameters())
    changed = [name for name, value in before.items() if not torch.equal(params[name].detach(), value)]
    rule = f"at most {pattern.n} non-zeros in every {pattern.m}" if pattern.nm else f"{pattern.sparsity:g} +- 0.005"
    report = {
        "sparsity_achieved": zeros / total,
        "pattern_ok": held == len(fractions),
        "pattern": f"{rule} in {held}/{len(fractions)} linears (per linear {min(fractions):.4f}-{max(fractions):.4f})",
        "untouched_ok": not changed,
        "changed_outside_targets": changed[:10],
        "mask_agreement": agree / total if reference is not None else None,
        "mask_agreement_block0": first_agree / first_total if reference is not None else None,
    }
    return report, masks


def score(model, evalsets: dict) -> dict:
    from sds_cli.eval.perplexity import perplexity

    return {f"ppl_{name}": perplexity(model, batches, "cpu")[0] for name, batches in evalsets.items()}


def run_sds(args, cfg, sparsity: str, sequential: bool, calib, evalsets, reference) -> tuple[dict, dict]:
    import sds_cli
    from sds_cli.models import load_model
    from sds_cli.sparsity import Pattern

    lm = load_model(cfg, "float32")  # not timed
    before = untouched_snapshot(lm.model)
    say(f"sds-cli sequential={str(sequential).lower()} {sparsity}: pruning")
    start = time.perf_counter()
    sds_cli.prune(lm.model, lm.tokenizer, calib, pruner="sparsegpt", sparsity=sparsity, redense="none",
                  sequential=sequential)
    seconds = time.perf_counter() - start
    say(f"sds-cli sequential={str(sequential).lower()} {sparsity}: pruned in {seconds:.1f} s; evaluating")
    checks, masks = check_sparsity(lm.model, Pattern.parse(sparsity), before, reference)
    return {"tool": "sds-cli", "variant": f"sequential={str(sequential).lower()}", "prune_seconds": seconds,
            **score(lm.model, evalsets), **checks}, masks


def run_llmc(args, cfg, sparsity: str, calib, evalsets, reference, found: dict, src: Path, block: str,
             tmp: Path) -> dict:
    import torch

    from sds_cli.models import load_model
    from sds_cli.paths import preset
    from sds_cli.sparsity import Pattern

    knobs = preset("pruner", "sparsegpt")
    work = tmp / f"llmc_{sparsity.replace(':', '-')}"
    work.mkdir()
    torch.save(calib.clone(), work / "windows.pt")
    command = [args.llmc_python, str(WORKER), "--model-dir", str(src), "--windows", str(work / "windows.pt"),
               "--sparsity", sparsity, "--threads", str(args.threads), "--block-size", str(knobs["blocksize"]),
               "--dampening", str(knobs["percdamp"]), "--block-class", block, "--out-dir", str(work / "out")]
    row = {"tool": "llm-compressor", "variant": "oneshot SparseGPTModifier"}
    say(f"llm-compressor {sparsity}: pruning in {args.llmc_python} (log: {work / 'worker.log'})")
    with open(work / "worker.log", "w") as log:
        try:
            done = subprocess.run(command, check=False, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                  env=worker_env(), timeout=args.llmc_timeout)
            failed = done.returncode != 0 and f"worker exited with {done.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"worker stopped after {args.llmc_timeout} s"
    if failed:
        tail = (work / "worker.log").read_text(errors="replace").strip().splitlines()[-15:]
        say(f"llm-compressor {sparsity}: {failed}; last lines of its log:\n    " + "\n    ".join(tail))
        return row | {"error": f"{failed}: {tail[-1] if tail else ''}"}
    result = json.loads((work / "out" / "result.json").read_text())
    say(f"llm-compressor {sparsity}: pruned in {result['seconds']:.1f} s; evaluating")
    lm = load_model(cfg, "float32")
    before = untouched_snapshot(lm.model)
    state = torch.load(work / "out" / "state_dict.pt", weights_only=True)
    lm.model.load_state_dict(state, strict=True)
    del state
    (work / "out" / "state_dict.pt").unlink()
    checks, _ = check_sparsity(lm.model, Pattern.parse(sparsity), before, reference)
    return row | {"prune_seconds": result["seconds"], **score(lm.model, evalsets), **checks,
                  "threads": result["threads"], "recipe": result["recipe"], "pipeline": result["pipeline"],
                  "versions": {k: result["versions"].get(k) for k in ("torch", "transformers", "llmcompressor",
                                                                      "compressed-tensors")}}


def print_table(rows: list[dict], ratios: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    table = Table(title="One-shot SparseGPT: sds-cli vs llm-compressor (run in turn)")
    for column in ("tool", "variant", "sparsity", "prune s", "test ppl", "valid ppl", "zeros", "pattern",
                   "untouched", "mask agree", "threads"):
        table.add_column(column, justify="left" if column in ("tool", "variant", "sparsity") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["tool"], r["variant"], r["sparsity"], "failed", r["error"][:60], *[""] * 6)
            continue
        table.add_row(r["tool"], r["variant"], r["sparsity"], num(r["prune_seconds"], ".1f"),
                      num(r["ppl_test"], ".2f"), num(r["ppl_validation"], ".2f"), num(r["sparsity_achieved"], ".4f"),
                      "ok" if r["pattern_ok"] else "NO", "ok" if r["untouched_ok"] else "NO",
                      num(r["mask_agreement"], ".4f"), str(r["threads"]))
    console = Console(width=160)
    console.print(table)
    for r in ratios:
        console.print(f"{r['sparsity']}: sds-cli {r['sds_variant']} / llm-compressor prune time = "
                      f"{r['sds_seconds']:.1f} / {r['llmc_seconds']:.1f} s = {r['ratio']:.2f} "
                      "(below 1: sds-cli faster)")


def main(argv=None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still removes its temp dir and worker
    import torch
    import transformers
    from omegaconf import OmegaConf

    import sds_cli
    from sds_cli import data
    from sds_cli.eval.perplexity import windows
    from sds_cli.models import decoder_layers, load_model
    from sds_cli.paths import preset
    from sds_cli.sparsity import Pattern

    torch.set_num_threads(args.threads)
    sparsities = [s.strip() for s in args.sparsity.split(",") if s.strip()]
    for s in sparsities:
        Pattern.parse(s)
    variants = {"false": [False], "true": [True], "both": [False, True]}[args.sequential]
    root = str(Path(args.data_root).expanduser().resolve())
    cfg = OmegaConf.create(preset("model", args.model))
    load_start = os.getloadavg()
    found, why = llmc_probe(args.llmc_python)
    if found is None:
        say(f"llm-compressor side skipped ({why}); timing sds-cli alone")
    else:
        say(f"llm-compressor {found['llmcompressor']} (torch {found['torch']}, transformers "
            f"{found['transformers']}) in {args.llmc_python}")

    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmpdir:
        tmp = Path(tmpdir)
        lm = load_model(cfg, "float32")
        src = model_dir(cfg, lm, tmp) if found else None
        block = type(decoder_layers(lm.model)[0]).__name__
        calib = data.calibration_windows(lm.tokenizer, CALIB_SOURCE, args.nsamples, args.seqlen, SEED, root)
        calib_cfg = SimpleNamespace(source=CALIB_SOURCE, nsamples=args.nsamples, seqlen=args.seqlen, path=None)
        evalsets = {
            "test": windows(data.eval_tokens(lm.tokenizer, "wikitext2", root), args.eval_seqlen, args.eval_windows),
            "validation": data.validation_windows(lm.tokenizer, calib_cfg, SEED, root, args.eval_seqlen,
                                                  args.eval_windows),
        }
        del lm
        say(f"{cfg.name} ({block} blocks), calibration {tuple(calib.shape)} of {CALIB_SOURCE} seed {SEED}, "
            f"eval {tuple(evalsets['test'].shape)} test + {tuple(evalsets['validation'].shape)} validation, "
            f"{args.threads} threads" + (f", model dir {src}" if src else ""))

        ours = {"torch": torch.__version__, "transformers": transformers.__version__, "llmcompressor": None,
                "sds_cli": sds_cli.__version__}
        rows, ratios = [], []
        for sparsity in sparsities:
            reference = None
            for sequential in variants:  # in turn, one model in memory at a time
                row, masks = run_sds(args, cfg, sparsity, sequential, calib, evalsets, reference)
                reference = reference or masks
                rows.append({"sparsity": sparsity, **row, "threads": torch.get_num_threads(), "versions": ours})
            if found:
                row = run_llmc(args, cfg, sparsity, calib, evalsets, reference, found, src, block, tmp)
                rows.append({"sparsity": sparsity, **row})
                if "error" not in row:
                    ratios += [{"sparsity": sparsity, "sds_variant": r["variant"], "sds_seconds": r["prune_seconds"],
                                "llmc_seconds": row["prune_seconds"],
                                "ratio": r["prune_seconds"] / row["prune_seconds"]}
                               for r in rows if r["sparsity"] == sparsity and r["tool"] == "sds-cli"]
            del reference

    for r in rows:
        r.setdefault("threads", args.threads)
        r["cpu"] = cpu_model()
        r.setdefault("mask_agreement_reference", f"sds-cli {rows[0]['variant']}")
    print_table(rows, ratios)
    record = {
        "rows": rows, "time_ratios_sds_over_llmc": ratios,
        "work": {"model": args.model, "dtype": "float32", "pruner": "sparsegpt", "pruner_knobs": preset("pruner",
                 "sparsegpt"), "calibration": {"source": CALIB_SOURCE, "nsamples": args.nsamples,
                 "seqlen": args.seqlen, "seed": SEED, "data_root": root},
                 "eval": {"test": "wikitext2 raw test", "validation": "calibration text outside the windows",
                          "windows": args.eval_windows, "seqlen": args.eval_seqlen},
                 "sds_cli_prune": "sds_cli.prune(redense='none'), replay check and capture included"},
        "llmc": found, "llmc_skipped": why or None,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(), "python": platform.python_version()},
        "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
