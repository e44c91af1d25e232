"""`sds-data`: write a data root (``data.root``, the layout of shared/data) from the Hugging Face hub, and check one.

    sds-data fetch DIR     # WikiText-2 raw test, WikiText-2 (tokenized) valid/test, Tiny Shakespeare, zero-shot tasks
    sds-data verify DIR    # every file listed in DIR/SHA256SUMS against its checksum

Every file is rebuilt from the hub's rows in the format the project's loaders read (``sds_cli.data.SOURCES`` and
the ``local_*`` zero-shot tasks): WikiText in the original one-line-per-row files (a blank row is a line holding
one space), Tiny Shakespeare as the one text its three hub splits cut, and each zero-shot task's evaluation split
as JSON lines in the fields its local task reads, holding what lm-eval's own task shows the model. Everything is
downloaded before anything is written; offline, the command stops in one line naming the dataset it could not
reach."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from sds_cli.console import console
from sds_cli.errors import ConfigError

SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class Split:
    """One split of one hub dataset (``datasets.load_dataset(path, name, split=split)``)."""

    path: str
    name: str | None
    split: str

    def __str__(self) -> str:
        return f"{self.path}" + (f" ({self.name})" if self.name else "") + f", split {self.split}"


@dataclass(frozen=True)
class File:
    """One file of the data root: where it goes, the hub splits it is made of, and how their rows become its text."""

    path: str
    group: str
    sources: tuple[Split, ...]
    render: Callable[[list[list[dict]]], str]


def wikitext_lines(splits: list[list[dict]]) -> str:
    """The hub's rows back as the original file (the inverse of ``sds_cli.data._raw_rows``): one line per row,
    a blank row (``""``) as a line holding one space, any other row as it is (it keeps its own ``"\\n"``)."""
    (rows,) = splits
    return "".join(" \n" if not r["text"] else r["text"] if r["text"].endswith("\n") else r["text"] + "\n"
                   for r in rows)


def joined_text(splits: list[list[dict]]) -> str:
    """Tiny Shakespeare: the hub cuts input.txt into train, validation and test (one row each); joined back."""
    return "".join(r["text"] for rows in splits for r in rows)


def jsonl(convert: Callable[[dict], dict]) -> Callable[[list[list[dict]]], str]:
    def render(splits: list[list[dict]]) -> str:
        (rows,) = splits
        return "".join(json.dumps(convert(r), ensure_ascii=False) + "\n" for r in rows)

    return render


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


# Each task's evaluation split (as lm-eval's task YAML names it) in the fields of its local_* task; the local
# task's template then shows the model exactly lm-eval's prompt, choices and target.
def copa(r: dict) -> dict:
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    return {"query": r["premise"].strip()[:-1] + ", " + connector, "gold": int(r["label"]),
            "choices": [_lower_first(r["choice1"]), _lower_first(r["choice2"])]}


def boolq(r: dict) -> dict:
    return {"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
            "gold": int(r["label"])}


def piqa(r: dict) -> dict:
    return {"choices": [r["sol1"], r["sol2"]], "gold": int(r["label"]), "query": f"Question: {r['goal']}\n"}


def openbookqa(r: dict) -> dict:
    return {"query": r["question_stem"], "choices": list(r["choices"]["text"]),
            "gold": list(r["choices"]["label"]).index(r["answerKey"].lstrip())}


def arc(r: dict) -> dict:
    return {"choices": list(r["choices"]["text"]), "query": f"Question: {r['question']}",
            "gold": list(r["choices"]["label"]).index(r["answerKey"])}


def winogrande(r: dict) -> dict:
    blank = r["sentence"].index("_")
    return {"context_options": [r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]],
            "continuation": r["sentence"][blank + 1:].strip(), "gold": {"1": 0, "2": 1}[r["answer"]]}


def lambada(r: dict) -> dict:
    *context, last = r["text"].split(" ")
    return {"context": " ".join(context), "continuation": last}


WIKITEXT, SHAKESPEARE = "Salesforce/wikitext", "karpathy/tiny_shakespeare"
LAYOUT: list[File] = [
    File("wikitext-2-raw/wiki.test.raw", "wikitext2-raw", (Split(WIKITEXT, "wikitext-2-raw-v1", "test"),),
         wikitext_lines),
    File("wikitext-2/valid.txt", "wikitext2", (Split(WIKITEXT, "wikitext-2-v1", "validation"),), wikitext_lines),
    File("wikitext-2/test.txt", "wikitext2", (Split(WIKITEXT, "wikitext-2-v1", "test"),), wikitext_lines),
    File("tinyshakespeare/input.txt", "shakespeare",
         tuple(Split(SHAKESPEARE, None, s) for s in ("train", "validation", "test")), joined_text),
    File("zeroshot/arc_challenge.jsonl", "zeroshot", (Split("allenai/ai2_arc", "ARC-Challenge", "test"),), jsonl(arc)),
    File("zeroshot/arc_easy.jsonl", "zeroshot", (Split("allenai/ai2_arc", "ARC-Easy", "test"),), jsonl(arc)),
    File("zeroshot/boolq.jsonl", "zeroshot", (Split("aps/super_glue", "boolq", "validation"),), jsonl(boolq)),
    File("zeroshot/copa.jsonl", "zeroshot", (Split("aps/super_glue", "copa", "validation"),), jsonl(copa)),
    File("zeroshot/lambada_openai.jsonl", "zeroshot", (Split("EleutherAI/lambada_openai", "default", "test"),),
         jsonl(lambada)),
    File("zeroshot/openbook_qa.jsonl", "zeroshot", (Split("allenai/openbookqa", "main", "test"),), jsonl(openbookqa)),
    File("zeroshot/piqa.jsonl", "zeroshot", (Split("baber/piqa", None, "validation"),), jsonl(piqa)),
    File("zeroshot/winogrande.jsonl", "zeroshot", (Split("allenai/winogrande", "winogrande_xl", "validation"),),
         jsonl(winogrande)),
]
GROUPS = tuple(dict.fromkeys(f.group for f in LAYOUT))


def _quiet_hub() -> None:
    """The hub clients log every retry of an unreachable host; the one line this command prints says it instead."""
    import datasets
    import huggingface_hub

    huggingface_hub.utils.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()


def load_rows(split: Split) -> list[dict]:
    """One hub split's rows, or a ConfigError in one line naming it."""
    import datasets

    try:
        return [dict(row) for row in datasets.load_dataset(split.path, split.name, split=split.split)]
    except Exception as err:  # noqa: BLE001 - the hub client raises many types for an unreachable or moved dataset
        first = (str(err).strip().splitlines() or [""])[0]
        offline = (isinstance(err, ConnectionError) or "reach" in first or "offline" in first.lower()
                   or type(err).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"))
        what = "cannot reach the Hugging Face hub for" if offline else "cannot load from the Hugging Face hub:"
        raise ConfigError(f"{what} {split} ({type(err).__name__}: {first}); nothing was written") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:  # newline="": the "\n" of the rows, on any OS
        handle.write(text)
    tmp.replace(path)


def fetch(root: Path, groups: Iterable[str] = GROUPS) -> list[tuple[str, int, str]]:
    """Download every split the chosen groups need, then write their files and ``SHA256SUMS`` (every layout file
    present in ``root``, in layout order, as ``sha256sum`` writes it). Returns (file, bytes, sha256) per file."""
    groups = set(groups)
    if unknown := groups - set(GROUPS):
        raise ConfigError(f"unknown data group '{min(unknown)}'; choose from: {', '.join(GROUPS)}")
    files = [f for f in LAYOUT if f.group in groups]
    _quiet_hub()
    rows: dict[Split, list[dict]] = {}
    for split in dict.fromkeys(s for f in files for s in f.sources):  # all downloads first: nothing half-written
        rows[split] = load_rows(split)
        console.print(f"fetched {split}: {len(rows[split]):,} rows", highlight=False)
    texts = {}
    for file in files:
        try:
            texts[file.path] = file.render([rows[s] for s in file.sources])
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise ConfigError(f"{', '.join(map(str, file.sources))} has rows of an unexpected form for "
                              f"{file.path} ({type(err).__name__}: {err}); nothing was written") from None
    for path, text in texts.items():
        _write(root / path, text)
    present = [f.path for f in LAYOUT if (root / f.path).is_file()]
    sums = {path: sha256(root / path) for path in present}
    _write(root / SUMS, "".join(f"{digest}  {path}\n" for path, digest in sums.items()))
    return [(path, (root / path).stat().st_size, sums[path]) for path in texts]


def verify(root: Path) -> list[str]:
    """The problems of ``root`` against its ``SHA256SUMS`` (empty: every listed file is there and matches)."""
    listing = root / SUMS
    if not listing.is_file():
        raise ConfigError(f"{listing} not found (sds-data fetch {root} writes it)")
    problems = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path) != digest:
            problems.append(f"{name}: checksum differs")
    return problems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sds-data", description="The data root (data.root=DIR, the layout of "
                                     "shared/data) from the Hugging Face hub, and its checksums.")
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("fetch", help="download the data and write DIR's files and SHA256SUMS")
    get.add_argument("root", type=Path, metavar="DIR")
    get.add_argument("--only", default=",".join(GROUPS),
                     help=f"comma-separated groups to fetch (default: all of {', '.join(GROUPS)})")
    check = commands.add_parser("verify", help="check DIR's files against DIR/SHA256SUMS")
    check.add_argument("root", type=Path, metavar="DIR")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            written = fetch(args.root, [g.strip() for g in args.only.split(",") if g.strip()])
            for path, size, digest in written:
                console.print(f"wrote {args.root / path} ({size:,} bytes, sha256 {digest[:12]})", highlight=False)
            console.print(f"wrote {args.root / SUMS}; use it with data.root={args.root}", highlight=False)
            return
        problems = verify(args.root)
    except (ConfigError, OSError) as err:
        console.print(f"[bold red]error:[/] {escape(' '.join(str(err).split()))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    for problem in problems:
        console.print(f"[bold red]{escape(problem)}[/]", highlight=False)
    if problems:
        sys.exit(1)
    console.print(f"{args.root}: every file of {SUMS} matches", highlight=False)


if __name__ == "__main__":
    main()
