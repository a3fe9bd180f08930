"""docs/METHOD.md is the repository's account of the method: every section the code, --help and
README point at exists, and nothing points at notes outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"

# The sections other files refer to by name (code comments, --help, README).
REQUIRED_HEADINGS = (
    "Symbols",
    "Advantages",
    "Teachers",
    "r− selection",
    "Schedules",
    "Loss",
    "Grading and reward",
    "Presets",
    "Differences from the reference code",
    "Guarantees",
    "Kernels",
    "Checkpoints and resume",
)

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg"}
SKIP_DIRS = {"__pycache__", "runs", "build", "dist"}

# References to working notes that live outside the repository (a reader cannot follow them).
PRIVATE_NOTES = re.compile(
    r"\bSPEC\b|KERNEL_ANCHORS|TRAINER_ANCHORS|shared notes|\.\./shared|/work/shared"
    r"|\b[Ii]ssue \d+\b"
)
# `docs/METHOD.md, "Section"` (also with a Markdown link, "section" or several quoted names).
METHOD_REF = re.compile(
    r"docs/METHOD\.md`?(?:\]\([^)]*\))?\)?[,:]?\s*(?:section\s*)?"
    r"((?:[\"“][^\"”\n]+[\"”](?:\s*(?:,|and|&)\s*)?)+)"
)
QUOTED = re.compile(r"[\"“]([^\"”]+)[\"”]")


def headings(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)]


def repository_files():
    """Text files of the repository (hidden folders such as .venv and .git left out), except this
    test, whose own examples would match."""
    this = Path(__file__).resolve()
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.resolve() == this:
            continue
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info")
               for p in rel.parts[:-1]):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            yield rel, path.read_text(errors="replace")


def test_method_has_every_section_referred_to():
    found = set(headings(METHOD.read_text()))
    missing = [h for h in REQUIRED_HEADINGS if h not in found]
    assert not missing, f"docs/METHOD.md lacks the sections {missing}; it has {sorted(found)}"


def test_cross_references_inside_method_resolve():
    """A quoted section name inside METHOD.md ("Advantages", "r− selection") is a heading."""
    text = METHOD.read_text()
    found = set(headings(text))
    names = {" ".join(q.split()) for q in QUOTED.findall(text)}
    section_like = {n for n in names if n[:1].isupper() or n.startswith("r− ")} - {"None"}
    assert section_like, "no cross-references found: the pattern is broken"
    broken = sorted(section_like - found)
    assert not broken, f"docs/METHOD.md refers to sections it does not have: {broken}"


def test_references_to_method_sections_resolve():
    """Every `docs/METHOD.md, "Section"` anywhere in the repository names an existing heading."""
    found = set(headings(METHOD.read_text()))
    seen, broken = 0, []
    for rel, text in repository_files():
        for m in METHOD_REF.finditer(text):
            for name in QUOTED.findall(m.group(1)):
                seen += 1
                if " ".join(name.split()) not in found:
                    line = text.count("\n", 0, m.start()) + 1
                    broken.append(f"{rel}:{line}: {name!r}")
    assert seen, "no docs/METHOD.md section reference found (the README has one)"
    assert not broken, "references to missing docs/METHOD.md sections:\n" + "\n".join(broken)


def test_the_patterns_catch_what_they_should():
    """The scanner itself: each kind of private reference is caught, ordinary text is not."""
    caught = ["see SPEC §2", "SPEC.md", 'one SPEC "step"', "KERNEL_ANCHORS rule 3",
              "TRAINER_ANCHORS", "the project's shared notes", "../shared/x", "Goals (issue 5)"]
    clean = ["SPECIAL_TOKENS", "PIP_SPEC", "docs/METHOD.md", "an issue with 5 rows"]
    assert all(PRIVATE_NOTES.search(t) for t in caught)
    assert not any(PRIVATE_NOTES.search(t) for t in clean)
    m = METHOD_REF.search('in [`docs/METHOD.md`](docs/METHOD.md), "Loss" and "Kernels".')
    assert m and QUOTED.findall(m.group(1)) == ["Loss", "Kernels"]


def test_nothing_refers_to_notes_outside_the_repository():
    hits = []
    for rel, text in repository_files():
        for number, line in enumerate(text.splitlines(), 1):
            if PRIVATE_NOTES.search(line):
                hits.append(f"{rel}:{number}: {line.strip()[:90]}")
    assert not hits, (f"{len(hits)} references to notes outside the repository (point them at "
                      "docs/METHOD.md by section name):\n" + "\n".join(hits))
