"""`sds-report PATH...`: every results.json under run and sweep dirs in one table (console, Markdown, CSV,
LaTeX), optionally beside the published numbers, plus figures. Bad input ends in one line and exit status 2."""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sds_cli.results import dense_cache as baseline

STAGES = {"dense": "dense", "oneshot": "one-shot", "sds": "SDS"}
# What a stage's published number is looked up by, beyond model, metric and seqlen (None: nothing to look up).
PAPER_CONTEXT = {
    "dense": lambda r: {"pruner": "dense"},
    "oneshot": lambda r: {"pruner": r.pruner, "sparsity": r.sparsity, "calib": r.cfg("calib", "source"),
                          "redense": "none"},
    "sds": lambda r: None if r.redense == "none" else {
        "pruner": r.pruner, "sparsity": r.sparsity, "calib": r.cfg("calib", "source"), "redense": r.redense},
}


class ReportError(Exception):
    pass


@dataclass
class Run:
    name: str
    data: dict
    bench: dict[str, dict] = field(default_factory=dict)  # stage -> sds-bench JSON of that stage's saved model

    def cfg(self, *keys, default="?"):
        node = self.data.get("config") or {}
        for k in keys:
            node = node.get(k, default) if isinstance(node, dict) else default
        return node

    @property
    def ok(self) -> bool:
        return self.data.get("status") == "ok"

    model = property(lambda self: str(self.cfg("model", "name")))

    @property
    def pruner(self) -> str:
        """The pruner; for Týr with its variant: distribution, local pruner (with the first-order term where on),
        error accumulation, and the budget where it is the paper's."""
        name = str(self.cfg("pruner", "name"))
        if name != "tyr":
            return name
        kind = "searched" if self.cfg("pruner", "search") else "uniform"
        local = str(self.cfg("pruner", "local"))
        if self.cfg("pruner", "first_order", default=False) is True:
            local += "+first-order"
        budget = " paper-budget" if self.cfg("pruner", "budget") == "paper" else ""
        return f"tyr {kind} {local} {self.cfg('pruner', 'accumulation')}{budget}"

    redense = property(lambda self: str(self.cfg("redense", "name")))
    # what the SDS stage ran, in words (results.json: redense_label), else the preset's name
    redense_label = property(lambda self: str(self.data.get("redense_label") or self.redense))
    sparsity = property(lambda self: baseline.norm_sparsity(self.cfg("sparsity")))

    def value(self, stage: str, key: str) -> float | None:
        v = (self.data.get("metrics") or {}).get(stage, {}).get(key)
        return float(v) if isinstance(v, (int, float)) else None

    def speedup(self, stage: str, key: str) -> float | None:
        v = self.bench.get(stage, {}).get(key)
        return float(v) if isinstance(v, (int, float)) else None


def benches(run_dir: Path, redense: str) -> dict[str, dict]:
    """The `sds-bench --out` files beside a run (any JSON in its dir with a `prefill_speedup`), keyed by the stage
    whose saved model they measured: `model_oneshot` is the one-shot model, `model` the run's final one."""
    found = {}
    for file in sorted(run_dir.glob("*.json")):
        try:
            data = json.loads(file.read_text()) if file.name != "results.json" else None
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "prefill_speedup" in data:
            model = Path(str(data.get("model", ""))).name
            found["oneshot" if model == "model_oneshot" or redense == "none" else "sds"] = data
    return found


def load_runs(paths: list[Path]) -> list[Run]:
    """Every results.json under `paths` (or a results.json given itself); an unreadable one is a failed run."""
    runs, seen = [], set()
    for root in paths:
        if not root.exists():
            raise ReportError(f"{root}: no such file or directory")
        files = [root] if root.is_file() else sorted(root.rglob("results.json"))
        if not files:
            raise ReportError(f"no results.json under {root} (is it a sds-run output or multirun dir?)")
        for file in files:
            if file.resolve() in seen:  # overlapping PATHs: one row per run
                continue
            seen.add(file.resolve())
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                data = {"status": "failed", "error": f"unreadable results.json: {err}"}
            top = root if root.is_dir() else root.parent  # a run is named relative to this, or its parent
            run = Run(str(file.parent.relative_to(top.parent if len(paths) > 1 or file.parent == top else top)), data)
            run.bench = benches(file.parent, run.redense)
            runs.append(run)
    return runs


def _model_order(name: str) -> tuple:
    """opt-125m < opt-350m < opt-1.3b: by family, then parameter count parsed from the name."""
    size = re.search(r"(\d+(?:\.\d+)?)([mb])(?![a-z])", name.lower())
    count = float(size[1]) * {"m": 1e6, "b": 1e9}[size[2]] if size else 0.0
    return (name[: size.start()] if size else name, count, name)


def _sparsity_order(text: str) -> tuple:
    """Unstructured fractions first, by value; then N:M by density, then M."""
    if m := re.fullmatch(r"(\d+):(\d+)", text):
        return (1, int(m[1]) / int(m[2]), int(m[2]))
    try:
        return (0, float(text), 0)
    except ValueError:
        return (2, 0.0, 0)


def _order(r: Run) -> tuple:
    return (_model_order(r.model), _sparsity_order(r.sparsity), r.pruner, r.redense != "none", r.redense, r.name)


def pick_metric(runs: list[Run], asked: str | None) -> str:
    """The asked perplexity metric; by default ppl_wikitext2, else the first the runs have."""
    available = sorted({k for r in runs for m in (r.data.get("metrics") or {}).values() for k in m
                        if k.startswith("ppl_")})
    if asked and (asked in available or not available):
        return asked
    if asked:
        raise ReportError(f"metric '{asked}' is in no run; available: {', '.join(available)}")
    return "ppl_wikitext2" if "ppl_wikitext2" in available or not available else available[0]


@dataclass
class Table:
    title: str
    columns: list[str]
    formats: list[str]  # format spec of each numeric column; "" for text
    rows: list[list] = field(default_factory=list)  # raw cells: str, float or None (missing)
    failed: list[bool] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def cells(self, row: list) -> list[str]:
        return ["" if v is None else format(v, f) if f else str(v) for v, f in zip(row, self.formats)]


def _quantity(prefix: str, key: str, sign: int, fmt: str, scale: float = 1.0) -> list[tuple]:
    """A metric's dense, one-shot and SDS columns, and SDS's gain over one-shot (`sign`: +1 when higher is better)."""
    def get(r: Run, stage: str):
        v = r.value(stage, key)
        return None if v is None else v * scale

    def gain(r: Run):
        one, sds = get(r, "oneshot"), get(r, "sds")
        return None if one is None or sds is None else sign * (sds - one)

    return [(prefix + label, fmt, lambda r, s=stage: get(r, s)) for stage, label in STAGES.items()] + [
        (f"{prefix}SDS gain", fmt, gain)]


def build_table(runs: list[Run], metric: str, paper: bool = False) -> Table:
    """One row per run, sorted by model size, sparsity, pruner and re-dense variant."""
    runs = sorted(runs, key=_order)
    sources: dict[str, None] = {}

    def published(r: Run, stage: str) -> float | None:
        context = PAPER_CONTEXT[stage](r)
        found = context and baseline.lookup(model=r.model, metric=metric, seqlen=r.cfg("eval", "seqlen"), **context)
        if found:
            sources[found[0]["source"]] = None
            return float(found[0]["value"])
        return None

    def diff(r: Run, stage: str) -> float | None:
        ours, pub = r.value(stage, metric), published(r, stage)
        return None if ours is None or pub is None else 100 * (ours / pub - 1)

    columns = [(name, "", lambda r, a=name: getattr(r, a)) for name in ("model", "sparsity", "pruner")]
    columns += [("redense", "", lambda r: r.redense_label)]
    columns += _quantity("", metric, -1, ".2f")
    accuracy = any(r.value(s, "mean_acc") is not None for r in runs for s in STAGES)
    if accuracy:
        columns += _quantity("acc% ", "mean_acc", +1, ".2f", scale=100)
    if speed := {(s, b.get("backend", "?")) for r in runs for s, b in r.bench.items()}:
        for phase in ("prefill", "decode"):
            columns += [(f"{phase}× {STAGES[s]}", ".2f", lambda r, s=s, p=phase: r.speedup(s, f"{p}_speedup"))
                        for s in STAGES if any(stage == s for stage, _ in speed)]
    if paper:
        columns += [(f"paper {label}", ".2f", lambda r, s=stage: published(r, s)) for stage, label in STAGES.items()]
        columns += [(f"Δ% {label}", "+.1f", lambda r, s=stage: diff(r, s)) for stage, label in STAGES.items()]
    status = (lambda r: "ok" if r.ok else "failed: " + " ".join(str(r.data.get("error") or "no error recorded").split()))
    columns += [("status", "", status), ("run", "", lambda r: r.name)]

    failed = sum(not r.ok for r in runs)
    table = Table(f"{metric} (lower is better; SDS gain = one-shot - SDS): {len(runs)} runs, {failed} failed",
                  [c[0] for c in columns], [c[1] for c in columns])
    for r in runs:
        table.rows.append([c[2](r) for c in columns])
        table.failed.append(not r.ok)
    speed_note = (f"prefill×, decode×: speedup of the saved model over its dense twin (sds-bench, "
                  f"{', '.join(sorted({b for _, b in speed}))}; prefill at the longest length benched)")
    table.notes = ((["acc%: mean zero-shot accuracy in %, SDS gain = SDS - one-shot"] if accuracy else [])
                   + ([speed_note] if speed else [])
                   + [f"paper: {s}" for s in sources] + (["Δ%: ours relative to paper"] if paper else []))
    return table


def write_md(table: Table, path: Path) -> None:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if f else "---" for f in table.formats]
    body = [f"# SDS report\n\n{table.title}\n", line(table.columns), line(align)]
    body += [line(table.cells(row)) for row in table.rows]
    body += [""] + [f"- {n}" for n in table.notes] if table.notes else []
    path.write_text("\n".join(body) + "\n")


def write_csv(table: Table, path: Path) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(table.columns)
        out.writerows([["" if v is None else v for v in row] for row in table.rows])


TEX_ESCAPE = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}",
                                                  "Δ": r"$\Delta$"}


def write_tex(table: Table, path: Path) -> None:
    """A booktabs tabular for a paper: no run column, and a failed run says only `failed` (details: report.md)."""
    def tex(text: str) -> str:
        return "".join(TEX_ESCAPE.get(c, c) for c in text)

    keep = [i for i, c in enumerate(table.columns) if c != "run"]
    spec = "".join("r" if table.formats[i] else "l" for i in keep)
    lines = [f"% sds-report: {tex(table.title)}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex(table.columns[i]) for i in keep) + r" \\", r"\midrule"]
    for row in table.rows:
        cells = table.cells(row)
        lines.append(" & ".join(tex(cells[i].split(":")[0] if table.columns[i] == "status" else cells[i])
                                for i in keep) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {tex(n)}" for n in table.notes]
    path.write_text("\n".join(lines) + "\n")


WRITERS = {"report.md": write_md, "report.csv": write_csv, "report.tex": write_tex}


def print_table(table: Table) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(width=None if sys.stdout.isatty() else 1000)  # piped: whole rows, the table its own width
    rich = RichTable(title=table.title)
    for name, fmt in zip(table.columns, table.formats):
        rich.add_column(name, justify="right" if fmt else "left", no_wrap=name != "status", overflow="fold")
    for row, failed in zip(table.rows, table.failed):
        rich.add_row(*table.cells(row), style="red" if failed else None)
    console.print(rich)
    for note in table.notes:
        console.print(note, highlight=False)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "run"


def plot_sparsity(runs: list[Run], metric: str, path: Path) -> bool:
    """Perplexity vs sparsity, one panel per model: one-shot dashed, SDS solid, one colour per pruner."""
    import matplotlib.pyplot as plt

    runs = sorted((r for r in runs if r.ok and r.value("oneshot", metric) is not None), key=_order)
    models = list(dict.fromkeys(r.model for r in runs))
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    colours = {p: f"C{i}" for i, p in enumerate(sorted({r.pruner for r in runs}))}
    for ax, model in zip(axes[0], models):
        mine = [r for r in runs if r.model == model]
        levels = sorted({r.sparsity for r in mine}, key=_sparsity_order)
        lines: dict[tuple, dict] = {}
        for r in mine:
            for stage in ("oneshot", "sds"):
                if (v := r.value(stage, metric)) is not None:
                    method = (r.pruner, "one-shot" if stage == "oneshot" else r.redense)
                    lines.setdefault(method, {}).setdefault(r.sparsity, []).append(v)
        for (pruner, variant), points in lines.items():
            xs = [levels.index(s) for s in levels if s in points]
            ys = [sum(points[s]) / len(points[s]) for s in levels if s in points]
            ax.plot(xs, ys, "o--" if variant == "one-shot" else "s-", color=colours[pruner], label=f"{pruner} {variant}")
        if dense := [v for r in mine if (v := r.value("dense", metric)) is not None]:
            ax.axhline(sum(dense) / len(dense), color="grey", linestyle=":", label="dense")
        low, high = ax.get_ylim()
        ax.set(title=model, xlabel="sparsity", ylabel=metric, xticks=range(len(levels)), xticklabels=levels,
               xlim=(-0.5, len(levels) - 0.5), yscale="log" if low > 0 and high / low > 5 else "linear")
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_layers(run: Run, path: Path) -> bool:
    """Per-layer sparsity and relative reconstruction error, in execution order, one-shot vs SDS's final layer."""
    import matplotlib.pyplot as plt

    layers = run.data.get("layers") or {}
    series = {"one-shot": ("oneshot", "error"), "SDS": ("sds", "error_final")}
    records = {label: {(x["block"], x["layer"]): x for x in layers.get(stage, [])}
               for label, (stage, _) in series.items()}
    order = list(dict.fromkeys(k for recs in records.values() for k in recs))
    if not order:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(min(20, 4 + 0.12 * len(order)), 5.5))
    for label, (stage, error) in series.items():
        xs = [i for i, k in enumerate(order) if k in records[label]]
        if xs:
            marker = "o" if stage == "oneshot" else "."
            top.plot(xs, [records[label][order[i]]["sparsity"] for i in xs], marker, fillstyle="none", label=label)
            bottom.plot(xs, [records[label][order[i]][error] for i in xs], marker + "-", fillstyle="none", label=label)
    starts = [i for i, k in enumerate(order) if i == 0 or k[0] != order[i - 1][0]]
    for ax in (top, bottom):
        for i in starts[1:]:
            ax.axvline(i - 0.5, color="grey", linewidth=0.5)
    top.set(ylabel="sparsity", ylim=(0, 1), title=f"{run.name}: {run.model} {run.pruner} {run.sparsity}")
    bottom.set(ylabel="relative error", yscale="log", xlabel="block", xticks=starts,
               xticklabels=[str(order[i][0]) for i in starts])
    top.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_distribution(run: Run, path: Path) -> bool:
    """Týr's per-block distribution: attention heads and FFN channels kept, against the dense counts."""
    import matplotlib.pyplot as plt

    tyr = run.data.get("tyr")
    if not run.ok or not tyr:
        return False
    rows, geo = tyr["distribution"], tyr["geometry"]
    blocks = [r["block"] for r in rows]
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(min(16, 4 + 0.25 * len(rows)), 5))
    for ax, key, dense, label in ((axes[0], "heads_kept", geo["heads"], "attention heads kept"),
                                  (axes[1], "channels_kept", geo["channels"], "FFN channels kept")):
        ax.bar(blocks, [r[key] for r in rows], color="C0")
        ax.axhline(dense, color="grey", linestyle=":", label="dense")
        ax.set(ylabel=label, ylim=(0, dense * 1.05))
    removed = 100 * tyr["block_params"]["removed_fraction"]
    axes[0].set_title(f"{run.name}: {run.model} {run.pruner}, {removed:.1f}% of block parameters removed")
    axes[1].set(xlabel="block")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def figures(runs: list[Run], metric: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    made = [out / "ppl_vs_sparsity.png"] if plot_sparsity(runs, metric, out / "ppl_vs_sparsity.png") else []
    made += [p for r in runs if plot_distribution(r, p := out / f"distribution_{_safe(r.name)}.png")]
    return made + [p for r in runs if plot_layers(r, p := out / f"layers_{_safe(r.name)}.png")]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ReportError(message)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="sds-report", description="Every results.json under run and sweep dirs in one table "
                      "(console, report.md, report.csv, report.tex), and figures.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run or sweep dirs (searched recursively)")
    parser.add_argument("--out", type=Path, help="where report.{md,csv,tex} and figures go (default: the first PATH)")
    parser.add_argument("--paper", action="store_true", help="add published numbers (sds_cli/published.yaml)")
    parser.add_argument("--metric", help="perplexity key of results.json (default: ppl_wikitext2, else the first ppl_*)")
    try:
        args = parser.parse_args(argv)
        runs = load_runs(args.paths)
        metric = pick_metric(runs, args.metric)
        out = args.out or (args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent)
        out.mkdir(parents=True, exist_ok=True)
    except (ReportError, OSError) as err:
        print(f"sds-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    table = build_table(runs, metric, args.paper)
    print_table(table)
    for name, write in WRITERS.items():
        write(table, out / name)
    made = figures(runs, metric, out)
    print(f"wrote {', '.join(WRITERS)} and {len(made)} figures to {out}")


if __name__ == "__main__":
    main()
