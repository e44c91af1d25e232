"""Týr-pruned Llama-style models, loadable with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

A saved Týr (or FLAP) model is its family's model (Llama and SmolLM2, Mistral, Qwen2) with each decoder block
cut to the query heads and FFN channels that config.json's ``pruned_structure`` keeps (indices per block, so the
per-block sizes), and where a block's entry says ``bias``, a bias on o_proj and down_proj (FLAP's compensation
of what the removed structures contributed on average). ``save_pretrained`` copies this file beside the weights and names its class in
config.json's ``auto_map``, so it imports torch and transformers only; sds-cli cuts its own models with the
same functions, so both compute the same logits."""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


class NoAttention(nn.Module):
    """Attention with every query head removed: the block keeps its residual path alone. It still appends one
    zero key/value head to a KV cache, since a cache reads its length off a layer's keys (the first layer's,
    for positions and masks) and an empty layer counts no tokens. With ``bias`` (hidden size) it outputs that
    bias, o_proj's bias once every head is gone."""

    def __init__(self, layer_idx: int, head_dim: int, bias: int | None = None, device=None, dtype=None):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self.bias = None if bias is None else nn.Parameter(torch.zeros(bias, device=device, dtype=dtype),
                                                           requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                     None)
        if cache is not None:
            zero = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], self.head_dim)
            cache.update(zero, zero, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        return (out if self.bias is None else out + self.bias), None


class PerHead(nn.Module):
    """k_proj or v_proj of a block whose kept query heads read their key/value heads unevenly: the kept
    key/value heads' projection, then one of them per query head, by index (what ``repeat_kv`` does for even
    groups). The index is a plain list, made a tensor per device on first use: transformers leaves
    non-persistent buffers empty when it loads a model."""

    def __init__(self, linear: nn.Linear, index: list[int], head_dim: int):
        super().__init__()
        self.linear, self.head_dim, self.index = linear, head_dim, list(index)
        self._on: dict[torch.device, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (index := self._on.get(x.device)) is None:
            index = self._on[x.device] = torch.tensor(self.index, dtype=torch.long, device=x.device)
        return self.linear(x).unflatten(-1, (-1, self.head_dim)).index_select(-2, index).flatten(-2)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.data = weight.detach().clone()
    if bias is not None:
        out.bias.data = bias.detach().clone()
    return out.requires_grad_(False)


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    index = index.to(linear.weight.device)
    return _linear(linear.weight[index], None if linear.bias is None else linear.bias[index])


def _cols(linear: nn.Linear, index: torch.Tensor, bias: bool) -> nn.Linear:
    """The kept input columns; with ``bias``, a bias (zero where the linear had none, for the weights to fill)."""
    weight = linear.weight
    if bias and linear.bias is None:
        return _linear(weight[:, index.to(weight.device)], weight.new_zeros(weight.shape[0]))
    return _linear(weight[:, index.to(weight.device)], linear.bias)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def cut(block: nn.Module, heads: list[int], channels: list[int], per_kv: int, head_dim: int,
        bias: bool = False) -> None:
    """Keep query ``heads`` (a key/value head stays while a kept query head reads it) and FFN ``channels`` of
    a dense ``block`` with ``per_kv`` query heads per key/value head, in place; ``bias`` gives o_proj and
    down_proj a bias."""
    attn, mlp = block.self_attn, block.mlp
    if not heads:
        o_proj = attn.o_proj.weight
        block.self_attn = NoAttention(attn.layer_idx, head_dim, o_proj.shape[0] if bias else None, o_proj.device,
                                      o_proj.dtype)
    else:
        readers = [h // per_kv for h in heads]  # the key/value head each kept query head reads
        kv = sorted(set(readers))
        rows, kv_rows = _head_rows(heads, head_dim), _head_rows(kv, head_dim)
        attn.q_proj, attn.o_proj = _rows(attn.q_proj, rows), _cols(attn.o_proj, rows, bias)
        attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_rows), _rows(attn.v_proj, kv_rows)
        attn.num_key_value_groups = len(heads) // len(kv)
        if len({readers.count(h) for h in kv}) > 1:
            index = [kv.index(h) for h in readers]
            attn.k_proj, attn.v_proj = PerHead(attn.k_proj, index, head_dim), PerHead(attn.v_proj, index, head_dim)
            attn.num_key_value_groups = 1
    channels = torch.tensor(channels, dtype=torch.long)
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, channels), _rows(mlp.up_proj, channels)
    mlp.down_proj = _cols(mlp.down_proj, channels, bias)


def cut_model(model: nn.Module, structure: list[dict]) -> None:
    """Cut every block of a dense model to ``structure`` (config.json's ``pruned_structure``)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_kv = config.num_attention_heads // config.num_key_value_heads
    for block, keep in zip(model.model.layers, structure):
        cut(block, keep["heads"], keep["channels"], per_kv, head_dim, keep.get("bias", False))


class _Cut:
    """The family's model, built dense (on the meta device while transformers loads it) and then cut."""

    _auto_class = "AutoModelForCausalLM"  # so that save_pretrained copies this file and writes auto_map

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        cut_model(self, config.pruned_structure)


class TyrLlamaForCausalLM(_Cut, LlamaForCausalLM):
    """A Týr-pruned Llama (SmolLM2 too)."""


class TyrMistralForCausalLM(_Cut, MistralForCausalLM):
    """A Týr-pruned Mistral."""


class TyrQwen2ForCausalLM(_Cut, Qwen2ForCausalLM):
    """A Týr-pruned Qwen2."""


CUT = {LlamaForCausalLM: TyrLlamaForCausalLM, MistralForCausalLM: TyrMistralForCausalLM,
       Qwen2ForCausalLM: TyrQwen2ForCausalLM}
