"""Prefill latency and batch-1 decode speed of a Týr-pruned model against its dense model, in plain
PyTorch (default attention), in one process with the two models timed in alternation.

    python scripts/tyr_speed.py RUN_DIR/model [--repeats 5] [--out FILE.json]
"""
import argparse
import functools
import json
import statistics
import time

import torch
from omegaconf import OmegaConf

from sds_cli.cli import CONF
from sds_cli.models import load_model
from sds_cli.structure import load_pruned


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    models = {"dense": load_model(OmegaConf.load(CONF / "model" / f"{args.dense}.yaml"), "float32").model,
              "pruned": load_pruned(args.model)}
    ids = torch.randint(0, models["dense"].config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    tasks = {
        "prefill_2048_s": lambda m: m(ids, use_cache=False),
        "prefill_128_s": lambda m: m(ids[:, :128], use_cache=False),
        "decode_s_per_token": lambda m: m.generate(ids[:, :128], max_new_tokens=args.decode, min_new_tokens=args.decode, use_cache=True,
                                                   do_sample=False),
    }
    times = {name: {k: [] for k in tasks} for name in models}
    for round_ in range(args.repeats + 1):  # the first round warms up
        for key, task in tasks.items():
            for name, model in models.items():
                t = timed(functools.partial(task, model))
                if round_:
                    times[name][key].append(t / (args.decode if key.startswith("decode") else 1))
    median = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    body = {"median": median, "params": params, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "prefill_speedup_2048": median["dense"]["prefill_2048_s"] / median["pruned"]["prefill_2048_s"],
            "prefill_speedup_128": median["dense"]["prefill_128_s"] / median["pruned"]["prefill_128_s"],
            "decode_speedup": median["dense"]["decode_s_per_token"] / median["pruned"]["decode_s_per_token"]}
    print(json.dumps(body, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(body, f, indent=2)


if __name__ == "__main__":
    main()
