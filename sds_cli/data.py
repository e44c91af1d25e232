"""Calibration windows and evaluation texts, from the hub or from a local data root (never silently mixed).

Sampling follows the SparseGPT/Wanda loaders: with ``random.seed(seed)``, C4 draws random documents
longer than ``seqlen`` and a random window of each; the other sources are tokenized once and draw
random windows from the token stream."""
from __future__ import annotations

import functools
import gzip
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sds_cli.errors import ConfigError

C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_VALID = "en/c4-validation.00000-of-00008.json.gz"


@dataclass
class Source:
    """Where one text source's splits come from: ``files`` are relative to ``data.root``."""

    hub: Callable[[str], list[str]]
    files: dict[str, str] = field(default_factory=dict)
    read: Callable[[Path], list[str]] = lambda path: [path.read_text(encoding="utf-8")]
    joiner: dict[str, str] = field(default_factory=dict)
    documents: bool = False  # calibration draws whole documents (C4) instead of windows of one stream
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)  # a split as a slice of its file's rows


def _hub(path: str, name: str | None = None, column: str = "text", **kwargs) -> Callable[[str], list[str]]:
    def load(split: str) -> list[str]:
        from datasets import load_dataset

        try:
            return list(load_dataset(path, name, split=split, **kwargs)[column])
        except Exception as err:  # noqa: BLE001 - datasets raises many types for an unreachable hub
            raise ConfigError(
                f"cannot load dataset {path}/{name or ''} [{split}] from the hub ({type(err).__name__}); "
                "offline, set data.root=DIR (or SDS_DATA_ROOT) to a local copy"
            ) from None

    return load


def _raw_rows(path: Path) -> list[str]:
    """wiki.*.raw lines as the hub's rows: a blank line is "", any other keeps its trailing newline."""
    return ["" if not line.strip() else line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _jsonl_gz(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def _unavailable(what: str) -> Callable[[str], list[str]]:
    def load(split: str) -> list[str]:
        raise ConfigError(f"{what} has no hub copy; set data.root=DIR holding it")

    return load


SOURCES: dict[str, Source] = {
    "wikitext2": Source(
        _hub("wikitext", "wikitext-2-raw-v1"),
        {"train": "wikitext-2-raw/wiki.train.raw", "test": "wikitext-2-raw/wiki.test.raw"},
        _raw_rows,
        {"train": "\n\n", "test": "\n\n"},
    ),
    "wikitext2-valid": Source(
        _hub("wikitext", "wikitext-2-v1"), {"train": "wikitext-2/valid.txt"}, _lines, {"train": "\n"}
    ),
    "c4": Source(
        _hub("allenai/c4", data_files={"train": C4_TRAIN, "validation": C4_VALID}),
        {"train": f"c4/{C4_TRAIN}", "test": f"c4/{C4_VALID}"},
        _jsonl_gz,
        {"test": " "},
        documents=True,
    ),
    "ptb": Source(
        _hub("ptb_text_only", "penn_treebank", column="sentence"),
        {"train": "ptb/ptb.train.txt", "test": "ptb/ptb.valid.txt"},
        _lines,
        {"train": " ", "test": " "},
    ),
    # one text cut in halves by lines: calibration and validation from the first, test from the second, so that a
    # test window is never calibrated or tuned on
    "shakespeare": Source(
        _unavailable("tinyshakespeare"),
        dict.fromkeys(("train", "validation", "test"), "tinyshakespeare/input.txt"),
        _lines,
        dict.fromkeys(("train", "validation", "test"), "\n"),
        parts={"train": (0, 0.5), "validation": (0, 0.5), "test": (0.5, 1)},
    ),
}
HUB_SPLITS = {"wikitext2": {"train": "train", "test": "test"}, "wikitext2-valid": {"train": "validation"},
              "c4": {"train": "train", "test": "validation"}, "ptb": {"train": "train", "test": "validation"}}
CHOICES = (*SOURCES, "embedded", "file")
# eval datasets read from a split other than "test": text held out from a corpus's test windows, to choose settings on
# text of another domain than the calibration's (Tiny Shakespeare's first half; WikiText-2's validation text)
EVAL_SPLITS = {"shakespeare-validation": ("shakespeare", "validation"), "wikitext2-validation": ("wikitext2-valid", "train")}
EVAL_CHOICES = (*CHOICES, *EVAL_SPLITS, "validation")  # validation: the calibration text outside the calibration windows


@functools.cache
def embedded_texts() -> dict[str, str]:
    """CPython's bundled documentation (``pydoc_data.topics``): every fifth topic (by name) is held
    out for evaluation, the rest is calibration text, so the two never overlap."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return {
        "train": "\n\n".join(topics[n] for i, n in enumerate(names) if i % 5 != 4),
        "test": "\n\n".join(topics[n] for i, n in enumerate(names) if i % 5 == 4),
    }


def load_texts(source: str, split: str, root: str | None, path: str | None = None) -> list[str]:
    """The split's rows (documents for C4), from ``root`` when given, else from the hub."""
    if source == "embedded":
        return [embedded_texts()[split]]
    if source == "file":
        if not path:
            raise ConfigError("source 'file' needs a path (e.g. calib.path=corpus.txt)")
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"text file {file} not found")
        return [file.read_text(encoding="utf-8")]
    if source not in SOURCES:
        raise ConfigError(f"unknown data source '{source}'; choose one of: {', '.join(CHOICES)}")
    spec = SOURCES[source]
    if split not in spec.files:
        raise ConfigError(f"data source '{source}' has no {split} split; choose another source")
    if root is None:
        return spec.hub(HUB_SPLITS.get(source, {}).get(split, split))
    file = Path(root).expanduser() / spec.files[split]
    if not file.is_file():
        raise ConfigError(f"data.root {root} lacks {spec.files[split]} (needed for {source} {split})")
    rows = spec.read(file)
    start, stop = spec.parts.get(split, (0, 1))
    return rows[round(start * len(rows)) : round(stop * len(rows))]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int, root: str | None,
                        path: str | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows drawn as SparseGPT and Wanda draw them."""
    if nsamples < 1 or seqlen < 2:
        raise ConfigError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    if source in SOURCES and SOURCES[source].documents:
        rows, rng = load_texts(source, "train", root, path), random.Random(seed)
        windows = []
        for _ in range(nsamples):
            for _attempt in range(100 * len(rows)):
                ids = tokenize(tokenizer, rows[rng.randint(0, len(rows) - 1)])
                if len(ids) > seqlen:
                    break
            else:
                raise ConfigError(f"no {source} document is longer than seqlen={seqlen}")
            start = rng.randint(0, len(ids) - seqlen - 1)
            windows.append(ids[start : start + seqlen])
        return torch.stack(windows)
    ids = _calibration_stream(tokenizer, source, root, path)
    if len(ids) <= seqlen:
        raise ConfigError(f"{source} text has {len(ids)} tokens, too short for seqlen={seqlen}")
    return torch.stack([ids[s : s + seqlen] for s in _starts(len(ids), nsamples, seqlen, seed)])


def _calibration_stream(tokenizer, source: str, root: str | None, path: str | None) -> torch.Tensor:
    joiner = SOURCES[source].joiner.get("train", "") if source in SOURCES else ""
    return tokenize(tokenizer, joiner.join(load_texts(source, "train", root, path)))


def _starts(length: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, length - seqlen - 1) for _ in range(nsamples)]


def validation_windows(tokenizer, calib, seed: int, root: str | None, seqlen: int,
                       max_windows: int | None) -> torch.Tensor:
    """The first non-overlapping ``seqlen`` windows of the calibration text that no calibration window
    (drawn as ``calibration_windows`` draws them) touches: a validation split on which to choose
    settings, so that the test text is only ever reported, never tuned on."""
    if calib.source in SOURCES and SOURCES[calib.source].documents:
        raise ConfigError(f"eval dataset 'validation' needs a calibration source drawn from one text, not "
                          f"'{calib.source}'; choose calib=wikitext2-valid, wikitext2, ptb, shakespeare or file")
    ids = _calibration_stream(tokenizer, calib.source, root, calib.path)
    taken = torch.zeros(len(ids) + 1, dtype=torch.long)
    for start in _starts(len(ids), calib.nsamples, calib.seqlen, seed):
        taken[start] += 1
        taken[start + calib.seqlen] -= 1
    free = taken.cumsum(0)[: len(ids) // seqlen * seqlen].reshape(-1, seqlen).eq(0).all(1)
    keep = free.nonzero().flatten()[:max_windows]
    if len(keep) == 0:
        raise ConfigError(f"the {calib.source} text has no {seqlen}-token window outside the calibration windows")
    return ids[: len(free) * seqlen].reshape(-1, seqlen)[keep]


def eval_tokens(tokenizer, name: str, root: str | None, path: str | None = None) -> torch.Tensor:
    """The whole evaluation text tokenized once (C4: the first 1100 validation documents, as SparseGPT)."""
    source, split = EVAL_SPLITS.get(name, (name, "test"))
    rows = load_texts(source, split, root, path)
    if source == "c4":
        rows = rows[:1100]
    joiner = SOURCES[source].joiner.get(split, "") if source in SOURCES else ""
    return tokenize(tokenizer, joiner.join(rows))


@functools.cache
def tiny_tokenizer():
    """A 512-token byte-level BPE trained on the embedded text: a real tokenizer for the tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator([embedded_texts()["train"]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
