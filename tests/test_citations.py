"""Every citation in the code resolves inside the repository (issue 17).

Two tags, two documents:
- `Sec. x.y` cites the paper: docs/paper.md must have a heading `## Sec. x.y ...`.
- `§x.y` (also "reference §x.y", "clouds_reference.md §x.y") cites the official code's behaviour: docs/official_code.md
  must have a heading `## §x.y ...` / `### §x.y ...`. `§x.y.z` and "§x.y step(s) a-b" name numbered items of §x.y
  (lines starting "z. "). `<name>.md §x` cites docs/<name>.md (or the one docs file whose name ends with <name>.md).
A bare number resolves when its own heading or any heading below it exists (`§4` by `§4.1`). Ranges (`§1.3-1.4`,
`§5.3.1-2`) check both ends; lists (`Sec. 3.3 and 4.1`, `Sec. 3.1, 3.3`) check every item.

Scanned: tracked and untracked-not-ignored .py/.cpp/.cu/.sh files, README.md, DEVELOPERS.md, BENCHMARKS.md and
docs/*.md. The docs' `**Here:**` paragraphs must name files that exist and names those files define, so the docs
cannot drift from the code unnoticed.
"""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OFFICIAL, PAPER = "official_code.md", "paper.md"
CODE_SUFFIXES = (".py", ".cpp", ".cu", ".sh")
SCANNED_MD = ("README.md", "DEVELOPERS.md", "BENCHMARKS.md")
DOC_ALIASES = {"clouds_reference.md": OFFICIAL}  # the project notes that docs/official_code.md restates
SELF = "tests/test_citations.py"  # its strings are examples of tags, not citations
SKIP_DIRS = {"runs", "datasets", "datasets_toy", "__pycache__", "node_modules"}  # and hidden folders

# Tags that are wrong in the code and wait for a fix there (file, tag): each must still occur, so a fixed entry has
# to be removed from this list. Empty: the fused semantic-inference kernels' "Sec. 3.4" tags now read §3.4.
KNOWN_WRONG = set()

NUM = r"\d+(?:\.\d+)*"
REF_RE = re.compile(rf"(?:(?P<doc>[\w.-]+\.md)\s+)?§\s?(?P<num>{NUM})(?:\s*[-–]\s*(?P<end>{NUM}))?"
                    rf"(?:\s+steps?\s+(?P<s1>\d+)(?:\s*[-–]\s*(?P<s2>\d+))?)?")
SEC_RE = re.compile(rf"\bSec\.\s?(?P<num>{NUM})(?P<rest>(?:\s*(?:,|and|&|/)\s*\d(?:\.\d+)*(?![\w.]))*)")
HEADING_RE = re.compile(rf"^(#{{1,6}})\s+(?:§|Sec\.\s?)({NUM})\b")
ITEM_RE = re.compile(r"^(\d+)\.\s")


# ---- documents ----

def parse_doc(text: str) -> dict:
    """{section number: set of numbered items (top-level "N. " lines) in its body}; body = up to the next heading.
    Raises ValueError on a heading number used twice."""
    sections, current = {}, None
    for line in text.splitlines():
        m = HEADING_RE.match(line)
        if m:
            current = m.group(2)
            if current in sections:
                raise ValueError(f"heading {current} appears twice")
            sections[current] = set()
        elif line.startswith("#"):
            current = None
        elif current is not None:
            item = ITEM_RE.match(line)
            if item:
                sections[current].add(int(item.group(1)))
    return sections


def load_docs(folder: Path = DOCS) -> dict:
    """{file name: parse_doc(...)} for every docs/*.md."""
    return {p.name: parse_doc(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.md"))}


def _doc_for(name, docs):
    if name is None:
        return OFFICIAL
    name = DOC_ALIASES.get(name, name)
    if name in docs:
        return name
    matches = [d for d in docs if d.endswith("_" + name)]
    return matches[0] if len(matches) == 1 else None


def _resolves(num: str, sections: dict, items=()) -> bool:
    """A heading for `num`, or a numbered item of its parent heading (x.y.z), or (bare x) any heading x.*."""
    parts = num.split(".")
    if num in sections:
        return all(i in sections[num] for i in items)
    if len(parts) >= 3 and ".".join(parts[:-1]) in sections and not items:
        return int(parts[-1]) in sections[".".join(parts[:-1])]
    return len(parts) == 1 and not items and any(s.startswith(num + ".") for s in sections)


def _range_end(start: str, end: str) -> str:
    """'5.3.1' - '2' -> '5.3.2'; '1.3' - '1.4' -> '1.4'."""
    a, b = start.split("."), end.split(".")
    return ".".join(a[:len(a) - len(b)] + b) if len(b) < len(a) else end


def citation_problems(text: str, docs: dict) -> list:
    """[(line number, tag, why)] for every citation in `text` that does not resolve in `docs` (see load_docs)."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in REF_RE.finditer(line):
            tag = m.group(0).strip()
            doc = _doc_for(m.group("doc"), docs)
            if doc is None:
                out.append((lineno, tag, f"no docs/{m.group('doc')} (nor a docs file ending in it)"))
                continue
            nums = [m.group("num")] + ([_range_end(m.group("num"), m.group("end"))] if m.group("end") else [])
            steps = range(int(m.group("s1")), int(m.group("s2") or m.group("s1")) + 1) if m.group("s1") else ()
            for num in nums:
                if not _resolves(num, docs[doc], steps):
                    why = (f"§{num} in docs/{doc} has no numbered steps {steps.start}-{steps.stop - 1}" if steps
                           and num in docs[doc] else f"no §{num} heading in docs/{doc}")
                    out.append((lineno, tag, why))
        for m in SEC_RE.finditer(line):
            nums = [m.group("num")] + re.findall(NUM, m.group("rest"))
            for num in nums:
                if PAPER not in docs or not _resolves(num, docs[PAPER]):
                    out.append((lineno, f"Sec. {num}", f"no 'Sec. {num}' heading in docs/{PAPER}"))
    return out


# ---- the files that cite ----

def repo_files() -> list:
    """Tracked and untracked-not-ignored files (git), or a walk of the tree without git; relative POSIX paths."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        return sorted(p for p in set(out) if (ROOT / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and not any(
            d in SKIP_DIRS or d.startswith(".") for d in p.relative_to(ROOT).parts[:-1]))


def cited_files() -> list:
    return [p for p in repo_files() if p != SELF and (p.endswith(CODE_SUFFIXES) or Path(p).name in SCANNED_MD
                                                       or (p.startswith("docs/") and p.endswith(".md")))]


def repo_problems(docs=None, files=None) -> list:
    """["path:line: tag: why"] over the scanned files, KNOWN_WRONG left out."""
    docs = load_docs() if docs is None else docs
    out = []
    for path in cited_files() if files is None else files:
        for lineno, tag, why in citation_problems((ROOT / path).read_text(encoding="utf-8"), docs):
            if (path, tag) not in KNOWN_WRONG:
                out.append(f"{path}:{lineno}: {tag}: {why}")
    return out


# ---- tests ----

def test_docs_exist_with_unique_headings():
    docs = load_docs()  # parse_doc raises on a duplicated heading
    assert OFFICIAL in docs and PAPER in docs, f"docs/ must hold {OFFICIAL} and {PAPER}; found {sorted(docs)}"
    assert {"4.4", "5.2", "5.3", "9.7"} <= set(docs[OFFICIAL]) and {"3.1", "3.2", "3.3", "4"} <= set(docs[PAPER])
    assert docs[OFFICIAL]["4.4"] == {1, 2, 3, 4, 5}  # "§4.4 steps 3-5" relies on the five numbered steps


def test_every_citation_resolves():
    files = cited_files()
    assert "train.py" in files and "README.md" in files and f"docs/{OFFICIAL}" in files  # the scan sees the repo
    problems = repo_problems(files=files)
    assert not problems, ("citations with no heading in docs/ (add the section to docs/, fix the tag, or restate the "
                          "point inline):\n" + "\n".join(problems))


def test_known_wrong_tags_still_occur():
    docs = load_docs()
    for path, tag in sorted(KNOWN_WRONG):
        found = [t for _, t, _ in citation_problems((ROOT / path).read_text(encoding="utf-8"), docs)]
        assert tag in found, f"{path} no longer has the unresolved tag {tag!r}: remove it from KNOWN_WRONG"


def test_checker_catches_planted_citations():
    docs = load_docs()
    S = "\u00a7"
    good = [f"# {S}4: bare", f"({S}5.3.1-2)", f"reference {S}1.3-1.4, {S}9", f"{S}4.4 steps 3-5", f"{S}4.4 step 2",
            f"{S}5.2.4: fallback", f"{S}5.2-5.3", "Sec. 3.3 and 4.1 of the paper", "| Sec. 3.1, 3.3 |", "(Sec. 4)",
            f"Sec. 3.1 / {S}2.2", f"clouds_reference.md {S}7.1", f"keys.md {S}6.2", f"environment.md {S}4"]
    for line in good:
        assert citation_problems(line, docs) == [], line
    bad = {f"{S}9.99": f"{S}9.99", f"{S}4.4 steps 3-7": "steps", f"{S}5.2.9": f"{S}5.2.9", f"{S}10": f"{S}10",
           f"{S}1.3-1.9": f"{S}1.9", "Sec. 3.9": "Sec. 3.9", "Sec. 3.3 and 5.1": "Sec. 5.1",
           f"keys.md {S}3": f"{S}3", f"nosuch.md {S}1": "nosuch.md", f"environment.md {S}2": f"{S}2"}
    for line, needle in bad.items():
        found = citation_problems(line, docs)
        assert len(found) == 1 and needle in f"{found[0][1]} {found[0][2]}", (line, found)


def test_checker_scans_a_planted_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Sec. 3.3: fine."""\nx = 1  # reference \u00a79.42: no such bug\n', encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert repo_problems(files=["bad.py"]) == ["bad.py:2: \u00a79.42: no \u00a79.42 heading in docs/official_code.md"]


# ---- the docs name code that exists ----

TOKEN_RE = re.compile(r"`([^`]+)`")
FILE_SUFFIXES = (".py", ".cpp", ".cu", ".sh", ".txt", ".md")


def _find(path: str, files: list):
    if path in files:
        return path
    same = [f for f in files if Path(f).name == Path(path).name]
    return same[0] if len(same) == 1 else None


def _defines(source: str, name: str) -> bool:
    n = re.escape(name)
    return re.search(rf"^\s*(?:def|class)\s+{n}\b|^\s*{n}\s*(?::|=)", source, re.M) is not None


def here_problems() -> list:
    """Names in the docs' **Here:** paragraphs that are not files of the repo, or not defined in the file before."""
    files, out = repo_files(), []
    for doc in sorted(DOCS.glob("*.md")):
        paragraphs = re.findall(r"^\*\*Here:\*\*(.*?)(?:\n\s*\n|\Z)", doc.read_text(encoding="utf-8"), re.M | re.S)
        for para in paragraphs:
            source = current = None
            for token in TOKEN_RE.findall(para):
                if token.endswith(FILE_SUFFIXES) or "/" in token:
                    current = _find(token, files)
                    if current is None:
                        out.append(f"docs/{doc.name}: `{token}` is not a file of the repository (or is ambiguous)")
                    source = (ROOT / current).read_text(encoding="utf-8") if current else None
                elif source is not None and current.endswith(".py"):
                    missing = [p for p in token.split(".") if not _defines(source, p)]
                    if missing:
                        out.append(f"docs/{doc.name}: `{token}` is not defined in {current}")
    return out


def test_docs_name_existing_code():
    problems = here_problems()
    assert not problems, "docs name code that moved or was renamed; update docs/:\n" + "\n".join(problems)
