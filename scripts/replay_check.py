"""Replay one calibration window block by block and compare every block's output with the model's own
forward: once with each block's own keyword inputs (what the engine does) and once with block 0's
inputs handed to every block (the engine before per-block capture), to show what that costs a model.

    python scripts/replay_check.py model=gguf model.path=DIR model.file=NAME.gguf calib=wikitext2-valid \
        data.root=../shared/data
"""
import sys

import torch
from hydra import compose, initialize_config_dir

from sds_cli import data
from sds_cli.engine.replay import check_replay, replay
from sds_cli.engine.stream import capture, reference_outputs
from sds_cli.models import load_model
from sds_cli.paths import CONF


def main() -> None:
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=sys.argv[1:])
    lm = load_model(cfg.model, cfg.dtype)
    window = data.calibration_windows(lm.tokenizer, cfg.calib.source, 1, cfg.calib.seqlen, cfg.seed,
                                      cfg.data.root, cfg.calib.path)
    with torch.no_grad():
        reference = reference_outputs(lm.model, window, "cpu")
        stream = capture(lm.model, window, 1, "cpu", False)
        own = replay(lm.model, stream, reference)
        stream.kwargs = [stream.kwargs[0]] * len(stream.kwargs)
        first = replay(lm.model, stream, reference)
    types = getattr(lm.model.config, "layer_types", None) or ["-"] * len(own)
    print("block  layer type           own inputs   block 0's inputs")
    for i, (a, b) in enumerate(zip(own, first)):
        print(f"{i:5d}  {types[i]:<20} {a:11.2e}  {b:11.2e}")
    check_replay(lm.model, window, "cpu", 1e-4)
    print("check_replay: passed")


if __name__ == "__main__":
    main()
