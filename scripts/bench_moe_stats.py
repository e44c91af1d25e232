"""What collecting per-expert statistics costs against the MoE block's own forward: a random Mixtral block (8 experts,
top 2, hidden 512, intermediate 1024) on 16 x 256 tokens in batches of 4 windows, the median of a few repeats of
(a) the MoE block's forward, (b) the same through the recording forward (``engine.experts``), which hands each
expert's inputs on, and (c) the engine's ``collect`` of every expert matrix's gram. Prints JSON.

    python scripts/bench_moe_stats.py [--repeats 3] [--threads N]"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sds_cli.engine.experts import routed_inputs
from sds_cli.engine.stats import collect
from sds_cli.engine.stream import Stream
from sds_cli.models import block_linears, decoder_layers

ARCH = {"vocab_size": 256, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **ARCH)).eval()
    moe = decoder_layers(model)[0].mlp
    batches = list(torch.randn(16, 256, ARCH["hidden_size"], generator=torch.Generator().manual_seed(0)).split(4))
    stream = Stream(batches, [[{}] * len(batches)], torch.device("cpu"), torch.device("cpu"))
    names = list(block_linears(moe))  # experts.{e}.gate_proj, .up_proj, .down_proj (the router is never one)

    def plain():
        for h in batches:
            moe(h)

    def recording():
        with routed_inputs(moe, names, lambda n, x: None):
            plain()

    seconds = {"forward": median_seconds(plain, args.repeats),
               "recording_forward": median_seconds(recording, args.repeats),
               "collect": median_seconds(lambda: collect(moe, stream, names), args.repeats)}
    print(json.dumps({"arch": ARCH, "tokens": 16 * 256, "threads": args.threads, "repeats": args.repeats,
                      "seconds": seconds, "recording_ratio": seconds["recording_forward"] / seconds["forward"],
                      "collect_ratio": seconds["collect"] / seconds["forward"]}, indent=1))


if __name__ == "__main__":
    main()
