"""Writing the pruned model (``save.format``): dense safetensors, or compressed-tensors' sparse formats.

``compressed-tensors`` is the checkpoint format of llm-compressor and vLLM: the sparse decoder-block
linears are stored as their non-zero values plus a bitmask, and config.json carries a
``quantization_config.sparsity_config`` naming the compressor. The package is an optional extra
(``pip install -e .[deploy]``) pinned to 0.13.0: it is the newest release that still holds the sparse
compressors and accepts transformers 5 (0.14 requires transformers<5, 0.15 dropped them), and it is
the release vLLM 0.15-0.18 pin, the last vLLM versions that serve 2:4 checkpoints."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from sds_cli.engine.walk import model_linears
from sds_cli.errors import ConfigError
from sds_cli.sparsity import is_two_four

TWO_FOUR, BITMASK = "sparse-24-bitmask", "sparse-bitmask"


def save_safetensors(lm, out: Path, layers: str) -> None:
    """Plain Hugging Face format: loads with any ``transformers``; the zeros are stored as dense weights."""
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)


def compressed_tensors():
    """The compressed-tensors classes, imported only when this format is asked for (an optional extra)."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.sparse_compressors import Sparse24BitMaskCompressor  # noqa: F401
        from compressed_tensors.config import SparsityCompressionConfig
    except ImportError:  # missing, or a release without the sparse compressors (0.15 and later)
        raise ConfigError("save.format=compressed-tensors needs the compressed-tensors package with its sparse "
                          "compressors (0.13.0): pip install -e .[deploy]") from None
    return ModelCompressor, SparsityCompressionConfig


def sparse_linears(model: nn.Module, layers: str) -> dict[str, nn.Linear]:
    """The pruned ``nn.Linear`` modules (those of the decoder blocks that ``layers`` selects) by their module name:
    compressed-tensors compresses linears only, so fused experts and Conv1D are saved dense, zeros included."""
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(linear)]: linear for _, _, linear in model_linears(model, layers) if isinstance(linear, nn.Linear)}


def sparse_format(weights: Iterable[torch.Tensor]) -> str:
    """The compressor for these weights, read from the weights themselves rather than the config (a 1:4
    model is also 2:4; a 4:8 one is not): the 2:4 one, which vLLM runs on its sparse kernels, when every
    pruned linear holds 2:4, else the bitmask one (any zero pattern)."""
    return TWO_FOUR if all(is_two_four(w) for w in weights) else BITMASK


def sparsity_config(model: nn.Module, layers: str):
    """The sparsity config llm-compressor writes: every Linear is a target, except (by name) those that
    stay dense (lm_head and any linear that ``layers`` left out)."""
    _, SparsityCompressionConfig = compressed_tensors()
    linears = sparse_linears(model, layers)
    fmt = sparse_format(linear.weight for linear in linears.values())
    dense = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in linears]
    params = list(model.parameters())
    zeros = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
    return SparsityCompressionConfig.load_from_registry(
        fmt, targets=["Linear"], ignore=dense, global_sparsity=zeros,
        sparsity_structure="2:4" if fmt == TWO_FOUR else "unstructured")


def save_compressed(lm, out: Path, layers: str) -> None:
    """Compressed-tensors format. The compressed state dict is built beside the model, which stays
    dense in memory: the run goes on with it (an SDS run saves its one-shot model midway)."""
    ModelCompressor, _ = compressed_tensors()
    compressor = ModelCompressor(sparsity_config=sparsity_config(lm.model, layers))
    lm.model.save_pretrained(out, state_dict=compressor.compress(lm.model))
    compressor.update_config(out)
    lm.tokenizer.save_pretrained(out)


def load_compressed(path: Path | str) -> nn.Module:
    """A compressed-tensors dir back as a dense model, through compressed-tensors' own decompression
    (transformers 5 loads compressed-tensors only from 0.15 on, which cannot read sparse formats)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ModelCompressor, _ = compressed_tensors()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    ModelCompressor.from_pretrained(path).decompress(str(path), model)
    model.tie_weights()  # decompression replaces the embedding Parameter; a tied lm_head must follow it
    return model.eval().requires_grad_(False)


FORMATS: dict[str, Callable[[object, Path, str], None]] = {
    "safetensors": save_safetensors,
    "compressed-tensors": save_compressed,
}


def check_format(save) -> None:
    """Before any work: an unknown ``save.format``, or a format whose package is missing while a model
    is to be saved, fails the run now rather than after the pruning."""
    if save.format not in FORMATS:
        raise ConfigError(f"unknown save.format '{save.format}'; choose one of: {', '.join(FORMATS)}")
    if save.format == "compressed-tensors" and (save.final or save.oneshot):
        compressed_tensors()


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
