"""The llm-compressor side of scripts/bench_prune.py. It runs in a separate venv that has llmcompressor
(llm-compressor 0.14.0 pins transformers<=5.17 and compressed-tensors 0.19, so it cannot share sds-cli's venv),
and it must not import sds_cli.

    python bench_prune_llmc.py --probe       # prints the versions as JSON; exits 1 without llmcompressor
    python bench_prune_llmc.py --model-dir DIR --windows W.pt --sparsity 2:4 --threads 2 \
        --block-size 128 --dampening 0.01 --block-class LlamaDecoderLayer --out-dir OUT

Loads the model from DIR in fp32 (not timed), builds the calibration set from the token windows in W.pt (a
[n, seqlen] int64 tensor saved by bench_prune.py), times one `oneshot` call with a SparseGPTModifier, then
writes OUT/state_dict.pt (the pruned model's state dict) and OUT/result.json (seconds, versions, settings).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def mask_structure(sparsity: str) -> tuple[float, str]:
    """(sparsity, mask_structure) for SparseGPTModifier. Ours: N:M keeps at most N non-zeros in every M inputs.
    llm-compressor's "P:M" prunes P of every M (its 2:4 is ours), so ours N:M is its (M-N):M; "0:0" is unstructured."""
    if ":" in sparsity:
        n, m = (int(x) for x in sparsity.split(":"))
        return (m - n) / m, f"{m - n}:{m}"
    return float(sparsity), "0:0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="print the versions as JSON and exit")
    parser.add_argument("--model-dir")
    parser.add_argument("--windows", help="torch.save'd [n, seqlen] int64 calibration windows")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dampening", type=float, default=0.01)
    parser.add_argument("--block-class", help="class name of the decoder block (e.g. LlamaDecoderLayer)")
    parser.add_argument("--out-dir")
    args = parser.parse_args()

    found = versions()
    if args.probe:
        print(json.dumps(found))
        sys.exit(0 if found["llmcompressor"] else 1)
    for name in ("model_dir", "windows", "block_class", "out_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required")

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    windows = torch.load(args.windows, weights_only=True).long()
    n, seqlen = windows.shape
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    sparsity, structure = mask_structure(args.sparsity)
    # targets: the decoder blocks; every nn.Linear inside them is pruned (as sds-cli's targets=".*"), lm_head never
    recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=[args.block_class],
                               ignore=["re:.*lm_head"], block_size=args.block_size, dampening_frac=args.dampening)

    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=n,
            max_seq_length=seqlen, shuffle_calibration_samples=False, batch_size=1,
            sequential_targets=[args.block_class])
    seconds = time.perf_counter() - start

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "state_dict.pt")
    result = {"seconds": seconds, "versions": found, "threads": torch.get_num_threads(), "windows": [n, seqlen],
              "recipe": {"sparsity": sparsity, "mask_structure": structure, "targets": [args.block_class],
                         "ignore": ["re:.*lm_head"], "block_size": args.block_size,
                         "dampening_frac": args.dampening},
              "pipeline": "oneshot default (independent -> sequential per decoder block, propagate_error)"}
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
