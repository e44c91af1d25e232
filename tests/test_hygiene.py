"""Repository hygiene: tracked files speak of the software only.

No tracked text file (content or path) may label work by the periods or tracker items that produced it, cite a
machine's working paths, or quote instructions given to whoever wrote it. The patterns are built from pieces so
that this file does not match them itself.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".gguf", ".safetensors", ".bin", ".pt", ".gz", ".zip"}

PATTERNS = [
    re.compile("ses" + "sion ?[0-9]", re.IGNORECASE),
    re.compile("iss" + "ue ?#?[0-9]+", re.IGNORECASE),
    re.compile("/" + "work" + "/", re.IGNORECASE),
    re.compile("the " + "brief", re.IGNORECASE),
]


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (e.g. an installed package): no tracked files to check")
    proc = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"git ls-files failed: {proc.stderr.decode(errors='replace').strip()}")
    return [name for name in proc.stdout.decode("utf-8", errors="surrogateescape").split("\0") if name]


def is_binary(path: Path) -> bool:
    if path.suffix.lower() in BINARY_SUFFIXES:
        return True
    with path.open("rb") as f:
        return b"\0" in f.read(8192)


def hits_in(text: str) -> list[tuple[int, str]]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for pattern in PATTERNS:
            match = pattern.search(line)
            if match:
                found.append((lineno, match.group(0)))
    return found


def test_patterns_match_what_they_should():
    assert hits_in("ses" + "sion 7's code")
    assert hits_in("ses" + "sion5-soft/")
    assert hits_in("(iss" + "ue 11)")
    assert hits_in("iss" + "ue #14")
    assert hits_in("git clone /" + "work/main fresh")
    assert hits_in("as The " + "Brief says")
    assert not hits_in('@pytest.fixture(scope="session")')
    assert not hits_in("an issue with the engine; see docs/scale-out.md")


def test_tracked_files_have_no_work_labels_or_machine_paths():
    problems = []
    for name in tracked_files():
        for _, matched in hits_in(name):
            problems.append(f"{name}: path matches {matched!r}")
        path = ROOT / name
        if not path.is_file() or is_binary(path):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for lineno, matched in hits_in(text):
            problems.append(f"{name}:{lineno}: {matched!r}")
    assert not problems, "tracked files mention work periods, tracker items or machine paths:\n" + "\n".join(problems)
