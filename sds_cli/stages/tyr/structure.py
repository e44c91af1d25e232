"""Structures of a decoder block that can be removed whole, and their physical removal.

A structure is an attention head (its rows of q_proj and its input columns of o_proj; a key/value head
goes when no kept query head reads it) or an FFN channel (its rows of gate_proj/up_proj and its input
column of down_proj). Removing them leaves a smaller dense model. Transformers' attention infers the
head count from q_proj's width, so per-block head counts only need ``num_key_value_groups`` set per
block. A block whose kept query heads read their key/value heads unevenly keeps k_proj/v_proj over the
key/value heads still read and hands each query head its own by indexing (``_PerHead``), so no weight is
copied and the removed parameters are exactly the budgeted ones. The kept indices go into ``config.json`` (``pruned_structure``) so that ``load_pruned``
rebuilds the same smaller model from a saved directory."""
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
    """The structures one block keeps: query head indices and FFN channel indices."""

    heads: list[int]
    channels: list[int]


class _NoAttention(nn.Module):
    """A block whose every head was removed keeps only its residual path around attention."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _PerHead(nn.Module):
    """k_proj or v_proj of a block with uneven query groups: the kept key/value heads' projection, then
    one key/value head per kept query head, selected by index (what ``repeat_kv`` does for even groups)."""

    def __init__(self, linear: nn.Linear, index: list[int], head_dim: int):
        super().__init__()
        self.linear, self.head_dim = linear, head_dim
        self.register_buffer("index", torch.tensor(index, dtype=torch.long, device=linear.weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.linear(x).unflatten(-1, (-1, self.head_dim))
        return heads.index_select(-2, self.index).flatten(-2)


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    return _linear(linear.weight[index], None if linear.bias is None else linear.bias[index])


def _cols(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    return _linear(linear.weight[:, index], linear.bias)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.data = weight.detach().clone()
    if bias is not None:
        out.bias.data = bias.detach().clone()
    return out.requires_grad_(False)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def shrink_block(block: nn.Module, kept: Kept, geo: Geometry) -> None:
    """Remove the structures ``kept`` does not name from ``block``, in place."""
    attn, mlp = block.self_attn, block.mlp
    if not kept.heads:
        block.self_attn = _NoAttention()
    else:
        per_kv = geo.heads // geo.kv_heads
        readers = [h // per_kv for h in kept.heads]  # the key/value head each kept query head reads
        kv = sorted(set(readers))
        rows, kv_rows = _head_rows(kept.heads, geo.head_dim), _head_rows(kv, geo.head_dim)
        attn.q_proj, attn.o_proj = _rows(attn.q_proj, rows), _cols(attn.o_proj, rows)
        attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_rows), _rows(attn.v_proj, kv_rows)
        attn.num_key_value_groups = len(kept.heads) // len(kv)
        if len({readers.count(h) for h in kv}) > 1:
            index = [kv.index(h) for h in readers]
            attn.k_proj, attn.v_proj = (_PerHead(attn.k_proj, index, geo.head_dim),
                                        _PerHead(attn.v_proj, index, geo.head_dim))
            attn.num_key_value_groups = 1
    channels = torch.tensor(kept.channels, dtype=torch.long)
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, channels), _rows(mlp.up_proj, channels)
    mlp.down_proj = _cols(mlp.down_proj, channels)


def shrink(model: nn.Module, kept: list[Kept]) -> None:
    """Remove every structure not in ``kept`` (one entry per block) and record the kept indices in the
    config, so that ``save_pretrained`` writes what ``load_pruned`` needs."""
    geo = geometry(model)
    for block, keep in zip(decoder_layers(model), kept):
        shrink_block(block, keep, geo)
    model.config.pruned_structure = [asdict(k) for k in kept]


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
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    geo = geometry(model)
    for block, keep in zip(decoder_layers(model), structure):
        shrink_block(block, Kept(**keep), geo)
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
