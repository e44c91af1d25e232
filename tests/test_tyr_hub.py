"""A saved Týr model loads without sds-cli: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
runs the modeling file saved beside the weights, computes ``load_pruned``'s logits exactly, and generates with
a KV cache, also when a block has no attention head left."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sds_cli.stages.tyr.structure import Kept, load_pruned, shrink

ARCH = {"vocab_size": 128, "hidden_size": 96, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 64}
# block 0 has no head left (and is the layer a KV cache reads its length from); block 1 reads its key/value
# heads unevenly (2 + 1); block 2 evenly
KEPT = [Kept([], list(range(40))), Kept([0, 1, 5], list(range(0, 96, 3))), Kept([0, 2], [3, 7, 50])]

LOAD = r"""
import importlib.abc, json, sys
import torch

class NoSdsCli(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sds_cli":
            raise ImportError("sds_cli must not be needed")

sys.meta_path.insert(0, NoSdsCli())
from transformers import AutoModelForCausalLM, DynamicCache

out = {}
for family in sys.argv[2:]:
    ref = torch.load(f"{sys.argv[1]}/{family}.pt")
    model = AutoModelForCausalLM.from_pretrained(f"{sys.argv[1]}/{family}", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ref["ids"]).logits
        cache = DynamicCache(config=model.config)
        model(ref["ids"], past_key_values=cache, use_cache=True)
        cached = model.generate(ref["ids"], use_cache=True, max_new_tokens=5, do_sample=False, pad_token_id=0)
        plain = model.generate(ref["ids"], use_cache=False, max_new_tokens=5, do_sample=False, pad_token_id=0)
    out[family] = {"class": type(model).__name__, "equal": torch.equal(logits, ref["logits"]),
                   "max_diff": (logits - ref["logits"]).abs().max().item(), "cache_length": cache.get_seq_length(),
                   "generated": cached.shape[1] - ref["ids"].shape[1], "same_tokens": torch.equal(cached, plain)}
print(json.dumps({"results": out, "sds_cli": any(m.split(".")[0] == "sds_cli" for m in sys.modules)}))
"""


def test_saved_model_loads_with_trust_remote_code_alone(tmp_path):
    families = ("llama", "mistral", "qwen2")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    for family in families:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **ARCH)).eval()
        shrink(model, KEPT)
        model.save_pretrained(tmp_path / family)
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_tyr.{type(model).__name__}"}
        assert (tmp_path / family / "modeling_tyr.py").exists()
        with torch.no_grad():
            torch.save({"ids": ids, "logits": load_pruned(tmp_path / family)(ids).logits}, tmp_path / f"{family}.pt")
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path), *families], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["sds_cli"]
    for family in families:
        result = got["results"][family]
        assert result["class"].startswith("Tyr") and result["equal"], result
        assert result["cache_length"] == ids.shape[1]  # block 0 has no head, yet the cache counts every token
        assert result["generated"] == 5 and result["same_tokens"], result


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_headless_first_block_keeps_the_cache_length(family):
    """Incremental decoding with a KV cache computes what one forward over the whole sequence does, with no
    head left in the block whose cache the model reads its position from."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **ARCH)).eval()
    shrink(model, KEPT)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(5, 9)]
    assert cache.get_seq_length() == 9
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
