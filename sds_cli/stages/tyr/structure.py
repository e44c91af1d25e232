"""Structures of a decoder block that can be removed whole, and their physical removal.

A structure is an attention head (its rows of q_proj and its input columns of o_proj; a key/value head
goes when no kept query head reads it) or an FFN channel (its rows of gate_proj/up_proj and its input
column of down_proj). Removing them leaves a smaller dense model. Transformers' attention infers the
head count from q_proj's width, so per-block head counts only need ``num_key_value_groups`` set per
block. A block whose kept query heads read their key/value heads unevenly keeps k_proj/v_proj over the
key/value heads still read and hands each query head its own by indexing (``PerHead``), so no weight is
copied and the removed parameters are exactly the budgeted ones. The cutting lives in the self-contained
``modeling_tyr.py``, which ``save_pretrained`` copies beside the weights. The kept indices go into
``config.json`` (``pruned_structure``), so that ``load_pruned``, and ``from_pretrained`` with
``trust_remote_code=True``, rebuild the same smaller model from a saved directory."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sds_cli.errors import ConfigError
from sds_cli.models import decoder_layers

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OUTPUTS = {"attention": "self_attn.o_proj", "ffn": "mlp.down_proj"}  # the linears whose input columns go


@dataclass(frozen=True)
class Geometry:
    """What a structured pruner needs to know of a block: head count, key/value heads, head width,
    FFN width, and the parameters one structure of each kind carries."""

    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    hidden: int

    @property
    def group(self) -> dict[str, int]:
        """Input columns of the output linear per structure."""
        return {"attention": self.head_dim, "ffn": 1}

    @property
    def count(self) -> dict[str, int]:
        return {"attention": self.heads, "ffn": self.channels}

    @property
    def head_params(self) -> int:
        """Parameters one query head takes with it: its q rows and o columns, and with plain multi-head
        attention its own key/value rows too (with grouped-query attention those stay while shared)."""
        return 2 * self.hidden * self.head_dim * (2 if self.heads == self.kv_heads else 1)

    @property
    def params(self) -> dict[str, int]:
        """Parameters of each kind in one block (q/k/v/o; gate/up/down)."""
        return {"attention": 2 * self.hidden * self.head_dim * (self.heads + self.kv_heads),
                "ffn": 3 * self.hidden * self.channels}


def geometry(model: nn.Module) -> Geometry:
    """The block geometry of a Llama-style model, or a one-line refusal naming what is missing."""
    block = decoder_layers(model)[0]
    names = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    if missing := [n for n in ATTENTION + FFN if n not in names]:
        raise ConfigError(f"pruner=tyr needs decoder blocks with self_attn.{{q,k,v,o}}_proj and "
                          f"mlp.{{gate,up,down}}_proj (Llama, Mistral, Qwen2, SmolLM2); "
                          f"{type(model).__name__} lacks {', '.join(missing)}")
    attn, mlp = block.self_attn, block.mlp
    head_dim = attn.head_dim
    heads = attn.q_proj.out_features // head_dim
    return Geometry(heads, attn.k_proj.out_features // head_dim, head_dim, mlp.down_proj.in_features,
                    attn.o_proj.out_features)


@dataclass
class Kept:
    """The structures one block keeps: query head indices and FFN channel indices; ``bias``: o_proj and
    down_proj carry a bias (FLAP's compensation)."""

    heads: list[int]
    channels: list[int]
    bias: bool = False


def shrink_block(block: nn.Module, kept: Kept, geo: Geometry) -> None:
    """Remove the structures ``kept`` does not name from ``block``, in place."""
    from sds_cli.stages.tyr.modeling_tyr import cut  # imports the model classes of its families: on use

    cut(block, kept.heads, kept.channels, geo.heads // geo.kv_heads, geo.head_dim, kept.bias)


def _loadable(model: nn.Module) -> None:
    """A Llama, Mistral or Qwen2 model becomes its Týr class (``modeling_tyr.py``): the same modules, but
    ``save_pretrained`` then writes the modeling file and ``auto_map`` beside the weights."""
    from sds_cli.stages.tyr.modeling_tyr import CUT

    if (cls := CUT.get(type(model))) is not None:
        model.__class__ = cls


def shrink(model: nn.Module, kept: list[Kept]) -> None:
    """Remove every structure not in ``kept`` (one entry per block) and record the kept indices in the
    config, so that ``save_pretrained`` writes what ``load_pruned`` needs."""
    geo = geometry(model)
    for block, keep in zip(decoder_layers(model), kept):
        shrink_block(block, keep, geo)
    model.config.pruned_structure = [asdict(k) for k in kept]
    _loadable(model)


def block_params(model: nn.Module) -> int:
    return sum(p.numel() for p in decoder_layers(model).parameters())


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A saved structurally pruned model: the architecture from config.json, shrunk to the recorded
    kept heads and channels, then the saved weights (strictly: every shape must match)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    structure = getattr(config, "pruned_structure", None)
    if structure is None:
        raise ConfigError(f"{path} has no pruned_structure in config.json; load it with from_pretrained")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)  # the family's own code
    geo = geometry(model)
    for block, keep in zip(decoder_layers(model), structure):
        shrink_block(block, Kept(**keep), geo)
    _loadable(model)
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state |= load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{path} does not match its pruned_structure: missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(dtype).eval().requires_grad_(False)
