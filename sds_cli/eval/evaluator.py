"""Evaluation of each stage's model: perplexity on the configured texts and zero-shot tasks."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from sds_cli import data
from sds_cli.console import bar
from sds_cli.errors import ConfigError
from sds_cli.eval.perplexity import perplexity, windows

EVAL_MAX_WINDOWS = {"c4": 256}  # SparseGPT's C4 protocol: the first 256 windows

class Evaluator:
    """Evaluates the model of each stage on the configured texts (tokenized once) and tasks."""

    def __init__(self, cfg: DictConfig, lm, device: str):
        self.cfg, self.lm, self.device = cfg.eval, lm, device
        self.root = cfg.data.root
        for name in self.cfg.datasets:
            if name not in data.EVAL_CHOICES:
                raise ConfigError(f"unknown eval dataset '{name}'; choose one of: {', '.join(data.EVAL_CHOICES)}")
            if data.EVAL_SPLITS.get(name, ("",))[0] == cfg.calib.source:
                raise ConfigError(f"eval dataset '{name}' is {cfg.calib.source} text that calibration draws from; "
                                  "choose 'validation' (the calibration text outside its windows)")
        self.texts = {name: self.windows(cfg, lm.tokenizer, name) for name in self.cfg.datasets}

    def windows(self, cfg: DictConfig, tokenizer, name: str) -> torch.Tensor:
        limit = self.cfg.max_windows or EVAL_MAX_WINDOWS.get(name)
        if name == "validation":
            return data.validation_windows(tokenizer, cfg.calib, cfg.seed, self.root, self.cfg.seqlen, limit)
        return windows(data.eval_tokens(tokenizer, name, self.root, self.cfg.path), self.cfg.seqlen, limit)

    def __call__(self, stage: str) -> dict:
        model = self.lm.model.to(self.device)
        results = {}
        for name, batches in self.texts.items():
            with bar(f"{stage}: {name} perplexity", len(batches)) as advance:
                results[f"ppl_{name}"], results[f"tokens_{name}"] = perplexity(
                    model, batches, self.device, self.cfg.batch_size, advance)
        if self.cfg.zeroshot.tasks:
            from sds_cli.eval.zeroshot import zeroshot

            zs = self.cfg.zeroshot
            with bar(f"{stage}: zero-shot", len(zs.tasks)) as advance:
                scores = zeroshot(model, self.lm.tokenizer, list(zs.tasks), data_root=self.root,
                                  batch_size=zs.batch_size, limit=zs.limit, num_fewshot=zs.num_fewshot,
                                  device=self.device, progress=advance)
            results |= {"zeroshot": scores["tasks"], "mean_acc": scores["mean_acc"]}
        model.to("cpu")
        return results
