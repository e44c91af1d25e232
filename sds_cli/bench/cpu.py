"""`sds-bench --device cpu`: what unstructured and N:M sparsity buy on a CPU (the SDS paper's deployment claim).

DeepSparse, the sparse CPU runtime the paper used, runs the pruned model and a dense model of the same
architecture from the same ONNX export; plain PyTorch runs the dense model as a third column, the speed a
user gets without a sparse runtime. Figures: batch-1 prefill latency at fixed lengths (2048 and 128 tokens)
and batch-1 decode tokens/s, each the median of timed rounds after warm-up, the models taking turns within
every round so that load from a neighbour on a shared CPU falls on all of them alike.

Dense reference: DeepSparse gains only from zeros, so a saved pruned model is compared with itself, its
zeros filled with small random values: the same graph, shapes and other weights, only the zeros differ, so
the ratio is exactly what the runtime makes of them (``--dense DIR`` names another reference, such as the
original dense model). A random-weight preset is compared with its weights before masking. Speed depends on
shapes and the sparsity pattern, not on the values: a preset gives the figures of any model of that shape.

Export: the TorchScript-based ONNX exporter at opset 17 with eager attention, one fixed-shape graph per
prefill length. torch's default dynamo exporter needs onnxscript, hence onnx >= 1.17, which cannot share a
venv with DeepSparse 1.8 (onnx < 1.15); the TorchScript exporter works with onnx 1.14. Decode is one
graph step: one new token attending to a KV cache of ``context`` tokens (the shortest prefill) that the graph
takes as inputs, returning the logits and the new token's keys and values: the per-token cost of generation
at that context, the cache kept by the caller as a runtime's generation loop keeps it.

Structured pruning removes whole heads or channels, leaving a smaller dense model that needs no sparse
runtime: ``--backend torch`` times it against ``--dense`` in PyTorch."""
from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sds_cli.bench.presets import MLP_SHAPES, PRESETS, SHAPES
from sds_cli.console import bar, console
from sds_cli.engine.walk import model_linears
from sds_cli.errors import ConfigError
from sds_cli.sparsity import Pattern, mask_from_scores

CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
INSTALL = "pip install -e .[cpu-bench]"
OPSET = 17
WARMUP = 2  # untimed rounds: first calls allocate buffers and warm the caches
MIN_ZEROS = 0.01  # below this share of zeros in the decoder linears a model counts as dense


@dataclass
class Subject:
    """A model to time: a causal LM (token ids in, logits out, cached decode) or a bare MLP block (hidden
    states in and out; its decode is a one-token forward)."""

    name: str
    module: nn.Module
    causal_lm: bool

    def linears(self) -> list[nn.Linear]:
        if self.causal_lm:
            return [linear for _, _, linear in model_linears(self.module)]
        return [m for m in self.module.modules() if isinstance(m, nn.Linear)]

    def zeros(self) -> float:
        weights = [linear.weight for linear in self.linears()]
        return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)

    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def attention(self, implementation: str) -> None:
        """Eager attention exports as plain MatMul/Softmax; PyTorch users run the default, SDPA."""
        if self.causal_lm:
            self.module.set_attn_implementation(implementation)

    def check_positions(self, prefill: int, context: int) -> None:
        """The graphs have fixed shapes: every position they use must exist in the model."""
        limit = getattr(self.module.config, "max_position_embeddings", None) if self.causal_lm else None
        if limit and max(prefill, context + 1) > limit:
            what = f"a {prefill}-token prefill" if prefill > limit else f"decode after a {context}-token context"
            raise ConfigError(f"{what} needs more than the {limit} positions {self.name} takes "
                              "(max_position_embeddings), so the export cannot take it; pass shorter --prefill lengths")

    @torch.no_grad()
    def graph(self, tokens: int, context: int | None) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """The module and inputs of one phase: a ``tokens``-long prefill, or with ``context`` a decode step. The
        wrappers are put in eval mode: the exporter restores a module's mode afterwards, recursively, and a
        wrapper left in training mode would switch dropout on in the model it holds."""
        gen = torch.Generator().manual_seed(0)
        if not self.causal_lm:
            return self.module, (torch.randn(1, tokens, self.module.hidden_size, generator=gen),)
        vocab = self.module.config.vocab_size
        if context is None:
            return Prefill(self.module).eval(), (torch.randint(0, vocab, (1, tokens), generator=gen),)
        ids = torch.randint(0, vocab, (1, context + 1), generator=gen)
        cache = self.module(input_ids=ids[:, :-1], use_cache=True).cache
        past = tuple(t for layer in cache.layers for t in (layer.keys, layer.values))
        return Decode(self.module).eval(), (ids[:, -1:], *past)


class Prefill(nn.Module):
    """Token ids to the last position's logits, no cache: ``generate`` asks for no more (``logits_to_keep=1``),
    and the vocabulary projection of every position would add dense work that no user pays. The all-ones mask
    keeps transformers off its packed-sequence check, whose ``aten::diff`` the TorchScript exporter cannot take."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **self.keep).logits


class Decode(nn.Module):
    """One token after a KV cache given as tensors (keys, values per layer): its logits, keys and values."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        context = past[0].shape[-2]
        cache = DynamicCache(ddp_cache_data=list(zip(past[::2], past[1::2])), config=self.lm.config)
        out = self.lm(input_ids=ids, attention_mask=torch.ones(1, context + 1, dtype=torch.long),
                      position_ids=torch.full((1, 1), context, dtype=torch.long), cache=cache, use_cache=True)
        return out.logits, *(t[:, :, -1:] for layer in out.cache.layers for t in (layer.keys, layer.values))


def preset(name: str) -> Subject:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    if name in MLP_SHAPES:
        return Subject(name, LlamaMLP(LlamaConfig(**MLP_SHAPES[name])).eval(), causal_lm=False)
    family, arch = SHAPES[name]
    config = AutoConfig.for_model(family, **arch)
    return Subject(name, AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), True)


def load_dir(path: str) -> Subject:
    from transformers import AutoModelForCausalLM

    if "pruned_structure" in json.loads((Path(path) / "config.json").read_text()):  # Týr: a smaller dense model
        from sds_cli.stages.tyr.structure import load_pruned

        lm = load_pruned(path)
        lm.set_attn_implementation("eager")
        return Subject(str(path), lm, True)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except Exception as err:  # noqa: BLE001 - transformers and safetensors raise many types for a bad dir
        raise ConfigError(f"cannot load model dir {path}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                          ) from None
    return Subject(str(path), lm.eval(), True)


def load_reference(name: str) -> Subject:
    """``--dense``: a saved model dir or a `conf/model` preset (e.g. smollm2-135m, from its PyPI package)."""
    if (Path(name) / "config.json").is_file():
        return load_dir(name)
    from omegaconf import OmegaConf

    from sds_cli.models import load_model
    from sds_cli.paths import CONF

    presets = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem not in ("hub", "gguf"))
    if name not in presets:
        raise ConfigError(f"--dense '{name}' is neither a saved model dir nor a model preset; choose a dir or one "
                          f"of: {', '.join(presets)}")
    lm = load_model(OmegaConf.load(CONF / "model" / f"{name}.yaml"), "float32")
    lm.model.set_attn_implementation("eager")
    return Subject(name, lm.model, True)


def densified(subject: Subject) -> Subject:
    """The same model with every zero of its decoder linears filled by a small random value (not a
    subnormal, which would slow the dense runs down)."""
    twin = Subject(f"{subject.name} (zeros filled)", copy.deepcopy(subject.module), subject.causal_lm)
    gen = torch.Generator().manual_seed(0)
    for linear in twin.linears():
        zero = linear.weight.data == 0
        linear.weight.data[zero] = torch.randn(int(zero.sum()), generator=gen) * 1e-3 + 1e-4
    return twin


def masked(subject: Subject, pattern: Pattern) -> Subject:
    """A copy whose linears are pruned to ``pattern`` by magnitude."""
    twin = Subject(subject.name, copy.deepcopy(subject.module), subject.causal_lm)
    for linear in twin.linears():
        linear.weight.data.masked_fill_(mask_from_scores(linear.weight.abs(), pattern), 0)
    return twin


def deepsparse_engine() -> Callable:
    """DeepSparse's Engine class, or a one-line ConfigError saying how to get it."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # DeepSparse sends a usage event on import unless told not to
    try:
        from deepsparse import Engine
    except ModuleNotFoundError as err:
        if err.name != "deepsparse":
            raise ConfigError(f"DeepSparse cannot be imported ({err}): reinstall it with {INSTALL}") from None
        raise ConfigError(f"DeepSparse is not installed: {INSTALL} (CPython 3.8-3.11, x86-64 Linux; "
                          "or --backend torch to time PyTorch alone)") from None
    except ImportError as err:
        raise ConfigError(f"DeepSparse cannot be imported ({str(err).splitlines()[0]}): reinstall it with {INSTALL}"
                          ) from None
    return Engine


def export(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=OPSET,
                          input_names=[f"input_{i}" for i in range(len(inputs))])
    return path


def torch_runner(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    return functools.partial(torch.no_grad()(module), *inputs)


def deepsparse_runner(engine: Callable, module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path,
                      threads: int) -> Callable[[], object]:
    compiled = engine(str(export(module, inputs, path)), batch_size=1, num_cores=threads)
    return functools.partial(compiled.run, [t.numpy() for t in inputs], False)


def interleaved(runs: dict[tuple[str, str], Callable[[], object]], repeats: int, warmup: int = WARMUP,
                advance: Callable[[], object] = lambda: None) -> dict[tuple[str, str], list[float]]:
    """Milliseconds of each callable per timed round; every round calls each once, in turn, then ``advance()``."""
    for _ in range(warmup):
        for run in runs.values():
            run()
        advance()
    times: dict[tuple[str, str], list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
        advance()
    return times


def cpu_info() -> dict:
    """The CPU's model and the vector-ISA flags that decide which kernels a runtime can use."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in (cpuinfo.read_text() if cpuinfo.is_file() else "").split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "unknown"), "family": fields.get("cpu family"),
            "model_number": fields.get("model"), "cores": len(os.sched_getaffinity(0)),
            "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def subjects(args, pattern: Pattern | None) -> tuple[Subject, Subject | None, str]:
    """(pruned, dense reference or None for the pruned model densified, how the reference is made)."""
    if args.model in PRESETS:
        dense = preset(args.model)
        pruned, how = masked(dense, pattern), "the preset's random weights before masking"
    elif (Path(args.model) / "config.json").is_file():
        if args.sparsity:
            raise ConfigError("--sparsity applies to the random-weight presets; a saved model brings its own zeros")
        pruned = load_dir(args.model)
        dense, how = None, "the pruned weights with their zeros filled by small random values"
    else:
        raise ConfigError(f"model '{args.model}' is neither a saved model dir nor a preset; choose a dir or one of: "
                          f"{', '.join(PRESETS)}")
    if args.dense:
        dense, how = load_reference(args.dense), args.dense
    return pruned, dense, how


def measure(models: dict[str, Subject], phases: dict[str, tuple[int, int | None]], engine: Callable | None,
            threads: int, repeats: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Milliseconds of every timed round per backend, role and phase: DeepSparse on both models and PyTorch on
    the dense one, or (``engine`` None) PyTorch on both. One phase's engines at a time, to bound memory."""
    roles = {"deepsparse": ("dense", "pruned"), "torch": ("dense",)} if engine else {"torch": ("dense", "pruned")}
    ms: dict[str, dict[str, dict[str, list[float]]]] = {b: {role: {} for role in names} for b, names in roles.items()}
    with tempfile.TemporaryDirectory(prefix="sds-bench-") as tmp:
        for phase, (tokens, context) in phases.items():
            with bar(f"{phase}: export, compile, {WARMUP}+{repeats} rounds", WARMUP + repeats) as advance:
                graphs = {role: model.graph(tokens, context) for role, model in models.items()}
                runs = {("deepsparse", role): deepsparse_runner(engine, *graphs[role], Path(tmp) / f"{role}.onnx",
                                                                threads) for role in roles.get("deepsparse", ())}
                for model in models.values():
                    model.attention("sdpa")
                runs |= {("torch", role): torch_runner(*graphs[role]) for role in roles["torch"]}
                for (backend, role), value in interleaved(runs, repeats, advance=advance).items():
                    ms[backend][role][phase] = value
            for model in models.values():
                model.attention("eager")
            del runs  # free this phase's compiled engines before the next exports
    return ms


def figures(ms: dict[str, float]) -> dict[str, float]:
    return {**{f"{phase}_ms": value for phase, value in ms.items()}, "decode_tokens_per_s": 1e3 / ms["decode"]}


def speedups(base: dict[str, float], new: dict[str, float], longest: str) -> dict[str, float]:
    ratios = {f"{phase}_speedup": base[phase] / new[phase] for phase in base}
    return {**ratios, "prefill_speedup": ratios[f"{longest}_speedup"]}


def run(args) -> dict:
    """Time the model of ``args`` and its dense reference; print the table, write ``args.out``, return the body."""
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    if not 1 <= threads <= cores:
        raise ConfigError(f"--threads {threads}: this process may use {cores} cores")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: the medians need at least one timed round")
    if args.out and not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.dtype not in (None, "float32"):
        raise ConfigError(f"--dtype {args.dtype}: the CPU bench runs float32 (DeepSparse's dense and sparse kernels)")
    lengths = sorted(set(args.prefill or (2048, 128)), reverse=True)
    if lengths[-1] < 1:
        raise ConfigError(f"--prefill {lengths[-1]}: a prefill needs at least one token")
    pattern = Pattern.parse(args.sparsity or 0.5) if args.model in PRESETS else None
    pruned, dense, how = subjects(args, pattern)
    zeros = pruned.zeros()
    backend = args.backend if args.backend != "auto" else "torch" if zeros < MIN_ZEROS and args.dense else "deepsparse"
    if backend == "deepsparse" and zeros < MIN_ZEROS:
        raise ConfigError(f"{pruned.name} is dense: {zeros:.2%} of its decoder-linear weights are zero, and DeepSparse "
                          "gains only from zeros; pass a model saved by sds-run with sparsity=0.5 or N:M, or time a "
                          "structurally pruned model with --backend torch --dense DENSE")
    dense = dense or densified(pruned)
    context = lengths[-1]
    for subject in (pruned, dense):
        subject.check_positions(lengths[0], context)
    engine = deepsparse_engine() if backend == "deepsparse" else None
    torch.set_num_threads(threads)
    load = {"start": os.getloadavg()}
    if load["start"][0] > cores:
        console.print(f"[yellow]warning:[/] load average {load['start'][0]:.1f} on {cores} cores: other work shares the "
                      "CPU, so the figures will be noisy (parallel runs suffer most; --threads 1 is steadier)")
    phases = {f"prefill_{n}": (n, None) for n in lengths} | {"decode": (1, context)}
    rounds = measure({"dense": dense, "pruned": pruned}, phases, engine, threads, args.repeats)
    ms = {b: {role: {phase: statistics.median(values) for phase, values in by_phase.items()}
              for role, by_phase in roles.items()} for b, roles in rounds.items()}
    load["end"] = os.getloadavg()
    longest = f"prefill_{lengths[0]}"
    body = {
        "model": args.model, "dense_reference": how, "kind": "causal-lm" if pruned.causal_lm else "mlp-block",
        "device": "cpu", "dtype": "float32", "backend": backend, "pattern": str(pattern) if pattern else None,
        "sparsity": zeros, "params": {"dense": dense.params(), "pruned": pruned.params()},
        "threads": threads, "repeats": args.repeats, "warmup": WARMUP, "prefill_tokens": lengths, "decode_context": context,
        "cpu": cpu_info(), "load_average": load, "versions": versions(backend),
        "export": {"exporter": "torchscript", "opset": OPSET, "attention": "eager",
                   "decode": f"one token, KV cache of {context} tokens as graph inputs, new keys/values as outputs"},
        "backends": {b: {role: figures(values) for role, values in roles.items()} for b, roles in ms.items()},
        **speedups(ms[backend]["dense"], ms[backend]["pruned"], longest),
        "rounds_ms": rounds,  # every timed round, to judge the spread on a shared CPU
    }
    if backend == "deepsparse":
        body["vs_torch"] = speedups(ms["torch"]["dense"], ms["deepsparse"]["pruned"], longest)
    show(body)
    if args.out:
        args.out.write_text(json.dumps(body, indent=2))
    return body


def versions(backend: str) -> dict[str, str]:
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    if backend == "deepsparse":
        import deepsparse

        found["deepsparse"] = deepsparse.__version__
    return found


def show(body: dict) -> None:
    from rich.table import Table

    backend, figs = body["backend"], body["backends"]
    dense, pruned = figs[backend]["dense"], figs[backend]["pruned"]
    torch_dense = figs["torch"]["dense"] if backend != "torch" else None
    table = Table(title=f"{body['model']}: pruned ({body['sparsity']:.1%} zeros) vs dense, {body['cpu']['model']}, "
                        f"{body['threads']} threads")
    extra = ("torch dense", "pruned vs torch") if torch_dense else ()
    for head in ("figure", f"{backend} dense", f"{backend} pruned", "speedup", *extra):
        table.add_column(head, justify="left" if head == "figure" else "right")
    for phase in [*(f"prefill_{n}" for n in body["prefill_tokens"]), "decode"]:
        key, label = (f"{phase}_ms", f"{phase.replace('_', ' ')} (ms)") if phase != "decode" else \
            ("decode_tokens_per_s", "decode (tokens/s)")
        cells = [f"{dense[key]:.4g}", f"{pruned[key]:.4g}", f"{body[f'{phase}_speedup']:.3g}x"]
        if torch_dense:
            cells += [f"{torch_dense[key]:.4g}", f"{body['vs_torch'][f'{phase}_speedup']:.3g}x"]
        table.add_row(label, *cells)
    console.print(table)
    console.print(f"{body['kind']}; medians of {body['repeats']} interleaved rounds after {body['warmup']} warm-up "
                  f"rounds; decode at a {body['decode_context']}-token context; dense reference: "
                  f"{body['dense_reference']}", highlight=False)
