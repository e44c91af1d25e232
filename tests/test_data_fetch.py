"""`sds-data fetch`: the data root written from the hub's rows (a fake hub here: no network), its checksums, and
that the project's own loaders read it back: the text sources, and the local zero-shot tasks showing the model
what lm-eval's own tasks show it."""
import hashlib
import json
import os
import subprocess
import sys

import datasets
import pytest
from conftest import DATA

from sds_cli import data
from sds_cli.data_fetch import GROUPS, LAYOUT, SUMS, fetch, verify, wikitext_lines
from sds_cli.errors import ConfigError

RAW_TEST = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film , television actor . \n", "",
            " = = Career = = \n", "", " In 2000 Boulter had a guest @-@ starring role . \n", ""]
VALID = ["", " = Homarus gammarus = \n", "", " Homarus gammarus , known as the <unk> lobster . \n", ""]
TEST = ["", " = Tokenized test = \n", "", " a <unk> line . \n", ""]
SHAKESPEARE = {"train": "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
               "validation": "All:\nSpeak, speak.\n\n", "test": "First Citizen:\nYou are all resolved rather to die.\n"}
COPA = [{"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
         "choice2": "Water flowed from the spout.", "question": "effect", "idx": 0, "label": 1},
        {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
         "choice2": "The grass was cut.", "question": "cause", "idx": 1, "label": 0}]
BOOLQ = [{"question": "is house tax and property tax are same", "passage": "Property tax or 'house tax' is a local tax.",
          "idx": 0, "label": 1}]
PIQA = [{"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide paper bedding.",
         "sol2": "Provide jeans bedding.", "label": 0}]
OPENBOOKQA = [{"id": "7-980", "question_stem": "The sun is responsible for",
               "choices": {"text": ["puppies learning new tricks", "plants sprouting, blooming and wilting"],
                           "label": ["A", "B"]}, "answerKey": "B"}]
ARC = [{"id": "Mercury_1", "question": "Which is the most likely effect of this increase in rotation?",
        "choices": {"text": ["Planetary density will decrease.", "Planetary days will become shorter.", "Other."],
                    "label": ["A", "B", "C"]}, "answerKey": "B"},
       {"id": "NYSED_2", "question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide"],
                                                                                "label": ["1", "2"]}, "answerKey": "2"}]
WINOGRANDE = [{"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
               "option1": "Sarah", "option2": "Maria", "answer": "2"}]
LAMBADA = [{"text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel"}]

HUB = {
    ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"): [{"text": t} for t in RAW_TEST],
    ("Salesforce/wikitext", "wikitext-2-v1", "validation"): [{"text": t} for t in VALID],
    ("Salesforce/wikitext", "wikitext-2-v1", "test"): [{"text": t} for t in TEST],
    **{("karpathy/tiny_shakespeare", None, s): [{"text": t}] for s, t in SHAKESPEARE.items()},
    ("aps/super_glue", "copa", "validation"): COPA,
    ("aps/super_glue", "boolq", "validation"): BOOLQ,
    ("baber/piqa", None, "validation"): PIQA,
    ("allenai/openbookqa", "main", "test"): OPENBOOKQA,
    ("allenai/ai2_arc", "ARC-Easy", "test"): ARC,
    ("allenai/ai2_arc", "ARC-Challenge", "test"): ARC[:1],
    ("allenai/winogrande", "winogrande_xl", "validation"): WINOGRANDE,
    ("EleutherAI/lambada_openai", "default", "test"): LAMBADA,
}


@pytest.fixture
def hub(monkeypatch):
    """datasets.load_dataset answering from HUB (as datasets.Dataset, nested fields included); records the calls."""
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(HUB[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.fixture
def root(tmp_path, hub):
    fetch(tmp_path / "data")
    return tmp_path / "data"


def test_writes_the_layout_and_its_checksums(root, hub):
    assert sorted(hub) == sorted(HUB)  # every split fetched, each once
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted([f.path for f in LAYOUT] + [SUMS])
    lines = (root / SUMS).read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == [f.path for f in LAYOUT]  # shared/data's order
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest
    assert verify(root) == []
    if DATA.is_dir():  # the same names and order as the shared copy's SHA256SUMS
        assert [line.split("  ")[1] for line in (DATA / SUMS).read_text().splitlines()] == [f.path for f in LAYOUT]


def test_wikitext_is_the_original_file_format(root):
    raw = (root / "wikitext-2-raw/wiki.test.raw").read_text()
    assert raw.startswith(" \n = Robert Boulter = \n \n") and raw.count("\n") == len(RAW_TEST)
    assert data.load_texts("wikitext2", "test", str(root)) == RAW_TEST  # rows back exactly as the hub has them
    assert data.load_texts("wikitext2-valid", "train", str(root)) == [t.rstrip("\n") or " " for t in VALID]
    assert data.eval_tokens(data.tiny_tokenizer(), "wikitext2-validation", str(root)).tolist() == \
        data.tiny_tokenizer()("\n".join(t.rstrip("\n") or " " for t in VALID)).input_ids
    assert (root / "wikitext-2/test.txt").read_text().splitlines() == [t.rstrip("\n") or " " for t in TEST]


def test_shakespeare_is_the_one_text_cut_in_halves_by_lines(root):
    lines = "".join(SHAKESPEARE.values()).splitlines()
    train, test = (data.load_texts("shakespeare", split, str(root)) for split in ("train", "test"))
    assert train + test == lines and len(train) == len(lines) // 2  # disjoint halves, the whole text
    assert data.load_texts("shakespeare", "validation", str(root)) == train
    assert data.eval_tokens(data.tiny_tokenizer(), "shakespeare-validation", str(root)).tolist() == \
        data.tiny_tokenizer()("\n".join(train)).input_ids


@pytest.mark.skipif(not (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file(), reason=f"no shared data at {DATA}")
@pytest.mark.parametrize("name", ["wikitext-2-raw/wiki.test.raw", "wikitext-2/valid.txt", "wikitext-2/test.txt"])
def test_wikitext_writer_inverts_the_reader_on_the_real_files(name):
    """The shared files, read as hub rows and written back, are the same bytes: the writer is the reader's inverse."""
    original = (DATA / name).read_text(encoding="utf-8")
    rows = [{"text": row} for row in data._raw_rows(DATA / name)]
    assert wikitext_lines([rows]) == original


def _lower_first(text):
    return text[0].lower() + text[1:]


# What lm-eval's own tasks (lm_eval/tasks/{super_glue,piqa,openbookqa,arc,winogrande,lambada}) show the model for
# each hub row: (prompt, choices, target), from their YAMLs and utils.
EXPECTED = {
    "local_copa": [(r["premise"][:-1] + {"cause": " because", "effect": " therefore"}[r["question"]],
                    [" " + _lower_first(r["choice1"]), " " + _lower_first(r["choice2"])], r["label"]) for r in COPA],
    "local_boolq": [(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], r["label"]) for r in BOOLQ],
    "local_piqa": [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"]) for r in PIQA],
    "local_openbookqa": [(r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"]))
                         for r in OPENBOOKQA],
    "local_arc_easy": [(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                        r["choices"]["label"].index(r["answerKey"])) for r in ARC],
    "local_arc_challenge": [(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                             r["choices"]["label"].index(r["answerKey"])) for r in ARC[:1]],
    "local_winogrande": [(int(r["answer"]) - 1, [r["sentence"][:r["sentence"].index("_")] + o
                                                 for o in (r["option1"], r["option2"])],
                          r["sentence"][r["sentence"].index("_") + 1:].strip()) for r in WINOGRANDE],
    "local_lambada_openai": [(" ".join(r["text"].split(" ")[:-1]), None, " " + r["text"].split(" ")[-1])
                             for r in LAMBADA],
}


def test_local_zero_shot_tasks_read_the_files_as_lm_eval_shows_them(root):
    from sds_cli.eval.zeroshot import LOCAL_TASKS, _build

    assert set(EXPECTED) == set(LOCAL_TASKS)
    for name, expected in EXPECTED.items():
        task = _build(name, str(root), True)["tasks"][name]
        docs = list(task.test_docs())
        got = [(task.doc_to_text(d), task.doc_to_choice(d) if expected[0][1] is not None else None,
                task.doc_to_target(d)) for d in docs]
        assert got == expected, name


def test_only_some_groups(tmp_path, hub):
    fetch(tmp_path, ["zeroshot"])
    assert {s[0] for s in hub} == {s[0] for s in HUB} - {"Salesforce/wikitext", "karpathy/tiny_shakespeare"}
    listed = [line.split("  ")[1] for line in (tmp_path / SUMS).read_text().splitlines()]
    assert listed == [f.path for f in LAYOUT if f.group == "zeroshot"] and not (tmp_path / "wikitext-2").exists()
    with pytest.raises(ConfigError, match=f"unknown data group 'c4'; choose from: {', '.join(GROUPS)}"):
        fetch(tmp_path, ["c4"])


def test_verify_names_a_changed_or_missing_file(root):
    (root / "zeroshot/copa.jsonl").write_text(json.dumps({"query": "x"}) + "\n")
    (root / "tinyshakespeare/input.txt").unlink()
    assert verify(root) == ["tinyshakespeare/input.txt: missing", "zeroshot/copa.jsonl: checksum differs"]


def test_a_bad_row_writes_nothing(tmp_path, monkeypatch, hub):
    monkeypatch.setitem(HUB, ("baber/piqa", None, "validation"), [{"goal": "no solutions"}])
    with pytest.raises(ConfigError, match=r"baber/piqa, split validation has rows of an unexpected form for "
                                          r"zeroshot/piqa.jsonl \(KeyError"):
        fetch(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_offline_fails_in_one_line_naming_the_dataset(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no cache
    proc = subprocess.run([sys.executable, "-m", "sds_cli.data_fetch", "fetch", str(tmp_path / "data")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("error: cannot reach the Hugging Face hub for Salesforce/wikitext (wikitext-2-raw-v1)")
    assert not (tmp_path / "data").exists()
