"""Check a run saved with save.format=compressed-tensors: reload its model through compressed-tensors'
own decompression and evaluate it on the run's own windows; the perplexities must equal the run's.
With --dense (the model/ dir of the same run saved as safetensors), also compare every weight bit for
bit and report both sizes on disk.

    python scripts/ct_roundtrip.py outputs/2026-11-24/12-00-00_smollm2-135m_magnitude_2:4 \
        --dense outputs/2026-11-24/12-05-00_smollm2-135m_magnitude_2:4/model
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoTokenizer

from sds_cli.eval.evaluator import Evaluator
from sds_cli.models import LoadedModel
from sds_cli.results import export


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path, help="the run dir (holds results.json and model/)")
    parser.add_argument("--dense", type=Path, help="the same model saved as safetensors, to compare with")
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    saved = Path(results["saved"]["model"])
    sparsity = json.loads((saved / "config.json").read_text())["quantization_config"]["sparsity_config"]
    print(f"{saved}: {sparsity['format']} ({sparsity['sparsity_structure']}), {export.disk_bytes(saved)} bytes")

    model = export.load_compressed(saved)
    cfg = OmegaConf.create(results["config"])
    stage = "sds" if "sds" in results["metrics"] else "oneshot"
    got = Evaluator(cfg, LoadedModel(model, AutoTokenizer.from_pretrained(saved), cfg.model.name, None), "cpu")(
        "reloaded")
    for key, value in got.items():
        if key.startswith("ppl_"):
            run = results["metrics"][stage][key]
            print(f"{key}: reloaded {value!r}, run ({stage}) {run!r}, {'equal' if value == run else 'DIFFERENT'}")

    if args.dense:
        dense = load_file(args.dense / "model.safetensors")
        ours = model.state_dict()
        differ = [name for name, value in dense.items()
                  if value.dtype != ours[name].dtype or not torch.equal(value.view(torch.uint8), ours[name].view(torch.uint8))]
        print(f"{args.dense}: {export.disk_bytes(args.dense)} bytes; {len(dense)} tensors, "
              f"{len(differ)} not bit-identical{': ' + ', '.join(differ[:5]) if differ else ''}")


if __name__ == "__main__":
    main()
